"""``torch_module_to_jax``: call a ``torch.nn.Module`` from JAX code (grad, jit, vmap).

The module runs inside an XLA host callback. ``jax.experimental.buffer_callback`` hands the
callback XLA's own device buffers (and, on GPU, XLA's stream), so torch reads its inputs and
writes its outputs in place, zero-copy, without a host round trip. Where ``buffer_callback``
is missing, ``jax.pure_callback`` is the fallback (its arrays go through the host on GPU).

Gradients come from a ``jax.custom_vjp``: its backward rule runs the module again in a
callback with torch autograd on and returns ``torch.autograd.grad`` of the outputs
(recomputation: no torch graph has to outlive a callback). Output shapes and dtypes, which
``jax.jit`` needs before anything runs, are inferred by running the module on ``meta``
tensors (falling back to fake tensors), once per input signature.

# Note [Buffers, train and eval]

``apply`` is a pure function of ``(params, *args, **kwargs)``, as JAX requires: a callback
can run several times for one call (the backward recomputation, ``vmap`` running examples
one by one). So:

* buffers (BatchNorm running statistics, ...) are a snapshot copied at conversion time and
  are never written back: calling ``apply`` never changes the torch module, and the
  snapshot's running statistics are not updated either;
* the train / eval mode of every submodule is the one the model had at conversion. A model
  in train mode normalises BatchNorm inputs with the statistics of the batch it is given; in
  eval mode it uses the running statistics of the snapshot. Call ``model.eval()`` (or
  ``model.train()``) *before* ``torch_module_to_jax``, and convert again to switch.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import torch

from .._compat._torch import fake_tensor_mode
from .._errors import UnsupportedTensorError
from ._convert import _array_to_torch, _tensor_to_jax
from ._dtype_map import TORCH_TO_NAME

try:  # jax >= 0.7: callbacks on XLA's device buffers, zero-copy, on XLA's stream
    from jax.experimental.buffer_callback import ExecutionStage as _ExecutionStage
    from jax.experimental.buffer_callback import buffer_callback as _buffer_callback

    _EXECUTE: Any = _ExecutionStage.EXECUTE
except ImportError:  # pragma: no cover - older jax
    _buffer_callback = None  # type: ignore[assignment]
    _EXECUTE = None

__all__ = ["torch_module_to_jax"]

_Tensor = torch.Tensor
_tree_flatten: Callable[..., Any] = jax.tree_util.tree_flatten
# Under vmap the module sees one example at a time: correct for any module. (The batched
# methods of the callback APIs also add a batch axis to the parameters, which modules do
# not expect.)
_VMAP_METHOD = "sequential"


def _is_array(leaf: Any) -> bool:
    return isinstance(leaf, (jax.Array, np.ndarray, np.generic))


def _jax_dtype(dtype: torch.dtype) -> np.dtype:
    name = TORCH_TO_NAME.get(dtype)
    if name is None:
        raise UnsupportedTensorError(
            f"the module returned a tensor of dtype `{dtype}`, which has no JAX counterpart."
        )
    return jax.dtypes.canonicalize_dtype(np.dtype(getattr(jax.numpy, name)))


# ---------------------------------------------------------------------------------------
# Running the module with given parameter tensors


class _ModuleRunner:
    """A private structural copy of the module whose parameter slots are filled per call.

    The copy shares no state with the user's module: its buffers are a snapshot (see Note
    [Buffers, train and eval]), and its parameter slots hold the callback's tensors only
    while a call runs. Filling ``_parameters`` entries directly costs ~0.1 us per
    parameter, against tens of microseconds for ``torch.func.functional_call``.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        params = list(model.parameters())  # unique, in named_parameters() order
        buffers = [b for b in model.buffers()]
        memo: dict[int, Any] = {id(p): p for p in params}
        memo.update({id(b): b.detach().clone() for b in buffers})
        self.module = copy.deepcopy(model, memo)
        index = {id(p): i for i, p in enumerate(params)}
        self.slots: list[tuple[dict[str, Any], str, int]] = []
        self.buffer_slots: list[tuple[dict[str, Any], str, torch.Tensor]] = []
        sub: torch.nn.Module
        for sub in self.module.modules():
            for name, value in sub._parameters.items():
                if value is not None:
                    self.slots.append((sub._parameters, name, index[id(value)]))
            for name, buffer in sub._buffers.items():
                if buffer is not None:
                    self.buffer_slots.append((sub._buffers, name, buffer))
        self.originals = params
        self.lock = threading.RLock()  # XLA may run callbacks from several threads

    def __call__(self, params: list[torch.Tensor], args: tuple, kwargs: dict) -> Any:
        slots = self.slots
        with self.lock:
            for slot, name, i in slots:
                slot[name] = params[i]
            try:
                return self.module(*args, **kwargs)
            finally:
                originals = self.originals
                for slot, name, i in slots:
                    slot[name] = originals[i]

    def infer_outputs(self, params: list[torch.Tensor], args: tuple, kwargs: dict) -> Any:
        """Run on tensors without data (meta, then fake) to learn output shapes/dtypes."""
        errors = []
        with self.lock, torch.no_grad():
            try:
                meta = [torch.empty_like(p, device="meta") for p in params]
                with self._buffers_as(lambda b: torch.empty_like(b, device="meta")):
                    return self(meta, *_to_meta((args, kwargs)))
            except Exception as error:
                errors.append(f"meta tensors: {type(error).__name__}: {error}")
            try:
                with fake_tensor_mode(allow_non_fake_inputs=True) as mode:
                    fake: list[torch.Tensor] = [
                        mode.from_tensor(torch.empty_like(p, device="cpu")) for p in params
                    ]
                    fargs, fkwargs = _map_tensors(
                        (args, kwargs),
                        lambda t: mode.from_tensor(torch.empty_like(t, device="cpu")),
                    )
                    with self._buffers_as(lambda b: mode.from_tensor(b)):
                        return self(fake, fargs, fkwargs)
            except Exception as error:
                errors.append(f"fake tensors: {type(error).__name__}: {error}")
        raise RuntimeError(
            "could not infer the output shapes of the torch module without running it ("
            + "; ".join(errors)
            + "). Pass `example_output=` (a tensor or pytree of tensors shaped like the "
            "module's output for one call) to `torch_module_to_jax`."
        )

    def _buffers_as(self, make: Callable[[torch.Tensor], torch.Tensor]) -> Any:
        runner = self

        class _Swap:
            def __enter__(self) -> None:
                for slot, name, value in runner.buffer_slots:
                    slot[name] = make(value)

            def __exit__(self, *exc: Any) -> None:
                for slot, name, value in runner.buffer_slots:
                    slot[name] = value

        return _Swap()


def _map_tensors(tree: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    leaves, treedef = _tree_flatten(tree)
    return treedef.unflatten([fn(x) if isinstance(x, _Tensor) else x for x in leaves])


def _to_meta(tree: Any) -> Any:
    return _map_tensors(tree, lambda t: torch.empty_like(t, device="meta"))


# ---------------------------------------------------------------------------------------
# One compiled call signature


class _Signature:
    """The custom_vjp function for one argument structure (arrays are traced, rest static)."""

    def __init__(
        self,
        owner: _TorchModuleFunction,
        treedef: Any,
        array_positions: tuple[int, ...],
        statics: dict[int, Any],
    ) -> None:
        self.owner = owner
        self.treedef = treedef
        self.array_positions = array_positions
        self.statics = statics
        self.num_leaves = treedef.num_leaves
        self.out_info: dict[Any, tuple[Any, list[jax.ShapeDtypeStruct]]] = {}

        @jax.custom_vjp
        def core(*arrays: Any) -> Any:
            return self._forward(arrays)

        def core_fwd(*arrays: Any) -> tuple[Any, Any]:
            return self._forward(arrays), arrays

        def core_bwd(arrays: Any, cotangents: Any) -> tuple[Any, ...]:
            return self._backward(arrays, cotangents)

        core.defvjp(core_fwd, core_bwd)
        self.function = jax.jit(core)
        self.forward_callback = self._make_forward_callback()
        self.backward_callback = self._make_backward_callback()

    # -- torch side ------------------------------------------------------------------

    def _torch_call(self, tensors: list[torch.Tensor], infer: bool = False) -> Any:
        num_params = self.owner.num_params
        leaves: list[Any] = [None] * self.num_leaves
        for position, value in self.statics.items():
            leaves[position] = value
        for position, tensor in zip(self.array_positions, tensors[num_params:], strict=True):
            leaves[position] = tensor
        _params, args, kwargs = self.treedef.unflatten(leaves)
        runner = self.owner.runner
        if infer:
            return runner.infer_outputs(tensors[:num_params], args, kwargs)
        return runner(tensors[:num_params], args, kwargs)

    def _outputs(self, arrays: tuple[Any, ...]) -> tuple[Any, list[jax.ShapeDtypeStruct]]:
        key = tuple((a.shape, a.dtype) for a in arrays)
        info = self.out_info.get(key)
        if info is None:
            example = self.owner.example_output
            if example is None:
                tensors = [
                    torch.empty(a.shape, dtype=_torch_dtype(a.dtype), device="meta") for a in arrays
                ]
                example = self._torch_call(tensors, infer=True)
            leaves, out_treedef = _tree_flatten(example)
            shapes = []
            for leaf in leaves:
                if isinstance(leaf, _Tensor):
                    dtype = _jax_dtype(leaf.dtype)
                elif hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
                    dtype = jax.dtypes.canonicalize_dtype(leaf.dtype)
                else:
                    raise TypeError(
                        "the torch module must return tensors (or pytrees of tensors); got "
                        f"a leaf of type `{type(leaf).__name__}`."
                    )
                shapes.append(jax.ShapeDtypeStruct(tuple(leaf.shape), dtype))
            info = (out_treedef, shapes)
            self.out_info[key] = info
        return info

    # -- JAX side --------------------------------------------------------------------

    def _forward(self, arrays: tuple[Any, ...]) -> Any:
        out_treedef, shapes = self._outputs(arrays)
        flat = self.owner.callback(
            self.forward_callback, self.backward_callback, shapes, arrays, forward=True
        )
        return out_treedef.unflatten(flat)

    def _backward(self, arrays: tuple[Any, ...], cotangents: Any) -> tuple[Any, ...]:
        out_treedef, shapes = self._outputs(arrays)
        cts = out_treedef.flatten_up_to(cotangents)
        differentiable = [_inexact(a.dtype) for a in arrays]
        grad_shapes = [
            jax.ShapeDtypeStruct(a.shape, a.dtype)
            for a, d in zip(arrays, differentiable, strict=True)
            if d
        ]
        float_cts = [
            jax.numpy.asarray(ct, s.dtype)
            for ct, s in zip(cts, shapes, strict=True)
            if _inexact(s.dtype)
        ]
        flat = self.owner.callback(
            self.forward_callback,
            self.backward_callback,
            grad_shapes,
            (*arrays, *float_cts),
            forward=False,
        )
        grads = iter(flat)
        return tuple(next(grads) if d else None for d in differentiable)

    def _make_forward_callback(self) -> Callable[..., Any]:
        def run_forward(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
            with torch.no_grad():
                out = self._torch_call(tensors)
            return jax.tree_util.tree_leaves(out)

        return run_forward

    def _make_backward_callback(self) -> Callable[..., Any]:
        def run_backward(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
            n = len(self.array_positions) + self.owner.num_params
            inputs, cts = tensors[:n], tensors[n:]
            inputs = [
                t.detach().requires_grad_() if (t.is_floating_point() or t.is_complex()) else t
                for t in inputs
            ]
            with torch.enable_grad():
                out = jax.tree_util.tree_leaves(self._torch_call(inputs))
            wrt = [t for t in inputs if t.requires_grad]
            pairs = [
                (o, c)
                for o, c in zip(
                    [o for o in out if o.is_floating_point() or o.is_complex()], cts, strict=True
                )
                if o.requires_grad
            ]
            grads: tuple[torch.Tensor | None, ...]
            if pairs and wrt:
                grads = torch.autograd.grad(
                    [o for o, _ in pairs],
                    wrt,
                    [c.to(o.dtype) for o, c in pairs],
                    allow_unused=True,
                )
            else:
                grads = (None,) * len(wrt)
            return [
                torch.zeros_like(w) if g is None else g for w, g in zip(wrt, grads, strict=True)
            ]

        return run_backward


def _inexact(dtype: Any) -> bool:
    return bool(jax.numpy.issubdtype(dtype, jax.numpy.inexact))


def _torch_dtype(dtype: Any) -> torch.dtype:
    from ._dtype_map import numpy_to_torch_dtype

    return numpy_to_torch_dtype(np.dtype(dtype))


# ---------------------------------------------------------------------------------------
# The callable returned to the user


class _TorchModuleFunction:
    """``apply(params, *args, **kwargs)``: the module as a JAX function."""

    def __init__(self, model: torch.nn.Module, example_output: Any) -> None:
        self.runner = _ModuleRunner(model)
        self.num_params = len(self.runner.originals)
        self.example_output = example_output
        self.signatures: dict[Any, _Signature] = {}
        self.__name__ = f"{type(model).__name__}_as_jax"

    def __call__(self, params: Any, *args: Any, **kwargs: Any) -> Any:
        leaves, treedef = _tree_flatten((params, args, kwargs))
        arrays = []
        array_positions = []
        statics = []
        for i, leaf in enumerate(leaves):
            if _is_array(leaf):
                arrays.append(leaf)
                if i >= self.num_params:
                    array_positions.append(i)
            elif isinstance(leaf, _Tensor):
                raise TypeError(
                    "`apply` takes JAX arrays, got a torch.Tensor; convert it with "
                    "`torch_to_jax` (or call the torch module directly)."
                )
            else:
                statics.append((i, leaf))
        if len(jax.tree_util.tree_leaves(params)) != self.num_params:
            raise ValueError(
                f"`params` must hold the module's {self.num_params} parameters (as returned "
                f"by `torch_module_to_jax`), got {len(jax.tree_util.tree_leaves(params))}."
            )
        key = (treedef, tuple(statics))
        try:
            signature = self.signatures.get(key)
        except TypeError:
            raise TypeError(
                "arguments of `apply` that are not arrays are passed to the module as static "
                "values and must be hashable; got "
                f"{[type(v).__name__ for _, v in statics]}."
            ) from None
        if signature is None:
            signature = _Signature(self, treedef, tuple(array_positions), dict(statics))
            self.signatures[key] = signature
        return signature.function(*arrays)

    def callback(
        self,
        forward_callback: Callable[..., Any],
        backward_callback: Callable[..., Any],
        shapes: list[jax.ShapeDtypeStruct],
        arrays: tuple[Any, ...],
        *,
        forward: bool,
    ) -> list[Any]:
        run = forward_callback if forward else backward_callback
        if _buffer_callback is not None and _supports_buffer_callback():
            call = _buffer_callback(_BufferCallback(run), shapes, vmap_method=_VMAP_METHOD)
            return list(call(*arrays))
        return list(
            jax.pure_callback(_PureCallback(run), shapes, *arrays, vmap_method=_VMAP_METHOD)
        )


def _supports_buffer_callback() -> bool:
    return jax.default_backend() in ("cpu", "gpu", "cuda", "rocm")


class _BufferCallback:
    """Adapts a ``list[Tensor] -> list[Tensor]`` function to ``buffer_callback``.

    Inputs are torch views of XLA's buffers (zero-copy; valid only during the call) and
    outputs are written into XLA's output buffers. On GPU, torch runs on XLA's stream.
    """

    __slots__ = ("__weakref__", "on_gpu", "run")

    def __init__(self, run: Callable[[list[torch.Tensor]], list[torch.Tensor]]) -> None:
        self.run = run
        self.on_gpu = jax.default_backend() in ("gpu", "cuda", "rocm")

    def __eq__(self, other: object) -> bool:  # one compiled executable per function
        return isinstance(other, _BufferCallback) and other.run is self.run

    def __hash__(self) -> int:
        return hash(self.run)

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
                self._run(outs, ins)
        else:
            self._run(outs, ins)

    def _run(self, outs: Any, ins: tuple[Any, ...]) -> None:
        tensors = [torch.from_dlpack(b) for b in ins]
        results = self.run(tensors)
        for out, result in zip(outs, results, strict=True):
            torch.from_dlpack(out).copy_(result)


class _PureCallback:
    __slots__ = ("__weakref__", "run")

    def __init__(self, run: Callable[[list[torch.Tensor]], list[torch.Tensor]]) -> None:
        self.run = run

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _PureCallback) and other.run is self.run

    def __hash__(self) -> int:
        return hash(self.run)

    def __call__(self, *arrays: Any) -> list[Any]:
        tensors = [_array_to_torch(a, copy=True) for a in arrays]
        return [np.asarray(r.detach().cpu()) for r in self.run(tensors)]


def torch_module_to_jax(
    model: torch.nn.Module,
    example_output: Any = None,
) -> tuple[Callable[..., Any], tuple[jax.Array, ...]]:
    """Turn a torch module into a pure JAX function ``apply`` and its parameters.

    Returns ``(apply, params)``: ``params`` is a tuple of JAX arrays, one per
    ``model.parameters()`` entry (tied parameters once), **copied** at conversion (they do
    not share memory with the module's parameters, so training either side leaves the other
    alone). ``apply(params, *args, **kwargs)`` runs the module with those parameters:

    * eagerly, and under ``jax.grad`` / ``jax.value_and_grad`` with respect to ``params``
      and any floating-point argument (the backward pass is torch autograd);
    * under ``jax.jit`` without ``example_output``: output shapes and dtypes are inferred
      by running the module on meta (or fake) tensors once per input signature.
      ``example_output`` (a tensor or pytree of tensors) is still accepted and skips that;
    * under ``jax.vmap``: the module sees one example at a time (the callback's
      ``vmap_method="sequential"``), so modules that are not batch-aware are correct.

    Array arguments are traced; other leaves of the arguments (ints, strings, flags) are
    passed to the module as static, hashable values. Inside the callback torch reads XLA's
    buffers zero-copy (``buffer_callback``; on GPU on XLA's stream). Buffers and train/eval
    mode are snapshotted at conversion: see Note [Buffers, train and eval] in this module.
    """
    function = _TorchModuleFunction(model, example_output)
    params = tuple(_tensor_to_jax(p.detach(), copy=True) for p in function.runner.originals)
    return function, params
