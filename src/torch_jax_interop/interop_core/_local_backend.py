"""``LocalJaxBackend``: runs a JAX function in this process for ``WrappedJaxFunction``.

The forward pass is one jitted call. With gradients, one jitted ``jax.vjp`` returns the
outputs and the vjp function (its residuals are ordinary JAX arrays, its jaxpr is static
pytree metadata); backward applies that vjp function in a second jitted function. Both are
compiled once per input signature (pytree structure, static leaves, which leaves need a
gradient, shapes and dtypes): calling again never re-traces the user's function.

Memory: input tensors reach JAX zero-copy where their layout allows (see Note [Memory
sharing and copies] in ``_convert``); outputs and gradients are torch tensors that share the
buffers JAX produced. Residuals may alias input tensors (a parameter, an input), exactly as
torch's own saved tensors do.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import torch

from ._convert import _array_to_torch, _tensor_to_jax

_Tensor = torch.Tensor
_tree_flatten: Callable[..., Any] = jax.tree_util.tree_flatten
_tree_leaves = jax.tree_util.tree_leaves
_float0 = jax.dtypes.float0


def _apply_vjp(vjp_function: Any, cotangents: Any) -> Any:
    return vjp_function(cotangents)


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
    """What ``call_with_vjp`` keeps for ``backward``: the jitted vjp function (residuals).

    ``vjp`` is ``None`` once the residuals were released.
    """

    __slots__ = ("signature", "vjp")

    def __init__(self, signature: _Signature, vjp: Any) -> None:
        self.signature = signature
        self.vjp = vjp


class _Signature:
    """Everything cached for one input structure: jitted functions and output layout."""

    __slots__ = (
        "diff_positions",
        "grad_treedef",
        "in_treedef",
        "num_leaves",
        "out_float",
        "out_shapes",
        "out_treedef",
        "plain",
        "tensor_positions",
        "vjp",
    )

    def __init__(
        self,
        in_treedef: Any,
        tensor_positions: tuple[int, ...],
        diff_positions: tuple[int, ...],
    ) -> None:
        self.in_treedef = in_treedef
        self.tensor_positions = tensor_positions
        self.diff_positions = diff_positions
        self.num_leaves = in_treedef.num_leaves
        self.plain: Callable[..., Any] | None = None
        self.vjp: Callable[..., Any] | None = None
        self.out_float: tuple[bool, ...] | None = None
        self.out_shapes: tuple[tuple[int, ...], ...] | None = None
        self.out_treedef: Any = None


class LocalJaxBackend:
    """Runs ``jax_function(*args, **kwargs)`` in this process (the ``VjpBackend`` protocol).

    ``args`` / ``kwargs`` are pytrees of torch tensors (other leaves are static: they are
    part of the compilation key and must be hashable). Only tensors that require grad (and
    are floating point or complex) are differentiated.

    ``vjp_calls`` and ``live_residuals`` count forward passes that kept residuals and the
    residual sets not yet released (for tests and debugging).
    """

    def __init__(self, jax_function: Callable[..., Any]) -> None:
        self.jax_function = jax_function
        self._signatures: dict[Any, _Signature] = {}
        self._apply_vjp = jax.jit(_apply_vjp)
        self.vjp_calls = 0
        self.live_residuals = 0

    # -- signature cache -------------------------------------------------------------

    def _signature(self, args: tuple, kwargs: dict, with_grad: bool) -> tuple[_Signature, list]:
        leaves, treedef = _tree_flatten((args, kwargs))
        arrays: list[Any] = []
        tensor_positions = []
        statics = []
        diff = []
        for i, leaf in enumerate(leaves):
            if isinstance(leaf, _Tensor):
                tensor_positions.append(i)
                if with_grad and _is_differentiable_tensor(leaf):
                    diff.append(len(arrays))
                arrays.append(_to_jax(leaf))
            else:
                statics.append((i, leaf))
        key = (treedef, tuple(statics), tuple(diff), with_grad)
        try:
            signature = self._signatures.get(key)
        except TypeError:
            raise TypeError(
                "every leaf of the arguments that is not a torch.Tensor is passed to the JAX "
                "function as a static (compile-time) value and must be hashable; got "
                f"{[type(v).__name__ for _, v in statics]}. Pass arrays as torch tensors."
            ) from None
        if signature is None:
            signature = _Signature(treedef, tuple(tensor_positions), tuple(diff))
            self._build(signature, dict(statics))
            self._signatures[key] = signature
        return signature, arrays

    def _build(self, signature: _Signature, statics: dict[int, Any]) -> None:
        fn = self.jax_function
        treedef = signature.in_treedef
        tensor_positions = signature.tensor_positions
        num_leaves = signature.num_leaves

        def rebuild(arrays: list[Any]) -> tuple[tuple, dict]:
            leaves: list[Any] = [None] * num_leaves
            for position, value in statics.items():
                leaves[position] = value
            for position, array in zip(tensor_positions, arrays, strict=True):
                leaves[position] = array
            return treedef.unflatten(leaves)

        def plain(arrays: list[Any]) -> Any:
            args, kwargs = rebuild(arrays)
            return fn(*args, **kwargs)

        diff_positions = signature.diff_positions

        def with_vjp(diff_arrays: list[Any], const_arrays: list[Any], has_aux: bool) -> Any:
            def of_diff(diff: list[Any]) -> Any:
                arrays = list(const_arrays)
                for index, array in zip(diff_positions, diff, strict=True):
                    arrays[index] = array
                args, kwargs = rebuild(arrays)
                return fn(*args, **kwargs)

            if has_aux:
                out, vjp, aux = jax.vjp(of_diff, diff_arrays, has_aux=True)
                return out, aux, vjp
            out, vjp = jax.vjp(of_diff, diff_arrays)
            return out, None, vjp

        signature.plain = jax.jit(plain)
        signature.vjp = jax.jit(with_vjp, static_argnums=2)

    # -- VjpBackend ------------------------------------------------------------------

    def call(self, args: tuple, kwargs: dict, *, has_aux: bool) -> tuple[Any, Any]:
        """Run the function without keeping residuals. Outputs share JAX's buffers."""
        signature, arrays = self._signature(args, kwargs, False)
        assert signature.plain is not None
        result = signature.plain(arrays)
        if has_aux:
            out, aux = _split_aux(result)
            return _to_torch_tree(out), _to_torch_tree(aux)
        return _to_torch_tree(result), None

    def call_with_vjp(self, args: tuple, kwargs: dict, *, has_aux: bool) -> tuple[Any, Any, Any]:
        """Run ``jax.vjp`` of the function; the returned handle holds its residuals."""
        signature, arrays = self._signature(args, kwargs, True)
        diff_positions = signature.diff_positions
        diff_arrays = [arrays[i] for i in diff_positions]
        for i in diff_positions:
            arrays[i] = None  # the traced function gets them from `diff_arrays`
        assert signature.vjp is not None
        out, aux, vjp = signature.vjp(diff_arrays, arrays, has_aux)
        out_leaves, out_treedef = _tree_flatten(out)
        if signature.out_float is None:
            signature.out_float = tuple(_is_inexact(leaf) for leaf in out_leaves)
            signature.out_shapes = tuple(np.shape(leaf) for leaf in out_leaves)
            signature.out_treedef = out_treedef
        self.vjp_calls += 1
        self.live_residuals += 1
        outputs = out_treedef.unflatten([_leaf_to_torch(leaf) for leaf in out_leaves])
        return outputs, (_to_torch_tree(aux) if has_aux else None), VjpHandle(signature, vjp)

    def backward(self, handle: Any, cotangents: Any, *, retain: bool) -> tuple[Any, Any]:
        """Gradients for ``(args, kwargs)``; ``None`` where a leaf needs no gradient."""
        vjp = handle.vjp
        if vjp is None:
            raise RuntimeError(
                "Trying to backward through a WrappedJaxFunction whose residuals were "
                "already freed. Specify retain_graph=True on the first backward call if you "
                "need to backward through the graph a second time."
            )
        if not retain:
            handle.vjp = None
            self.live_residuals -= 1
        signature: _Signature = handle.signature
        out_float = signature.out_float
        out_shapes = signature.out_shapes
        assert out_float is not None and out_shapes is not None
        cts = []
        for is_float, shape, ct in zip(
            out_float, out_shapes, _tree_leaves(cotangents), strict=True
        ):
            if not is_float:
                cts.append(np.zeros(shape, _float0))
            elif ct.is_contiguous():
                cts.append(_to_jax(ct))
            else:  # `.sum()` gives an expanded (stride 0) cotangent, `.t()` a strided one
                cts.append(_to_jax(ct.contiguous()))
        (diff_grads,) = self._apply_vjp(vjp, signature.out_treedef.unflatten(cts))
        grads: list[Any] = [None] * signature.num_leaves
        tensor_positions = signature.tensor_positions
        for index, grad in zip(signature.diff_positions, diff_grads, strict=True):
            grads[tensor_positions[index]] = _array_to_torch(grad)
        return signature.in_treedef.unflatten(grads)  # type: ignore[no-any-return]

    def release(self, handle: Any) -> None:
        """Drop the residuals of ``handle`` (idempotent, cheap, safe from a finalizer)."""
        if handle.vjp is not None:
            handle.vjp = None
            self.live_residuals -= 1


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
