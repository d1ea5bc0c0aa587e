"""``LocalJaxBackend``: runs a JAX function in this process for ``WrappedJaxFunction``.

The forward pass is one jitted call. With gradients, one jitted ``jax.vjp`` returns the
outputs and the residuals (the leaves of the vjp function; its jaxpr is static pytree
structure, kept on the Python side); backward rebuilds the vjp function from the residuals
in a second jitted function. Both are compiled once per input signature (argument
structure, static leaves, shapes, dtypes, which tensors need a gradient): calling again
never re-traces the user's function.

``WrappedJaxFunction`` talks to this backend through flat lists of tensors
(``flat_forward`` / ``flat_backward`` / ``flat_call``, with the ``_Call`` that says how to
rebuild the arguments); the pytree methods of the ``VjpBackend`` protocol are thin
adapters over them, used by ``connect("inproc")``.

Memory: input tensors reach JAX zero-copy where their layout allows (see Note [Memory
sharing and copies] in ``_convert``); outputs and gradients are torch tensors that share the
buffers JAX produced.

# Note [Residuals that are inputs]

Many residuals are inputs: ``x @ w`` keeps ``x`` to compute the gradient of ``w``. A jitted
function that returns one of its inputs copies it into a fresh buffer (800 KB per step for
the input batch of the benchmark MLP). The forward pass therefore returns only the
residuals that are not inputs; those that are (found by identity while tracing) are kept
as the input arrays themselves, which share memory with the torch tensors, exactly as
torch's saved tensors do. Like torch, backward then refuses to run when such a tensor was
modified in place after the forward pass (its version counter moved).

# Note [Scalar outputs: gradients with the forward pass]

When the function's output is one real floating-point scalar (a loss), the jitted forward
computes the gradients too, as ``jax.value_and_grad`` would, in one XLA computation: no
residuals are stored and backward does no JAX call. The vjp is linear in its cotangent, so
backward returns ``cotangent * gradients`` (the stored gradients themselves for the usual
cotangent 1.0). Fusing saves the residual round trip through memory and a dispatch (see
``benchmarks``, "MLP train step, loss in JAX"). The cost: a forward pass under grad mode
whose graph is never backpropagated computed gradients for nothing; evaluate under
``torch.no_grad()``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
import torch

from ._convert import _array_to_torch, _tensor_to_jax

if TYPE_CHECKING:
    from .._wrapped import _Call

_Tensor = torch.Tensor
_tree_flatten: Callable[..., Any] = jax.tree_util.tree_flatten
_tree_leaves = jax.tree_util.tree_leaves
_float0 = jax.dtypes.float0


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
    """What a forward pass keeps for backward: the residuals that are not inputs, the
    input arrays that are residuals (with the tensors' versions, to detect in-place
    changes), or for a scalar output the gradients themselves (Note [Scalar outputs]).

    ``live`` is false once released.
    """

    __slots__ = ("grads", "inputs", "live", "residuals", "signature", "versions")

    def __init__(
        self,
        signature: _Signature,
        residuals: list[Any] | None,
        inputs: list[Any] | None,
        versions: list[tuple[torch.Tensor, int]] | None,
        grads: list[Any] | None,
    ) -> None:
        self.signature = signature
        self.residuals = residuals
        self.inputs = inputs
        self.versions = versions
        self.grads = grads
        self.live = True

    def drop(self) -> None:
        self.live = False
        self.residuals = self.inputs = self.versions = self.grads = None


class _Signature:
    """Everything cached for one input signature: how to rebuild the arguments, the jitted
    functions, and what tracing found out (output structure, residual layout)."""

    __slots__ = (
        "backward",
        "diff",
        "forward",
        "forwarded",
        "fused",
        "num_tensors",
        "out_float",
        "out_shapes",
        "out_treedef",
        "plain",
        "res_treedef",
        "saved_inputs",
    )

    def __init__(self, num_tensors: int, diff: tuple[int, ...]) -> None:
        self.num_tensors = num_tensors
        self.diff = diff  # indices (into the call's tensors) of the differentiated ones
        self.forward: Callable[..., Any] | None = None
        self.backward: Callable[..., Any] | None = None
        self.plain: Callable[..., Any] | None = None
        # found while tracing the forward pass:
        self.out_treedef: Any = None
        self.out_float: tuple[bool, ...] = ()
        self.out_shapes: tuple[tuple[int, ...], ...] = ()
        self.fused = False
        self.res_treedef: Any = None
        # per residual leaf: -1 (returned by the forward pass) or the input's index
        self.forwarded: tuple[int, ...] = ()
        self.saved_inputs: tuple[int, ...] = ()  # the distinct inputs among them


def _rebuild_call(fn: Callable[..., Any], call: _Call) -> Callable[[Sequence[Any]], Any]:
    """``arrays`` (one per tensor of ``call``) -> ``fn(params, *args, **kwargs)``."""
    template = copy.copy(call)
    template.backend = None  # type: ignore[assignment]  # no cycle through the jit cache
    template.leaves = list(call.leaves)
    for position in call.tensor_positions:
        template.leaves[position] = None  # never keep the first call's tensors alive

    def run(arrays: Sequence[Any]) -> Any:
        args, kwargs = template.arguments(arrays)
        return fn(*args, **kwargs)

    return run


class LocalJaxBackend:
    """Runs ``jax_function(*args, **kwargs)`` in this process (the ``VjpBackend`` protocol).

    ``args`` / ``kwargs`` are pytrees of torch tensors (other leaves are static: they are
    part of the compilation key and must be hashable). Only tensors that require grad (and
    are floating point or complex) are differentiated.

    ``vjp_calls`` and ``live_residuals`` count forward passes that kept residuals and the
    residual sets not yet released; ``fused_calls`` counts the forward passes of a scalar
    output that computed the gradients too (Note [Scalar outputs]). For tests and debugging.
    """

    def __init__(self, jax_function: Callable[..., Any]) -> None:
        self.jax_function = jax_function
        self._signatures: dict[Any, _Signature] = {}
        self.vjp_calls = 0
        self.fused_calls = 0
        self.live_residuals = 0

    # -- signature cache -------------------------------------------------------------

    def _signature(
        self, call: _Call, tensors: Sequence[torch.Tensor], with_grad: bool
    ) -> _Signature:
        layout = tuple(
            (t.shape, t.dtype, with_grad and _is_differentiable_tensor(t)) for t in tensors
        )
        key = (call.params_spec, call.in_spec, call.statics, call.has_aux, with_grad, layout)
        try:
            signature = self._signatures.get(key)
        except TypeError:
            statics = [type(value).__name__ for _, value in call.statics]
            raise TypeError(
                "every leaf of the arguments that is not a torch.Tensor is passed to the JAX "
                "function as a static (compile-time) value and must be hashable; got "
                f"{statics}. Pass arrays as torch tensors."
            ) from None
        if signature is None:
            diff = tuple(i for i, (_, _, d) in enumerate(layout) if d)
            signature = _Signature(len(tensors), diff)
            self._build(signature, call, with_grad)
            self._signatures[key] = signature
        return signature

    def _build(self, signature: _Signature, call: _Call, with_grad: bool) -> None:
        run = _rebuild_call(self.jax_function, call)
        has_aux = call.has_aux

        def record_outputs(out: Any) -> list[Any]:
            out_leaves, signature.out_treedef = _tree_flatten(out)
            signature.out_float = tuple(_is_inexact(leaf) for leaf in out_leaves)
            signature.out_shapes = tuple(np.shape(leaf) for leaf in out_leaves)
            return out_leaves  # type: ignore[no-any-return]

        if not with_grad:

            def plain(arrays: list[Any]) -> Any:
                result = run(arrays)
                out, aux = _split_aux(result) if has_aux else (result, None)
                return record_outputs(out), aux

            signature.plain = jax.jit(plain)
            return

        diff = signature.diff

        def forward(diff_arrays: list[Any], const_arrays: list[Any]) -> Any:
            def of_diff(diff_values: list[Any]) -> Any:
                arrays = list(const_arrays)
                for index, value in zip(diff, diff_values, strict=True):
                    arrays[index] = value
                return run(arrays)

            if has_aux:
                out, vjp, aux = jax.vjp(of_diff, diff_arrays, has_aux=True)
            else:
                (out, vjp), aux = jax.vjp(of_diff, diff_arrays), None
            out_leaves = record_outputs(out)
            if len(out_leaves) == 1 and _is_real_scalar(out_leaves[0]):
                signature.fused = True  # Note [Scalar outputs]
                (grads,) = vjp(jax.tree_util.tree_unflatten(
                    signature.out_treedef, [jax.numpy.ones_like(out_leaves[0])]
                ))
                return out_leaves, aux, grads
            # Note [Residuals that are inputs]
            inputs = list(const_arrays)
            for index, value in zip(diff, diff_arrays, strict=True):
                inputs[index] = value
            input_index = {id(value): i for i, value in enumerate(inputs)}
            res_leaves, signature.res_treedef = _tree_flatten(vjp)
            forwarded = [input_index.get(id(leaf), -1) for leaf in res_leaves]
            signature.forwarded = tuple(forwarded)
            signature.saved_inputs = tuple(sorted({i for i in forwarded if i >= 0}))
            kept = [leaf for leaf, i in zip(res_leaves, forwarded, strict=True) if i < 0]
            return out_leaves, aux, kept

        def backward(residuals: list[Any], cotangents: list[Any]) -> Any:
            vjp = jax.tree_util.tree_unflatten(signature.res_treedef, residuals)
            (grads,) = vjp(jax.tree_util.tree_unflatten(signature.out_treedef, cotangents))
            return grads

        signature.forward = jax.jit(forward)
        signature.backward = jax.jit(backward)

    # -- flat interface (WrappedJaxFunction) -------------------------------------------

    def flat_call(self, call: _Call, tensors: Sequence[torch.Tensor]) -> tuple[list, Any, Any]:
        """Run without keeping residuals: ``(output tensors, output treedef, aux)``."""
        signature = self._signature(call, tensors, False)
        assert signature.plain is not None
        out_leaves, aux = signature.plain([_to_jax(t) for t in tensors])
        outputs = [_leaf_to_torch(leaf) for leaf in out_leaves]
        return outputs, signature.out_treedef, (_to_torch_tree(aux) if call.has_aux else None)

    def flat_forward(
        self, call: _Call, tensors: Sequence[torch.Tensor]
    ) -> tuple[list, Any, Any, VjpHandle]:
        """Run and keep residuals: ``(output tensors, output treedef, aux, handle)``."""
        signature = self._signature(call, tensors, True)
        arrays = [_to_jax(t) for t in tensors]
        diff = signature.diff
        diff_arrays = [arrays[i] for i in diff]
        const_arrays = list(arrays)
        for i in diff:
            const_arrays[i] = None  # the traced function gets them from `diff_arrays`
        assert signature.forward is not None
        out_leaves, aux, kept = signature.forward(diff_arrays, const_arrays)
        self.vjp_calls += 1
        self.live_residuals += 1
        if signature.fused:
            self.fused_calls += 1
            handle = VjpHandle(signature, None, None, None, kept)
        else:
            saved = signature.saved_inputs
            handle = VjpHandle(
                signature,
                kept,
                [arrays[i] for i in saved] if saved else None,
                [(tensors[i], tensors[i]._version) for i in saved] if saved else None,
                None,
            )
        outputs = [_leaf_to_torch(leaf) for leaf in out_leaves]
        return (
            outputs,
            signature.out_treedef,
            (_to_torch_tree(aux) if call.has_aux else None),
            handle,
        )

    def flat_backward(
        self, handle: VjpHandle, cotangents: Sequence[torch.Tensor], *, retain: bool
    ) -> list[torch.Tensor | None]:
        """Cotangents (one per output leaf) -> one gradient per tensor (``None`` where
        the tensor was not differentiated)."""
        if not handle.live:
            raise RuntimeError(
                "Trying to backward through a WrappedJaxFunction whose residuals were "
                "already freed. Specify retain_graph=True on the first backward call if you "
                "need to backward through the graph a second time."
            )
        signature = handle.signature
        stored_grads, residuals, inputs, versions = (
            handle.grads, handle.residuals, handle.inputs, handle.versions
        )
        if versions:
            _check_versions(versions)
        if not retain:
            handle.drop()
            self.live_residuals -= 1
        if stored_grads is not None:
            diff_grads = _scaled(stored_grads, cotangents[0], fresh=retain)
        else:
            assert residuals is not None and signature.backward is not None
            if inputs:
                saved = dict(zip(signature.saved_inputs, inputs, strict=True))
                kept = iter(residuals)
                residuals = [next(kept) if i < 0 else saved[i] for i in signature.forwarded]
            cts = []
            for is_float, shape, ct in zip(
                signature.out_float, signature.out_shapes, cotangents, strict=True
            ):
                if not is_float:
                    cts.append(np.zeros(shape, _float0))
                elif ct.is_contiguous():
                    cts.append(_to_jax(ct))
                else:  # `.sum()` gives an expanded (stride 0) cotangent, `.t()` a strided one
                    cts.append(_to_jax(ct.contiguous()))
            diff_grads = [_array_to_torch(g) for g in signature.backward(residuals, cts)]
        grads: list[torch.Tensor | None] = [None] * signature.num_tensors
        for index, grad in zip(signature.diff, diff_grads, strict=True):
            grads[index] = grad
        return grads

    def release(self, handle: Any) -> None:
        """Drop the residuals of ``handle`` (idempotent, cheap, safe from a finalizer)."""
        if handle.live:
            handle.drop()
            self.live_residuals -= 1

    # -- VjpBackend (pytrees): adapters over the flat interface --------------------------

    def call(self, args: tuple, kwargs: dict, *, has_aux: bool) -> tuple[Any, Any]:
        """Run the function without keeping residuals. Outputs share JAX's buffers."""
        call, tensors = _tree_call(self, args, kwargs, has_aux)
        outputs, treedef, aux = self.flat_call(call, tensors)
        return treedef.unflatten(outputs), aux

    def call_with_vjp(self, args: tuple, kwargs: dict, *, has_aux: bool) -> tuple[Any, Any, Any]:
        """Run ``jax.vjp`` of the function; the returned handle holds its residuals."""
        call, tensors = _tree_call(self, args, kwargs, has_aux)
        outputs, treedef, aux, handle = self.flat_forward(call, tensors)
        return treedef.unflatten(outputs), aux, _TreeHandle(handle, call)

    def backward(self, handle: Any, cotangents: Any, *, retain: bool) -> tuple[Any, Any]:
        """Gradients for ``(args, kwargs)``; ``None`` where a leaf needs no gradient."""
        call = handle.call
        grads = self.flat_backward(handle.handle, _tree_leaves(cotangents), retain=retain)
        leaves: list[Any] = [None] * call.in_spec.num_leaves
        for position, grad in zip(call.tensor_positions, grads, strict=True):
            leaves[position] = grad
        return call.in_spec.unflatten(leaves)  # type: ignore[no-any-return]


class _TreeHandle:
    """A flat handle with the call it came from (pytree adapters)."""

    __slots__ = ("call", "handle")

    def __init__(self, handle: VjpHandle, call: _Call) -> None:
        self.handle = handle
        self.call = call

    @property
    def live(self) -> bool:
        return self.handle.live

    def drop(self) -> None:
        self.handle.drop()


def _tree_call(
    backend: LocalJaxBackend, args: tuple, kwargs: dict, has_aux: bool
) -> tuple[_Call, list[torch.Tensor]]:
    from .._wrapped import _Call

    return _Call.of_tree(backend, has_aux, args, kwargs)


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


def _is_real_scalar(out: Any) -> bool:
    return (
        isinstance(out, jax.Array)  # a tracer while tracing
        and out.shape == ()
        and bool(jax.numpy.issubdtype(out.dtype, jax.numpy.floating))
    )


def _scaled(grads: list[Any], cotangent: torch.Tensor, *, fresh: bool) -> list[torch.Tensor]:
    """``cotangent * g`` for each stored gradient ``g`` (a JAX array): exact, because the
    vjp is linear in the cotangent. ``fresh`` (the handle keeps ``grads`` for another
    backward) returns copies, so that torch's in-place gradient accumulation cannot write
    into the stored buffers."""
    tensors = [_array_to_torch(g) for g in grads]
    if cotangent.is_cpu:
        scale = float(cotangent)
        if scale == 1.0:
            return [t.clone() for t in tensors] if fresh else tensors
        return [t * scale for t in tensors]
    return [t * cotangent for t in tensors]  # no host sync on an accelerator


def _is_inexact(leaf: Any) -> bool:
    dtype = getattr(leaf, "dtype", None)
    return dtype is not None and bool(jax.numpy.issubdtype(dtype, jax.numpy.inexact))


def _leaf_to_torch(leaf: Any) -> Any:
    if isinstance(leaf, jax.Array):
        return _array_to_torch(leaf)
    return leaf


def _to_torch_tree(tree: Any) -> Any:
    if isinstance(tree, jax.Array):
        return _array_to_torch(tree)
    leaves, treedef = _tree_flatten(tree)
    return treedef.unflatten([_leaf_to_torch(leaf) for leaf in leaves])


def _split_aux(result: Any) -> tuple[Any, Any]:
    if not (isinstance(result, (tuple, list)) and len(result) == 2):
        raise TypeError(
            "with has_aux=True the JAX function must return a pair `(output, aux)`; got "
            f"{type(result).__name__}."
        )
    return result[0], result[1]
