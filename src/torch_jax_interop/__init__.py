"""torch-jax-interop: PyTorch and JAX on the same tensors, without copies.

Library mode (this module) imports torch and JAX lazily, on first use of a name, so that
``torch_jax_interop.server`` (JAX only) and ``torch_jax_interop.client`` (torch only) can be
imported in images that lack the other framework. Importing changes no jax or torch setting.
Every exception is in :mod:`torch_jax_interop.errors`; the layers (base, torch side, JAX side,
bridge) are described in docs/index.md ("Layout") and enforced by the import-linter contracts in
``pyproject.toml``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__ as __version__
from .errors import (
    ConversionError as ConversionError,
    CopyRequiredError as CopyRequiredError,
    IntegerOverflowError as IntegerOverflowError,
    InteropError as InteropError,
    UnsupportedTensorError as UnsupportedTensorError,
)

if TYPE_CHECKING:
    from ._wrapped import (
        WrappedJaxFunction as WrappedJaxFunction,
        WrappedJaxScalarFunction as WrappedJaxScalarFunction,
    )
    from .interop_core import (
        jax_to_torch as jax_to_torch,
        torch_module_to_jax as torch_module_to_jax,
        torch_to_jax as torch_to_jax,
    )

_LAZY = {
    "torch_to_jax": "torch_jax_interop.interop_core",
    "jax_to_torch": "torch_jax_interop.interop_core",
    "WrappedJaxFunction": "torch_jax_interop._wrapped",  # torch only: usable without jax
    "WrappedJaxScalarFunction": "torch_jax_interop._wrapped",
    "torch_module_to_jax": "torch_jax_interop.interop_core",
}

__all__ = [
    "ConversionError",
    "CopyRequiredError",
    "IntegerOverflowError",
    "InteropError",
    "UnsupportedTensorError",
    "WrappedJaxFunction",
    "WrappedJaxScalarFunction",
    "__version__",
    "jax_to_torch",
    "torch_module_to_jax",
    "torch_to_jax",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'torch_jax_interop' has no attribute '{name}'")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
