"""torch dtype <-> JAX (numpy) dtype, for the dtypes in ``torch_jax_interop._dtypes``."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import torch

from .._dtypes import BY_NAME, DTYPE_NAMES, DTypeInfo

TORCH_TO_NAME: dict[torch.dtype, str] = {getattr(torch, name): name for name in DTYPE_NAMES}
NAME_TO_TORCH: dict[str, torch.dtype] = {name: dt for dt, name in TORCH_TO_NAME.items()}
NAME_TO_NUMPY: dict[str, np.dtype] = {name: np.dtype(getattr(jnp, name)) for name in DTYPE_NAMES}
NUMPY_TO_NAME: dict[np.dtype, str] = {dt: name for name, dt in NAME_TO_NUMPY.items()}

# 64-bit dtypes and the 32-bit torch dtype they become while JAX's x64 mode is off.
TORCH_NARROW: dict[torch.dtype, torch.dtype] = {
    NAME_TO_TORCH[info.name]: NAME_TO_TORCH[info.narrow]
    for info in BY_NAME.values()
    if info.narrow is not None
}

SUPPORTED_LIST = ", ".join(DTYPE_NAMES)


def torch_dtype_info(dtype: torch.dtype) -> DTypeInfo | None:
    name = TORCH_TO_NAME.get(dtype)
    return None if name is None else BY_NAME[name]


def torch_to_numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return NAME_TO_NUMPY[TORCH_TO_NAME[dtype]]


def numpy_to_torch_dtype(dtype: np.dtype) -> torch.dtype:
    return NAME_TO_TORCH[NUMPY_TO_NAME[np.dtype(dtype)]]
