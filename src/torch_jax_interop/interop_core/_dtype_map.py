"""torch dtype <-> numpy / JAX dtype: the bridge between ``_dtypes_torch`` and
``_dtypes_jax`` (both derived from the one table in ``_dtypes``)."""

from __future__ import annotations

import numpy as np
import torch

from .._dtypes import SUPPORTED_LIST as SUPPORTED_LIST
from .._dtypes_jax import NAME_TO_NUMPY as NAME_TO_NUMPY, NUMPY_TO_NAME as NUMPY_TO_NAME
from .._dtypes_torch import (
    NAME_TO_TORCH as NAME_TO_TORCH,
    TORCH_NARROW as TORCH_NARROW,
    TORCH_TO_NAME as TORCH_TO_NAME,
    torch_dtype_info as torch_dtype_info,
)


def torch_to_numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return NAME_TO_NUMPY[TORCH_TO_NAME[dtype]]


def numpy_to_torch_dtype(dtype: np.dtype) -> torch.dtype:
    return NAME_TO_TORCH[NUMPY_TO_NAME[np.dtype(dtype)]]
