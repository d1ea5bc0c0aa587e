"""One JAX primitive for every torch computation of ``torch_module_to_jax``, and its rules.

``torch_call_p.bind(*arrays, fn=fn)`` runs the ``TorchFn`` ``fn`` (see
``_torch_module_autograd``) in an XLA host callback. ``jax.experimental.buffer_callback``
hands the callback XLA's own buffers (and, on GPU, XLA's stream), so torch reads its inputs
and writes its outputs in place, zero-copy; where it is missing, ``jax.pure_callback`` is the
fallback (its arrays go through the host on GPU).

# Note [Why a primitive]

A ``jax.custom_vjp`` gives reverse mode only: ``jax.jvp``, ``jax.hessian`` (forward over
reverse) fail on it. A primitive gets every transformation from four rules, each written
once for all ``TorchFn``s:

* JVP: the output tangent is another ``torch_call_p`` call, ``Jvp(fn, mask)``, where
  ``mask`` marks the inputs whose tangent is not a symbolic zero: torch marks as requiring
  grad only the inputs JAX differentiates (so ``x.div_(255)`` on an input differentiated
  through its parameters only, or ``F.batch_norm(x, running_mean, ...)`` w.r.t. ``x`` only,
  work as in torch). The module itself becomes ``KeepGraph`` + ``Jvp(Replay)``: Note
  [Randomness and the kept graph];
* transpose: ``Jvp(F, m)`` and ``Vjp(F, m)`` are linear in their last inputs and each
  other's transpose, so reverse mode (``jax.grad`` = JVP, then transpose) runs one forward
  and one ``Vjp``, and second derivatives of either are derivatives of a ``TorchFn`` again;
* batching: the examples run one at a time (``jax.lax.map``), so modules that are not
  batch-aware stay correct and parameters are not given a batch axis;
* lowering: the callback.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import torch
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from .._compat._torch import from_dlpack_capsule, set_grad_mode
from ._convert import _array_to_torch
from ._torch_module_autograd import Aval, KeepGraph, ModuleCall, TorchFn, inexact

try:  # jax >= 0.7: callbacks on XLA's device buffers, zero-copy, on XLA's stream
    from jax.experimental.buffer_callback import (
        ExecutionStage as _ExecutionStage,
        buffer_callback as _buffer_callback,
    )

    _EXECUTE: Any = _ExecutionStage.EXECUTE
except ImportError:  # pragma: no cover - older jax
    # jax without buffer_callback: the name stays, None says the feature is missing
    _buffer_callback = None  # type: ignore[assignment]
    _EXECUTE = None

__all__ = ["torch_call_p"]

torch_call_p = Primitive("torch_module_call")
torch_call_p.multiple_results = True


def _avals(values: Sequence[Any]) -> list[Aval]:
    return [Aval(tuple(v.shape), v.dtype) for v in values]


def _abstract_eval(*avals: Any, fn: TorchFn) -> list[Any]:
    return [jax.core.ShapedArray(a.shape, a.dtype) for a in fn.out_avals(_avals(avals))]


def _impl(*args: Any, fn: TorchFn) -> list[Any]:
    shapes = fn.out_avals(_avals(args))
    if _buffer_callback is not None and _supports_buffer_callback():
        return list(_buffer_callback(_BufferCallback(fn), shapes)(*args))
    return list(jax.pure_callback(_PureCallback(fn), shapes, *args))


def _supports_buffer_callback() -> bool:
    return jax.default_backend() in ("cpu", "gpu", "cuda", "rocm")


def _tangent_zero(value: Any) -> Any:
    return ad.Zero(jax.typeof(value).to_tangent_aval())


def _jvp(primals: Sequence[Any], tangents: Sequence[Any], *, fn: TorchFn) -> Any:
    differentiable = fn.differentiable(_avals(primals))
    mask = tuple(
        d and type(t) is not ad.Zero for d, t in zip(differentiable, tangents, strict=True)
    )
    live = [t for t, m in zip(tangents, mask, strict=True) if m]
    extra: list[Any] = []  # outputs after the module's (KeepGraph's RNG state and token)
    if not live:
        outs = torch_call_p.bind(*primals, fn=fn)
        return outs, [_tangent_zero(o) for o in outs]
    if isinstance(fn, (ModuleCall, KeepGraph)):
        base = fn if isinstance(fn, ModuleCall) else fn.base
        keep_mask = mask if isinstance(fn, ModuleCall) else tuple(
            a or b for a, b in zip(fn.mask, mask, strict=True)
        )
        *outs, state, token = torch_call_p.bind(*primals, fn=base.keep(keep_mask))
        if isinstance(fn, KeepGraph):
            extra = [state, token]
        residuals = [*primals, state, token]
        derivative = base.replay.jvp((*mask, False, False))
    else:
        outs = torch_call_p.bind(*primals, fn=fn)
        residuals = list(primals)
        derivative = fn.jvp(mask)
    computed = iter(torch_call_p.bind(*residuals, *live, fn=derivative))
    out_tangents = [next(computed) if inexact(o.dtype) else _tangent_zero(o) for o in outs]
    return [*outs, *extra], [*out_tangents, *(_tangent_zero(e) for e in extra)]


def _transpose(cts: Sequence[Any], *args: Any, fn: TorchFn) -> list[Any]:
    start = fn.linear_from
    if start is None or any(ad.is_undefined_primal(a) for a in args[:start]):
        raise NotImplementedError(
            f"torch_module_to_jax: `{type(fn).__name__}` is not linear in the inputs being "
            "transposed. Supported: jax.grad / jax.vjp / jax.jvp / jax.linearize and their "
            "compositions (jax.hessian, jax.jacfwd, jax.jacrev)."
        )
    linear = args[start:]
    if all(type(c) is ad.Zero for c in cts):
        return [None] * len(args)
    dense = [ad.instantiate_zeros(c) for c in cts]
    out = torch_call_p.bind(*args[:start], *dense, fn=fn.transpose())
    return [None] * start + [
        o if ad.is_undefined_primal(x) else None for o, x in zip(out, linear, strict=True)
    ]


def _batch(args: Sequence[Any], dims: Sequence[Any], *, fn: TorchFn) -> Any:
    mapped = [i for i, d in enumerate(dims) if d is not None]
    moved = [jax.numpy.moveaxis(args[i], dims[i], 0) for i in mapped]

    def one_example(xs: list[Any]) -> list[Any]:
        full = list(args)
        for i, x in zip(mapped, xs, strict=True):
            full[i] = x
        return list(torch_call_p.bind(*full, fn=fn))

    outs = jax.lax.map(one_example, moved)
    return outs, [0] * len(outs)


torch_call_p.def_impl(_impl)
torch_call_p.def_abstract_eval(_abstract_eval)
ad.primitive_jvps[torch_call_p] = _jvp
ad.primitive_transposes[torch_call_p] = _transpose
batching.primitive_batchers[torch_call_p] = _batch
mlir.register_lowering(torch_call_p, mlir.lower_fun(_impl, multiple_results=True))


# ---------------------------------------------------------------------------------------
# The callbacks


class _BufferCallback:
    """Runs ``fn`` for ``buffer_callback``: inputs are torch views of XLA's buffers
    (zero-copy; valid during the call), outputs are written into XLA's output buffers. On
    GPU, torch runs on XLA's stream."""

    __slots__ = ("__weakref__", "fn", "on_gpu")

    def __init__(self, fn: TorchFn) -> None:
        self.fn = fn
        self.on_gpu = jax.default_backend() in ("gpu", "cuda", "rocm")

    def __eq__(self, other: object) -> bool:  # one compiled executable per function
        return isinstance(other, _BufferCallback) and other.fn is self.fn

    def __hash__(self) -> int:
        return id(self.fn)

    def __call__(self, ctx: Any, outs: Any, *ins: Any) -> None:
        if ctx.stage != _EXECUTE:
            return
        stream = None
        if self.on_gpu:
            try:
                stream = ctx.stream
            except Exception:  # a CPU computation on a machine whose default is GPU
                stream = None
        if stream:
            with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
                self._run(outs, ins, torch.from_dlpack)
        elif self.on_gpu:
            self._run(outs, ins, torch.from_dlpack)
        else:
            # CPU buffers: the capsule straight to torch (about 1 us a buffer less than
            # `torch.from_dlpack`'s protocol negotiation, which only matters for streams)
            self._run(outs, ins, _from_cpu_buffer)

    def _run(self, outs: Any, ins: tuple[Any, ...],
             to_torch: Callable[[Any], torch.Tensor]) -> None:
        results = self.fn.evaluate([to_torch(b) for b in ins])
        # outside autograd: the outputs are written in place (a bare switch: this runs per
        # call, and a callback thread starts with grad mode on)
        enabled = torch.is_grad_enabled()
        set_grad_mode(False)
        try:
            for out, result in zip(outs, results, strict=True):
                to_torch(out).copy_(result)
        finally:
            set_grad_mode(enabled)


def _from_cpu_buffer(buffer: Any) -> torch.Tensor:
    return from_dlpack_capsule(buffer.__dlpack__())


class _PureCallback:
    __slots__ = ("__weakref__", "fn")

    def __init__(self, fn: TorchFn) -> None:
        self.fn = fn

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _PureCallback) and other.fn is self.fn

    def __hash__(self) -> int:
        return id(self.fn)

    def __call__(self, *arrays: Any) -> list[Any]:
        shapes = self.fn.out_avals(_avals(arrays))
        tensors = [_array_to_torch(a, copy=True) for a in arrays]
        return [
            np.asarray(r.detach().cpu()).astype(s.dtype, copy=False)
            for r, s in zip(self.fn.evaluate(tensors), shapes, strict=True)
        ]
