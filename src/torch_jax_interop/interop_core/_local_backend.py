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

from .._async import CallExecutor, library_executor
from .._compat._jax import ARRAY_TYPE, DLPackFastPath, is_single_cpu_buffer
from .._compat._torch import from_dlpack_capsule
from .._engine import Engine, Program, Residuals
from ._convert import _array_to_torch, _tensor_to_jax

if TYPE_CHECKING:
    from .._call import Call

_Tensor = torch.Tensor
_is_grad_enabled = torch.is_grad_enabled
_tree_flatten: Callable[..., Any] = jax.tree_util.tree_flatten


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

    ``Tensor.numpy()`` itself refuses what a numpy view cannot carry (another device, a
    conjugate or negative bit, ``requires_grad`` under grad mode, a layout that is not
    strided): on the hot path one call replaces checking each of those first (about 1 us a
    tensor), and the rare refusals take the conversion core, which handles them.
    """
    if t.dtype in _NUMPY_DTYPES and (
        _Platform.numpy_args if _Platform.numpy_args is not None else _Platform.probe()
    ):
        try:
            return t.numpy()
        except (RuntimeError, TypeError):
            if t.requires_grad and t.is_cpu and not (t.is_conj() or t.is_neg()):
                try:
                    return t.detach().numpy()
                except (RuntimeError, TypeError):
                    pass
    return _tensor_to_jax(t.detach() if t.requires_grad else t)


class _Plan:
    """How one program's tensors cross the bridge, decided once per signature (the
    dtypes, devices and shardings of its inputs and outputs are fixed by it).

    ``numpy_inputs``: every input's dtype has an exact numpy view and jit takes numpy
    arguments (``_to_jax``'s first case), so the arguments are ``[t.numpy() ...]``: one
    C call each, the rare refusal falling back to ``_to_jax``. After the first run (until
    then ``None``): ``export_outputs`` / ``export_grads``, every output (gradient) is one
    CPU buffer and ``_array_to_torch`` accepted its dtype, so later runs export without
    its per-array checks (any error falls back to it); ``numpy_cotangents``, the
    cotangents (the outputs' dtypes) take the numpy path too.
    """

    __slots__ = ("export_grads", "export_outputs", "numpy_cotangents", "numpy_inputs")

    def __init__(self, dtypes: Sequence[torch.dtype]) -> None:
        self.numpy_inputs = _numpy_dtypes(dtypes)
        self.export_outputs: bool | None = None
        self.export_grads: bool | None = None
        self.numpy_cotangents = False

    def learn_outputs(self, leaves: Sequence[Any], outputs: Sequence[Any]) -> None:
        self.numpy_cotangents = all(isinstance(t, _Tensor) for t in outputs) and \
            _numpy_dtypes([t.dtype for t in outputs])
        self.export_outputs = _exportable(leaves)

    def learn_grads(self, grads: Sequence[Any]) -> None:
        self.export_grads = _exportable([g for g in grads if g is not None])


def _numpy_dtypes(dtypes: Sequence[torch.dtype]) -> bool:
    return all(dtype in _NUMPY_DTYPES for dtype in dtypes) and (
        _Platform.numpy_args if _Platform.numpy_args is not None else _Platform.probe())


def _plan_of(program: Program, tensors: Sequence[torch.Tensor]) -> _Plan:
    plan = program.bridge
    if plan is None:
        plan = program.bridge = _Plan([t.dtype for t in tensors])
    return plan


def _arrays(plan: _Plan, tensors: Sequence[torch.Tensor]) -> list[Any]:
    if plan.numpy_inputs:
        try:
            return [t.numpy() for t in tensors]
        except (RuntimeError, TypeError):  # e.g. requires_grad under grad mode: _to_jax
            pass
    return [_to_jax(t) for t in tensors]


def _exportable(leaves: Sequence[Any]) -> bool:
    """Whether each leaf is a live single-buffer CPU array (what a program gives on every
    run once it gave it on one)."""
    return DLPackFastPath.export_owned is not None and all(
        type(leaf) is ARRAY_TYPE and is_single_cpu_buffer(leaf) for leaf in leaves)


def _exported(leaves: Sequence[Any]) -> list[Any] | None:
    """``_array_to_torch`` of fresh results of the engine's own jitted calls (only this
    module holds them: ``export_owned``), known exportable from the program's first run
    (``_Plan``); ``None`` (the caller takes the checked path) if one is not after all."""
    export = DLPackFastPath.export_owned
    try:
        return [None if leaf is None else from_dlpack_capsule(export(leaf))  # type: ignore[misc]
                for leaf in leaves]
    except Exception:
        return None


class LocalJaxBackend:
    """Runs ``jax_function(*args, **kwargs)`` in this process (the ``VjpBackend`` protocol).

    Leaves of the arguments that are not tensors are static: they are part of the
    compilation key and must be hashable. Only tensors that require grad (and are floating
    point or complex) are differentiated. ``engine`` holds the compiled programs and the
    counters ``vjp_calls``, ``fused_calls`` and ``live_residuals`` (for tests and debugging).
    """

    reads_in_place = True  # Note [Sharded parameters in library mode] in _wrapped.py

    def __init__(self, jax_function: Callable[..., Any],
                 executor: CallExecutor | None = None) -> None:
        self.jax_function = jax_function
        self.engine = Engine(jax_function)
        self._executor = executor

    def call_executor(self) -> CallExecutor:
        """Where ``WrappedJaxFunction.submit`` runs calls: the executor given (that of
        ``connect("inproc", max_async_calls=...)``), else the library executor."""
        return self._executor if self._executor is not None else library_executor()

    def _program(self, call: Call, tensors: Sequence[torch.Tensor], with_grad: bool) -> Program:
        # with the dtype in the key, `requires_grad` decides which inputs are differentiated
        if with_grad:
            layout = tuple([(t.shape, t.dtype, t.requires_grad) for t in tensors])
        else:
            layout = tuple([(t.shape, t.dtype, False) for t in tensors])
        key = (call.key, with_grad, layout)
        try:
            # a hit needs no lock (one dict read); the engine counts recency under its lock
            # only when it bounds the number of programs
            engine = self.engine
            program = engine.programs.get(key)
            if program is not None and engine.max_programs is None:
                return program
            diff = tuple(i for i, (_, dtype, d) in enumerate(layout)
                         if d and (dtype.is_floating_point or dtype.is_complex))
            return engine.program(key, call.arguments, len(tensors), diff, call.has_aux)
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
        plan = program.bridge or _plan_of(program, tensors)
        out_leaves, aux = self.engine.call(program, _arrays(plan, tensors))
        outputs = _exported(out_leaves) if plan.export_outputs else None
        if outputs is None:
            outputs = [_leaf_to_torch(leaf) for leaf in out_leaves]
            if plan.export_outputs is None:
                plan.learn_outputs(out_leaves, outputs)
        return outputs, program.out_treedef, (_to_torch_tree(aux) if call.has_aux else None)

    def flat_forward(
        self, call: Call, tensors: Sequence[torch.Tensor]
    ) -> tuple[list, Any, Any, Residuals]:
        """Run and keep residuals: ``(output tensors, output treedef, aux, handle)``."""
        program = self._program(call, tensors, True)
        plan = program.bridge or _plan_of(program, tensors)
        arrays = None
        if plan.numpy_inputs:  # `_arrays`, inlined: the hot path
            try:
                arrays = [t.numpy() for t in tensors]
            except (RuntimeError, TypeError):
                pass
        out_leaves, aux, residuals = self.engine.forward(
            program, arrays if arrays is not None else [_to_jax(t) for t in tensors])
        if residuals.inputs:  # the handle is the engine's residuals, with versions to check
            residuals.versions = [(tensors[i], tensors[i]._version)
                                  for i in program.saved_inputs]
        outputs = _exported(out_leaves) if plan.export_outputs else None
        if outputs is None:
            outputs = [_leaf_to_torch(leaf) for leaf in out_leaves]
            if plan.export_outputs is None:
                plan.learn_outputs(out_leaves, outputs)
        aux = _to_torch_tree(aux) if call.has_aux else None
        return outputs, program.out_treedef, aux, residuals

    def flat_backward(
        self, residuals: Residuals, cotangents: Sequence[torch.Tensor], *, retain: bool
    ) -> list[torch.Tensor | None]:
        """Cotangents (one per output leaf) -> one gradient per tensor (``None`` where
        the tensor was not differentiated)."""
        versions = residuals.versions
        if versions and residuals.live:
            for tensor, version in versions:
                if tensor._version != version:
                    _check_versions(versions)  # raises, naming the tensor
        plan: _Plan = residuals.program.bridge
        cts = None
        if plan.numpy_cotangents:
            try:  # `.sum()` gives an expanded (stride 0) cotangent, `.t()` a strided one
                cts = [(ct if ct.is_contiguous() else ct.contiguous()).numpy()
                       for ct in cotangents]
            except (AttributeError, RuntimeError, TypeError):
                pass
        if cts is None:
            cts = [_to_jax(ct if ct.is_contiguous() else ct.contiguous()) for ct in cotangents]
        grads = self.engine.backward(residuals, cts, retain=retain)
        if plan.export_grads:
            exported = _exported(grads)
            if exported is not None:
                return exported
        result = [None if g is None else _array_to_torch(g) for g in grads]
        if plan.export_grads is None:
            plan.learn_grads(grads)
        return result

    def release(self, residuals: Residuals) -> None:
        """Drop the residuals of a forward pass (idempotent, cheap, safe from a finalizer)."""
        self.engine.release(residuals)


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
    if type(leaf) is ARRAY_TYPE or isinstance(leaf, jax.Array):  # the first is cheap
        return _array_to_torch(leaf)
    return leaf


def _to_torch_tree(tree: Any) -> Any:
    if isinstance(tree, jax.Array):
        return _array_to_torch(tree)
    leaves, treedef = _tree_flatten(tree)
    return treedef.unflatten([_leaf_to_torch(leaf) for leaf in leaves])
