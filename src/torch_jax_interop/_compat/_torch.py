"""Torch side of Note [Private APIs] (in ``torch_jax_interop._compat``). Imports torch,
never JAX."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])

_private_to_dlpack: Any = getattr(torch._C, "_to_dlpack", None)
_private_from_dlpack: Any = getattr(torch._C, "_from_dlpack", None)


def _public_to_dlpack(t: torch.Tensor) -> Any:
    return t.__dlpack__()


_to_dlpack: Callable[[torch.Tensor], Any] = _private_to_dlpack or _public_to_dlpack


def to_dlpack_capsule(t: torch.Tensor) -> Any:
    """A DLPack capsule of a tensor (shares its memory; holds its storage alive).

    The capsule is made from an alias (``t.detach()``: a new tensor object on the same
    storage), not from ``t``: a capsule holds the tensor object it was made from, so
    ``t.set_(other)`` would otherwise drop the last reference to the shared storage and
    free the memory the JAX array reads. ``t.resize_()`` and
    ``t.untyped_storage().resize_()`` reallocate the storage itself: nothing can guard
    those (Note [Memory sharing and copies] in ``interop_core/_convert.py``)."""
    return _to_dlpack(t.detach())

from_dlpack_capsule: Callable[[Any], torch.Tensor] = _private_from_dlpack or torch.from_dlpack
"""A tensor from a DLPack capsule (shares its memory)."""

keep_graph: Callable[[], bool] = getattr(
    torch._C._autograd, "_get_current_graph_task_keep_graph", lambda: True
)
"""Whether the running backward pass keeps its graph (``retain_graph``); ``True`` when
unknown, so that residuals are kept until the graph is freed rather than lost."""

set_grad_mode: Callable[[bool], Any] = (
    getattr(torch._C, "_set_grad_enabled", None) or torch.set_grad_enabled
)
"""Set this thread's grad mode, without the context object ``torch.set_grad_enabled``
builds (for code that runs on every call; restore the old mode in a ``finally``)."""


def run_outside_dynamo(fn: F) -> F:
    """``fn`` made opaque to ``torch.compile`` (dynamo graph-breaks around it).

    ``torch._disable_dynamo`` imports ``torch._dynamo`` only when first called (under
    compile, where it is already imported); the public ``torch.compiler.disable`` imports it
    at decoration (~1.9 s), so it serves only as the fallback.
    """
    disable = getattr(torch, "_disable_dynamo", None)
    if disable is not None:
        return disable(fn)
    return torch.compiler.disable(fn)  # pragma: no cover - torch without _disable_dynamo


def fake_tensor_mode(**kwargs: Any) -> Any:
    """``torch._subclasses.fake_tensor.FakeTensorMode(**kwargs)``; ``ImportError`` where
    the installed torch has none (callers fall back to meta tensors)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(**kwargs)


def version_counter(t: torch.Tensor) -> int | None:
    """How many in-place writes ``t``'s storage has seen (``Tensor._version``, shared by
    views and ``detach()``); ``None`` where the installed torch has no such counter, which
    callers treat as "may have been written"."""
    return getattr(t, "_version", None)
