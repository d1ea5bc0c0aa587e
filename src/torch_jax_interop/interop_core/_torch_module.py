"""``torch_module_to_jax``: call a ``torch.nn.Module`` from JAX code (grad, jit, vmap, jvp).

The module runs inside an XLA host callback, one JAX primitive per torch computation (the
call, its forward graph, its JVP and VJP, to any order): see Note [Why a primitive] in
``_torch_module_primitive`` and Note [Randomness and the kept graph] in
``_torch_module_autograd``. Output shapes and dtypes, which ``jax.jit`` needs before
anything runs, are inferred by running the module on ``meta`` tensors (falling back to fake
tensors), once per input signature.

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

import collections
import copy
import threading
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import torch

from .._compat._torch import fake_tensor_mode
from .._errors import UnsupportedTensorError
from ._convert import _tensor_to_jax
from ._dtype_map import TORCH_TO_NAME
from ._torch_module_autograd import ModuleCall
from ._torch_module_primitive import torch_call_p

__all__ = ["torch_module_to_jax"]

_Tensor = torch.Tensor
_tree_flatten: Callable[..., Any] = jax.tree_util.tree_flatten


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
    """One argument structure (arrays are traced, the rest static): its ``ModuleCall``."""

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
        self.call = ModuleCall(
            owner.num_params + len(array_positions),
            self._run,
            lambda avals: self._outputs(avals)[1],
            owner.rng_devices,
        )

        def call(*arrays: Any) -> Any:
            out_treedef, _ = self._outputs(arrays)
            return out_treedef.unflatten(torch_call_p.bind(*arrays, fn=self.call))

        self.function = jax.jit(call)

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

    def _run(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        return _tree_flatten(_as_tensors(self._torch_call(tensors)))[0]

    def _outputs(self, arrays: Any) -> tuple[Any, list[jax.ShapeDtypeStruct]]:
        key = tuple((tuple(a.shape), np.dtype(a.dtype)) for a in arrays)
        info = self.out_info.get(key)
        if info is None:
            example = self.owner.example_output
            if example is None:
                tensors = [
                    torch.empty(shape, dtype=_torch_dtype(dtype), device="meta")
                    for shape, dtype in key
                ]
                example = self._torch_call(tensors, infer=True)
            leaves, out_treedef = _tree_flatten(_as_tensors(example))
            shapes = []
            for leaf in leaves:
                if isinstance(leaf, _Tensor):
                    dtype = _jax_dtype(leaf.dtype)
                elif hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
                    dtype = jax.dtypes.canonicalize_dtype(leaf.dtype)
                else:
                    raise TypeError(
                        "the torch module must return tensors, Python scalars (bool, int, "
                        "float) or pytrees of them (tuples, lists, dicts, namedtuples, "
                        f"torch.return_types); got a leaf of type `{type(leaf).__name__}`."
                    )
                shapes.append(jax.ShapeDtypeStruct(tuple(leaf.shape), dtype))
            info = (out_treedef, shapes)
            self.out_info[key] = info
        return info


_STRUCTSEQ_TYPES: dict[type, type] = {}


def _as_tensors(tree: Any) -> Any:
    """The module's output as JAX can flatten it: ``torch.return_types`` (structseqs) become
    namedtuples of the same name and fields, Python scalars 0-d tensors."""
    if isinstance(tree, (_Tensor, np.ndarray)) or tree is None:
        return tree
    if isinstance(tree, (bool, int, float)):
        return torch.tensor(tree)
    if isinstance(tree, tuple) and hasattr(type(tree), "n_sequence_fields"):
        kind = type(tree)
        named = _STRUCTSEQ_TYPES.get(kind)
        if named is None:
            fields = getattr(kind, "__match_args__", None) or tuple(
                f"field{i}" for i in range(len(tree))
            )
            named = _STRUCTSEQ_TYPES.setdefault(
                kind, collections.namedtuple(kind.__name__, fields)
            )
        return named(*(_as_tensors(v) for v in tree))
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(_as_tensors(v) for v in tree))
    if isinstance(tree, (tuple, list)):
        return type(tree)(_as_tensors(v) for v in tree)
    if isinstance(tree, dict):
        return type(tree)((k, _as_tensors(v)) for k, v in tree.items())
    return tree


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
        self.rng_devices = _cuda_devices(model)
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


def _cuda_devices(model: torch.nn.Module) -> tuple[int, ...]:
    """CUDA devices whose generators the module may draw from (its tensors' devices, and
    torch's current device when JAX computes on GPU): their RNG states are recorded."""
    tensors = [*model.parameters(), *model.buffers()]
    devices = {t.device.index or 0 for t in tensors if t.is_cuda}
    if jax.default_backend() in ("gpu", "cuda", "rocm") and torch.cuda.is_available():
        devices.add(torch.cuda.current_device())
    return tuple(sorted(devices))


def torch_module_to_jax(
    model: torch.nn.Module,
    example_output: Any = None,
) -> tuple[Callable[..., Any], tuple[jax.Array, ...]]:
    """Turn a torch module into a pure JAX function ``apply`` and its parameters.

    Returns ``(apply, params)``: ``params`` is a tuple of JAX arrays, one per
    ``model.parameters()`` entry (tied parameters once), **copied** at conversion (they do
    not share memory with the module's parameters, so training either side leaves the other
    alone). ``apply(params, *args, **kwargs)`` runs the module with those parameters:

    * eagerly, and under ``jax.grad`` / ``jax.value_and_grad`` / ``jax.vjp`` with respect
      to ``params`` and any floating-point argument: the backward pass is torch autograd on
      the forward's own graph where JAX runs forward and backward in order (eager, jit),
      else a re-run with the forward's RNG state; torch marks as requiring grad only the
      inputs JAX differentiates;
    * under ``jax.jvp``, ``jax.linearize``, ``jax.hessian`` and any composition of
      derivatives (torch autograd with ``create_graph``; the module's ops need a double
      backward, as for ``torch.autograd.functional.hessian``);
    * under ``jax.jit`` without ``example_output``: output shapes and dtypes are inferred
      by running the module on meta (or fake) tensors once per input signature.
      ``example_output`` (a tensor or pytree of tensors) is still accepted and skips that;
    * under ``jax.vmap``: the module sees one example at a time, so modules that are not
      batch-aware are correct.

    The module may return tensors, Python scalars (returned as 0-d arrays) and pytrees of
    them (tuples, lists, dicts, namedtuples; ``torch.return_types`` such as ``torch.max(x,
    dim)`` come back as namedtuples with the same fields). Random draws (dropout) in a
    differentiated call are the forward's, in the backward too; a module that writes to its
    inputs in place gets copies of them and never changes a JAX array (see Note [In-place
    writes to inputs] in ``_torch_module_autograd``).

    Array arguments are traced; other leaves of the arguments (ints, strings, flags) are
    passed to the module as static, hashable values. Inside the callback torch reads XLA's
    buffers zero-copy (``buffer_callback``; on GPU on XLA's stream). Buffers and train/eval
    mode are snapshotted at conversion: see Note [Buffers, train and eval] in this module.

    Args:
        model: The torch module; its parameters are copied, its buffers and train/eval mode
            taken as they are now.
        example_output: Optional: a tensor or pytree of tensors shaped like the module's
            output for one call, which spares ``jax.jit`` the shape inference.

    Returns:
        ``(apply, params)``: the pure JAX function ``apply(params, *args, **kwargs)`` and a
        tuple of JAX arrays holding copies of the module's parameters.

    Raises:
        TypeError: (on a call of ``apply``) a torch tensor among the arguments, or a
            non-array argument that is not hashable.
        ValueError: (on a call of ``apply``) ``params`` does not hold the module's parameters.
        RuntimeError: (under ``jax.jit``) the output shapes could not be inferred without
            ``example_output``.
    """
    function = _TorchModuleFunction(model, example_output)
    params = tuple(_tensor_to_jax(p.detach(), copy=True) for p in function.runner.originals)
    return function, params
