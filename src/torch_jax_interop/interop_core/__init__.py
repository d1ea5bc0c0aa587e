"""In-process interop: zero-copy conversions, ``WrappedJaxFunction``, ``torch_module_to_jax``.

Imports both torch and JAX.
"""

from ._convert import jax_to_torch as jax_to_torch
from ._convert import torch_to_jax as torch_to_jax

__all__ = ["jax_to_torch", "torch_to_jax"]
