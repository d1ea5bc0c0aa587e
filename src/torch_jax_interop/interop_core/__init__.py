"""In-process interop: zero-copy conversions, ``WrappedJaxFunction``, ``torch_module_to_jax``.

The bridge layer: imports both torch and JAX (never the client or the worker's service).
"""

from .._wrapped import (
    WrappedJaxFunction as WrappedJaxFunction,
    WrappedJaxScalarFunction as WrappedJaxScalarFunction,
)
from ._convert import jax_to_torch as jax_to_torch, torch_to_jax as torch_to_jax
from ._torch_module import torch_module_to_jax as torch_module_to_jax

__all__ = [
    "WrappedJaxFunction",
    "WrappedJaxScalarFunction",
    "jax_to_torch",
    "torch_module_to_jax",
    "torch_to_jax",
]
