"""``LocalJaxBackend``: runs a JAX function in this process for ``WrappedJaxFunction``.

The bridge between the torch side (the flat ``VjpBackend`` protocol of ``_call.py``) and the
JAX engine (``_engine.py``): it turns the call's tensors into JAX arrays (zero-copy where
the layout allows), keys the engine's programs by the call's structure, static values and
the tensors' layout, and turns outputs and gradients back into torch tensors that share the
buffers JAX produced. The engine compiles once per input signature (Notes [Residuals that
are inputs] and [Scalar outputs: gradients with the forward pass] there).

Memory: input tensors reach JAX zero-copy where their layout allows (see Note [Memory
sharing and copies] in ``_convert``); outputs and gradients are torch tensors that share the
buffers JAX produced. Inputs the backward pass needs are kept by reference: like torch,
backward refuses to run when such a tensor was modified in place after the forward pass
(its version counter moved).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import jax
import torch

from .._engine import Engine, Program, Residuals
from ._convert import _array_to_torch, _tensor_to_jax

if TYPE_CHECKING:
    from .._call import Call

_Tensor = torch.Tensor
_tree_flatten: Callable[..., Any] = jax.tree_util.tree_flatten


def _is_differentiable_tensor(t: torch.Tensor) -> bool:
    return t.requires_grad and (t.is_floating_point() or t.is_complex())


# dtypes whose numpy view JAX reads exactly (64-bit ones take the checked path, which
# narrows them when x64 is off; bfloat16 / float8 have no numpy view in torch)
_NUMPY_DTYPES = frozenset(
    {
        torch.float32,
        torch.float16,
        torch.complex64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
    }
)


class _Platform:
    numpy_args: bool | None = None  # whether jit places numpy arguments on the CPU

    @classmethod
    def probe(cls) -> bool:
        cls.numpy_args = jax.default_backend() == "cpu"
        return cls.numpy_args


def _to_jax(t: torch.Tensor) -> Any:
    """A value ``jax.jit`` accepts, sharing ``t``'s memory where the layout allows.

    On a CPU-only JAX a numpy view is the cheapest argument: jit's C++ dispatch imports it
    without a copy (about 1 us against about 8 us for a DLPack import). Everything else
    goes through the conversion core.
    """
    if t.requires_grad:
        t = t.detach()
    if (
        t.is_cpu
        and t.dtype in _NUMPY_DTYPES
        and not t.is_conj()
        and not t.is_neg()
        and (_Platform.numpy_args if _Platform.numpy_args is not None else _Platform.probe())
    ):
        return t.numpy()
    return _tensor_to_jax(t)


class VjpHandle:
    """The engine's residuals of one forward pass, with the versions of the tensors kept
    by reference (to detect in-place changes before backward)."""

    __slots__ = ("residuals", "versions")

    def __init__(self, residuals: Residuals, versions: list[tuple[torch.Tensor, int]]) -> None:
        self.residuals = residuals
        self.versions = versions

    @property
    def live(self) -> bool:
        return self.residuals.live


class LocalJaxBackend:
    """Runs ``jax_function(*args, **kwargs)`` in this process (the ``VjpBackend`` protocol).

    Leaves of the arguments that are not tensors are static: they are part of the
    compilation key and must be hashable. Only tensors that require grad (and are floating
    point or complex) are differentiated. ``engine`` holds the compiled programs and the
    counters ``vjp_calls``, ``fused_calls`` and ``live_residuals`` (for tests and debugging).
    """

    reads_in_place = True  # Note [Sharded parameters in library mode] in _wrapped.py

    def __init__(self, jax_function: Callable[..., Any]) -> None:
        self.jax_function = jax_function
        self.engine = Engine(jax_function)

    def _program(self, call: Call, tensors: Sequence[torch.Tensor], with_grad: bool) -> Program:
        layout = tuple(
            (t.shape, t.dtype, with_grad and _is_differentiable_tensor(t)) for t in tensors
        )
        diff = tuple(i for i, (_, _, d) in enumerate(layout) if d)
        try:
            return self.engine.program((call.key, with_grad, layout), call.arguments,
                                       len(tensors), diff, call.has_aux)
        except TypeError:
            statics = [type(value).__name__ for _, value in call.inputs.constants]
            raise TypeError(
                "every leaf of the arguments that is not a torch.Tensor is passed to the JAX "
                "function as a static (compile-time) value and must be hashable; got "
                f"{statics}. Pass arrays as torch tensors."
            ) from None

    def flat_call(self, call: Call, tensors: Sequence[torch.Tensor]) -> tuple[list, Any, Any]:
        """Run without keeping residuals: ``(output tensors, output treedef, aux)``."""
        program = self._program(call, tensors, False)
        out_leaves, aux = self.engine.call(program, [_to_jax(t) for t in tensors])
        outputs = [_leaf_to_torch(leaf) for leaf in out_leaves]
        return outputs, program.out_treedef, (_to_torch_tree(aux) if call.has_aux else None)

    def flat_forward(
        self, call: Call, tensors: Sequence[torch.Tensor]
    ) -> tuple[list, Any, Any, VjpHandle]:
        """Run and keep residuals: ``(output tensors, output treedef, aux, handle)``."""
        program = self._program(call, tensors, True)
        out_leaves, aux, residuals = self.engine.forward(
            program, [_to_jax(t) for t in tensors]
        )
        versions = [(tensors[i], tensors[i]._version) for i in residuals.saved_inputs]
        outputs = [_leaf_to_torch(leaf) for leaf in out_leaves]
        aux = _to_torch_tree(aux) if call.has_aux else None
        return outputs, program.out_treedef, aux, VjpHandle(residuals, versions)

    def flat_backward(
        self, handle: VjpHandle, cotangents: Sequence[torch.Tensor], *, retain: bool
    ) -> list[torch.Tensor | None]:
        """Cotangents (one per output leaf) -> one gradient per tensor (``None`` where
        the tensor was not differentiated)."""
        if handle.residuals.live:
            _check_versions(handle.versions)
        # `.sum()` gives an expanded (stride 0) cotangent, `.t()` a strided one
        cts = [_to_jax(ct if ct.is_contiguous() else ct.contiguous()) for ct in cotangents]
        grads = self.engine.backward(handle.residuals, cts, retain=retain)
        return [None if g is None else _array_to_torch(g) for g in grads]

    def release(self, handle: VjpHandle) -> None:
        """Drop the residuals of ``handle`` (idempotent, cheap, safe from a finalizer)."""
        self.engine.release(handle.residuals)


def _check_versions(versions: list[tuple[torch.Tensor, int]]) -> None:
    for tensor, version in versions:
        if tensor._version != version:
            raise RuntimeError(
                "one of the variables needed for gradient computation has been modified by "
                f"an inplace operation: a {tuple(tensor.shape)} {tensor.dtype} tensor given "
                "to a WrappedJaxFunction is at version "
                f"{tensor._version}; expected version {version} instead. The JAX function "
                "keeps it for backward (as torch keeps saved tensors): do not modify it in "
                "place between the forward pass and backward, or pass a `.clone()`."
            )


def _leaf_to_torch(leaf: Any) -> Any:
    if isinstance(leaf, jax.Array):
        return _array_to_torch(leaf)
    return leaf


def _to_torch_tree(tree: Any) -> Any:
    if isinstance(tree, jax.Array):
        return _array_to_torch(tree)
    leaves, treedef = _tree_flatten(tree)
    return treedef.unflatten([_leaf_to_torch(leaf) for leaf in leaves])
