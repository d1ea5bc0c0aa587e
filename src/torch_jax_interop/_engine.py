"""The JAX engine: one jitted program per call signature, its vjp, and backward.

JAX side of the layers: imports JAX and numpy, never torch. Both places that run a user's
JAX function use it: ``interop_core/_local_backend.py`` (library mode; the bridge converts
torch tensors to arrays around it) and the worker (``server/_servicer.py``, through
``server/_compiled.py``).

A *program* belongs to one input signature (argument structure and static values, shapes,
dtypes, which inputs are differentiated; the caller builds the key). Inputs and outputs
are flat lists of arrays: the caller's ``build`` turns the input arrays (or tracers) into
``(args, kwargs)`` for ``fn(*args, **kwargs)``. Each program traces the user's function at
most once per kind of call (plain, or vjp):

* ``call``: the jitted function, no residuals;
* ``forward``: one jitted ``jax.vjp`` of the differentiated inputs returning the outputs
  and the residuals, which the caller keeps as ``Residuals`` until ``backward`` or
  ``release``;
* ``backward``: a second jitted function rebuilds the vjp function from the residuals and
  applies it to the cotangents; one gradient per input, ``None`` for the inputs that were
  not differentiated (float0 gradients of integer inputs included).

# Note [Residuals that are inputs]

Many residuals are inputs: ``x @ w`` keeps ``x`` to compute the gradient of ``w``. A jitted
function that returns one of its inputs copies it into a fresh buffer (800 KB per step for
the input batch of the benchmark MLP). The forward pass therefore returns only the
residuals that are not inputs; those that are (found by identity while tracing) are kept
as the input arrays themselves, by reference, as torch's saved tensors are. The caller
must keep those inputs unchanged until backward: the local backend checks the torch
tensors' version counters (``Residuals.saved_inputs`` says which), the worker keeps the
client's input slices leased until the residuals are released.

# Note [Scalar outputs: gradients with the forward pass]

When the function's output is one real floating-point scalar (a loss), the jitted forward
computes the gradients too, as ``jax.value_and_grad`` would, in one XLA computation: no
residuals are stored and backward does no vjp. The vjp is linear in its cotangent, so
backward returns ``cotangent * gradients`` (the stored gradients themselves for the usual
cotangent 1.0). Fusing saves the residual round trip through memory and a dispatch (see
``benchmarks``, "MLP train step, loss in JAX"). The cost: a forward pass under grad mode
whose graph is never backpropagated computed gradients for nothing; evaluate under
``torch.no_grad()``.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._sharding import Placement, Shardings, is_multi_device, shardings_of

__all__ = ["Engine", "Program", "Residuals", "is_float0"]

_FLOAT0 = jax.dtypes.float0
_tree_flatten: Callable[..., Any] = jax.tree_util.tree_flatten
_tree_unflatten = jax.tree_util.tree_unflatten
_tree_leaves: Callable[..., list[Any]] = jax.tree_util.tree_leaves


def is_float0(value: Any) -> bool:
    """Whether ``value`` is JAX's gradient of an integer input (no gradient)."""
    return getattr(value, "dtype", None) == _FLOAT0


def _is_real_scalar(out: Any) -> bool:
    return (
        isinstance(out, jax.Array)  # a tracer while tracing
        and out.shape == ()
        and bool(jnp.issubdtype(out.dtype, jnp.floating))
    )


def _is_inexact(leaf: Any) -> bool:
    dtype = getattr(leaf, "dtype", None)
    return dtype is not None and bool(jnp.issubdtype(dtype, jnp.inexact))


def _dtype_of(leaf: Any) -> np.dtype:
    dtype = getattr(leaf, "dtype", None)
    return np.dtype(dtype) if dtype is not None else np.asarray(leaf).dtype


def split_aux(result: Any) -> tuple[Any, Any]:
    """``(output, aux)`` of a ``has_aux`` function's result; TypeError if it is no pair."""
    if not (isinstance(result, (tuple, list)) and len(result) == 2):
        raise TypeError(
            "with has_aux=True the JAX function must return a pair `(output, aux)`; got "
            f"{type(result).__name__}."
        )
    return result[0], result[1]


@jax.jit
def _scale(grads: list[Any], cotangent: Any) -> list[Any]:
    return [g * cotangent.astype(g.dtype) for g in grads]


class Program:
    """Everything cached for one input signature: the jitted functions, and what tracing
    found out (output structure, residual layout). Holds no input value."""

    __slots__ = (
        "backward",
        "bridge",
        "build",
        "diff",
        "float0_grads",
        "forward",
        "forwarded",
        "fused",
        "grad_slots",
        "has_aux",
        "num_inputs",
        "out_dtypes",
        "out_float",
        "out_shapes",
        "out_shardings",
        "out_treedef",
        "pass_plan",
        "passthrough",
        "placement",
        "plain",
        "res_treedef",
        "result_shapes",
        "saved_inputs",
    )

    def __init__(self, build: Callable[[Sequence[Any]], tuple[tuple, dict]],
                 num_inputs: int, diff: tuple[int, ...], has_aux: bool) -> None:
        self.build = build
        self.num_inputs = num_inputs
        self.diff = diff  # indices of the differentiated inputs
        self.has_aux = has_aux
        self.plain: Callable[..., Any] | None = None
        self.forward: Callable[..., Any] | None = None
        self.backward: Callable[..., Any] | None = None
        # found while tracing:
        self.out_treedef: Any = None
        self.out_float: tuple[bool, ...] = ()
        self.out_shapes: tuple[tuple[int, ...], ...] = ()
        self.out_dtypes: tuple[np.dtype, ...] = ()
        self.fused = False
        self.res_treedef: Any = None
        # per residual leaf: -1 (returned by the forward pass) or the input's index
        self.forwarded: tuple[int, ...] = ()
        self.saved_inputs: tuple[int, ...] = ()  # the distinct inputs among them
        # per differentiated input: whether its gradient is float0 (an integer input),
        # found by the first backward; then `grad_slots`: (position among the gradients,
        # input index) of each real gradient, so that backward scatters without a test
        self.float0_grads: tuple[bool, ...] | None = None
        self.grad_slots: tuple[tuple[int, int], ...] = ()
        # whatever the caller caches per signature beside the engine's (the local
        # backend's conversion plan); the engine never reads it
        self.bridge: Any = None
        # from `describe`: shapes of the whole result (aux included), and per result leaf
        # the input it merely passes through (or None)
        self.result_shapes: Any = None
        self.passthrough: tuple[int | None, ...] | None = None
        # from the first `call(passthrough=True)`: (the result's treedef, the input each
        # result leaf is) when every leaf is an input passed through, else False
        self.pass_plan: tuple[Any, tuple[int, ...]] | bool | None = None
        # a sharded function (Note [Sharded served functions]): where each input goes, and
        # the outputs' shardings (for the cotangents)
        self.placement: Placement | None = None
        self.out_shardings: tuple[Any, ...] = ()

    def _run(self, fn: Callable[..., Any], arrays: Sequence[Any]) -> Any:
        args, kwargs = self.build(arrays)
        return fn(*args, **kwargs)

    def _record(self, out: Any) -> list[Any]:
        out_leaves, self.out_treedef = _tree_flatten(out)
        self.out_float = tuple(_is_inexact(leaf) for leaf in out_leaves)
        self.out_shapes = tuple(np.shape(leaf) for leaf in out_leaves)
        self.out_dtypes = tuple(_dtype_of(leaf) for leaf in out_leaves)
        return out_leaves


class Residuals:
    """What one forward pass keeps for backward: the residuals that are not inputs, the
    input arrays that are residuals (Note [Residuals that are inputs]), or for a scalar
    output the gradients themselves (Note [Scalar outputs]). ``live`` is false once
    released."""

    __slots__ = ("grads", "inputs", "kept", "live", "program", "versions")

    def __init__(self, program: Program, kept: list[Any] | None, inputs: list[Any] | None,
                 grads: list[Any] | None) -> None:
        self.program, self.kept, self.inputs, self.grads = program, kept, inputs, grads
        self.live = True
        # the caller's record of the inputs kept by reference (the local backend's
        # version counters); the engine never reads it
        self.versions: Any = None

    @property
    def nbytes(self) -> int:
        """Bytes of every array kept (residuals, inputs kept by reference, gradients): what
        a residual budget counts."""
        return sum(int(getattr(leaf, "nbytes", 0))
                   for leaves in (self.kept, self.inputs, self.grads) if leaves
                   for leaf in leaves if leaf is not None)

    @property
    def saved_inputs(self) -> tuple[int, ...]:
        """Indices of the inputs kept by reference: they must not change before backward."""
        return self.program.saved_inputs if self.inputs else ()

    def drop(self) -> None:
        self.live = False
        self.kept = self.inputs = self.grads = None


class Engine:
    """Runs one JAX function ``fn(*args, **kwargs)`` for flat lists of input arrays.

    ``max_programs`` bounds the number of cached programs (input signatures); the least
    recently used is dropped past it. ``vjp_calls`` / ``fused_calls`` / ``live_residuals``
    count forward passes that kept residuals, those of a scalar output that computed the
    gradients too (Note [Scalar outputs]), and residual sets not yet released (residuals a
    caller drops without ``release``, as the worker's residual store does when a session
    ends, are not counted down).

    A function that states shardings (``sharded``) has its inputs placed on its mesh;
    ``gather`` brings its outputs and gradients back onto the mesh's first device (library
    mode; the worker writes the shards itself). ``name`` names the function in errors.
    """

    def __init__(self, fn: Callable[..., Any], *, max_programs: int | None = None,
                 name: str | None = None, gather: bool = True) -> None:
        self.fn = fn
        self.max_programs = max_programs
        # Note [Sharded served functions] (``_sharding.py``)
        self.shardings: Shardings | None = shardings_of(fn)
        self.name = name or getattr(fn, "__name__", None) or "the function"
        self.gather = gather
        self.programs: OrderedDict[Hashable, Program] = OrderedDict()
        self._lock = threading.Lock()
        self.vjp_calls = 0
        self.fused_calls = 0
        self.live_residuals = 0
        self.evictions = 0  # programs dropped past max_programs (the worker's metrics)

    def __getstate__(self) -> dict[str, Any]:
        """A copy (``copy.deepcopy`` of a ``WrappedJaxFunction``) starts with no programs:
        the lock and the compiled functions cannot be copied, and are rebuilt on use."""
        state = self.__dict__.copy()
        state.update(programs=OrderedDict(), _lock=None, vjp_calls=0, fused_calls=0,
                     live_residuals=0, evictions=0)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def cached(self, key: Hashable) -> Program | None:
        """The program of ``key`` if there is one (counted as used), else None."""
        with self._lock:
            program = self.programs.get(key)
            if program is not None and self.max_programs is not None:
                self.programs.move_to_end(key)
        return program

    def program(self, key: Hashable, build: Callable[[Sequence[Any]], tuple[tuple, dict]],
                num_inputs: int, diff: tuple[int, ...], has_aux: bool) -> Program:
        """The program of ``key`` (made with ``build`` the first time). ``key`` must
        determine everything else: structure, statics, shapes, dtypes, ``diff``, ``has_aux``.
        Raises TypeError when ``key`` is not hashable."""
        with self._lock:  # the worker serves calls from several threads
            program = self.programs.get(key)
            if program is None:
                program = Program(build, num_inputs, diff, has_aux)
                self.programs[key] = program
                if self.max_programs is not None and len(self.programs) > self.max_programs:
                    self.programs.popitem(last=False)
                    self.evictions += 1
            elif self.max_programs is not None:
                self.programs.move_to_end(key)
        return program

    # -- no residuals --------------------------------------------------------------------

    def describe(self, program: Program, arrays: Sequence[Any]) -> Any:
        """Shapes of the whole result (aux included) without running it, traced once."""
        if program.result_shapes is None:
            fn = self.fn
            closed, shapes = jax.make_jaxpr(
                lambda a: program._run(fn, a), return_shape=True
            )(list(arrays))
            position = {id(var): i for i, var in enumerate(closed.jaxpr.invars)}
            program.passthrough = tuple(position.get(id(var)) for var in closed.jaxpr.outvars)
            program.result_shapes = shapes
        return program.result_shapes

    # -- sharded functions (Note [Sharded served functions]) ------------------------------

    def _place(self, program: Program, arrays: Sequence[Any]) -> Sequence[Any]:
        shardings = self.shardings
        if shardings is None:
            return arrays
        if program.placement is None:
            program.placement = shardings.placement(self.name, program.build, arrays)
        return program.placement.put(arrays)

    def _gathered(self, leaves: Any) -> Any:
        """Multi-device arrays among ``leaves`` (a list, or a pytree) onto the mesh's first
        device, when this engine gathers (library mode: a torch tensor has one device)."""
        if self.shardings is None or not self.gather:
            return leaves
        device = self.shardings.first_device
        return jax.tree_util.tree_map(
            lambda leaf: jax.device_put(leaf, device) if is_multi_device(leaf) else leaf,
            leaves)

    def call(self, program: Program, arrays: Sequence[Any], *,
             passthrough: bool = False) -> tuple[list[Any], Any]:
        """Run without residuals: ``(output leaves, aux or None)``; ``program.out_treedef``
        rebuilds the outputs. With ``passthrough`` (after ``describe``), a result made only
        of inputs passed through is returned as those inputs: XLA would copy them."""
        arrays = self._place(program, arrays)
        if passthrough:
            plan = program.pass_plan
            if plan is None and program.passthrough is not None:  # once per program
                forwarded = program.passthrough
                plan = program.pass_plan = (
                    (jax.tree_util.tree_structure(program.result_shapes),
                     tuple(i or 0 for i in forwarded))
                    if all(i is not None for i in forwarded) else False)
            if plan:
                treedef, inputs = plan  # type: ignore[misc]
                result = _tree_unflatten(treedef, [arrays[i] for i in inputs])
                out, aux = split_aux(result) if program.has_aux else (result, None)
                # what `_record` finds is fixed by the program: found once
                leaves = (program._record(out) if program.out_treedef is None
                          else _tree_leaves(out))
                return self._gathered(leaves), self._gathered(aux)
        if program.plain is None:
            fn, has_aux = self.fn, program.has_aux

            def plain(arrays: list[Any]) -> Any:
                result = program._run(fn, arrays)
                out, aux = split_aux(result) if has_aux else (result, None)
                return program._record(out), aux

            program.plain = jax.jit(plain)
        out_leaves, aux = program.plain(list(arrays))
        if self.shardings is not None:
            return self._gathered(out_leaves), self._gathered(aux)
        return out_leaves, aux

    # -- with residuals ------------------------------------------------------------------

    def _build_vjp(self, program: Program) -> None:
        fn, diff, has_aux = self.fn, program.diff, program.has_aux

        def forward(diff_arrays: list[Any], const_arrays: list[Any]) -> Any:
            def of_diff(diff_values: list[Any]) -> Any:
                arrays = list(const_arrays)
                for index, value in zip(diff, diff_values, strict=True):
                    arrays[index] = value
                result = program._run(fn, arrays)
                return split_aux(result) if has_aux else result  # the same error as `call`

            if has_aux:
                out, vjp, aux = jax.vjp(of_diff, diff_arrays, has_aux=True)
            else:
                (out, vjp), aux = jax.vjp(of_diff, diff_arrays), None
            out_leaves = program._record(out)
            if len(out_leaves) == 1 and _is_real_scalar(out_leaves[0]):
                program.fused = True  # Note [Scalar outputs]
                (grads,) = vjp(_tree_unflatten(program.out_treedef,
                                               [jnp.ones_like(out_leaves[0])]))
                return out_leaves, aux, grads
            # Note [Residuals that are inputs]
            inputs = list(const_arrays)
            for index, value in zip(diff, diff_arrays, strict=True):
                inputs[index] = value
            input_index = {id(value): i for i, value in enumerate(inputs)}
            res_leaves, program.res_treedef = _tree_flatten(vjp)
            forwarded = [input_index.get(id(leaf), -1) for leaf in res_leaves]
            program.forwarded = tuple(forwarded)
            program.saved_inputs = tuple(sorted({i for i in forwarded if i >= 0}))
            kept = [leaf for leaf, i in zip(res_leaves, forwarded, strict=True) if i < 0]
            return out_leaves, aux, kept

        def backward(kept: list[Any], inputs: list[Any], cotangents: list[Any]) -> Any:
            # the residuals put back in order, and integer outputs' cotangents made float0,
            # at trace time: no Python per call (Note [Residuals that are inputs])
            saved = dict(zip(program.saved_inputs, inputs, strict=True))
            it = iter(kept)
            residuals = [next(it) if i < 0 else saved[i] for i in program.forwarded]
            vjp = _tree_unflatten(program.res_treedef, residuals)
            cts = [
                ct if is_float else np.zeros(shape, _FLOAT0)
                for is_float, shape, ct in zip(
                    program.out_float, program.out_shapes, cotangents, strict=True
                )
            ]
            (grads,) = vjp(_tree_unflatten(program.out_treedef, cts))
            return grads

        program.forward = jax.jit(forward)
        program.backward = jax.jit(backward)

    def forward(self, program: Program, arrays: Sequence[Any]) -> tuple[list[Any], Any, Residuals]:
        """Run and keep residuals: ``(output leaves, aux or None, residuals)``."""
        forward = program.forward
        if forward is None:
            self._build_vjp(program)
            forward = program.forward
            assert forward is not None
        sharded = self.shardings is not None
        if sharded:
            arrays = self._place(program, arrays)
        diff = program.diff
        diff_arrays = [arrays[i] for i in diff]
        const_arrays = list(arrays)
        for i in diff:
            const_arrays[i] = None  # the traced function gets them from `diff_arrays`
        out_leaves, aux, kept = forward(diff_arrays, const_arrays)
        if sharded:
            program.out_shardings = tuple(leaf.sharding for leaf in out_leaves)
            out_leaves, aux = self._gathered(out_leaves), self._gathered(aux)
        self.vjp_calls += 1
        self.live_residuals += 1
        if program.fused:
            self.fused_calls += 1
            return out_leaves, aux, Residuals(program, None, None, kept)
        saved = program.saved_inputs
        inputs = [arrays[i] for i in saved] if saved else None
        return out_leaves, aux, Residuals(program, kept, inputs, None)

    def backward(self, residuals: Residuals, cotangents: Sequence[Any], *,
                 retain: bool) -> list[Any]:
        """Cotangents (one per output leaf; ignored for integer outputs) -> one gradient per
        input, ``None`` where there is none. ``retain=False`` releases the residuals."""
        if not residuals.live:
            raise RuntimeError(
                "Trying to backward through a JAX function whose residuals were already "
                "freed. Specify retain_graph=True on the first backward call if you need to "
                "backward through the graph a second time."
            )
        program = residuals.program
        grads_kept, kept, inputs = residuals.grads, residuals.kept, residuals.inputs
        if not retain:  # `release` and `drop`, inlined: this runs once per backward
            residuals.live = False
            residuals.kept = residuals.inputs = residuals.grads = None
            self.live_residuals -= 1
        sharded = self.shardings is not None
        if grads_kept is not None:
            diff_grads = _scaled(grads_kept, cotangents[0], fresh=retain)
        else:
            if sharded:  # on the outputs' devices, like the residuals
                cotangents = jax.device_put(list(cotangents), list(program.out_shardings))
            assert kept is not None and program.backward is not None
            diff_grads = program.backward(kept, inputs or [], list(cotangents))
        if sharded:
            diff_grads = self._gathered(list(diff_grads))
        if program.float0_grads is None:  # which gradients are float0: fixed per program
            float0 = tuple(is_float0(g) for g in diff_grads)
            program.grad_slots = tuple(
                (position, index)
                for position, (index, none) in enumerate(zip(program.diff, float0, strict=True))
                if not none)
            program.float0_grads = float0
        grads: list[Any] = [None] * program.num_inputs
        for position, index in program.grad_slots:
            grads[index] = diff_grads[position]
        return grads

    def release(self, residuals: Residuals) -> None:
        """Drop the residuals (idempotent, cheap, safe from a finalizer)."""
        if residuals.live:
            residuals.drop()
            self.live_residuals -= 1


def _scaled(grads: list[Any], cotangent: Any, *, fresh: bool) -> list[Any]:
    """``cotangent * g`` for each stored gradient ``g``: exact, because the vjp is linear
    in the cotangent. ``fresh`` (the residuals keep ``grads`` for another backward) returns
    new buffers, so that a caller's in-place accumulation cannot write into the stored ones.
    """
    if not fresh and isinstance(cotangent, np.ndarray) and cotangent.shape == ():
        if float(cotangent) == 1.0:  # the usual `loss.backward()`: no JAX call at all
            return list(grads)
    real = [i for i, g in enumerate(grads) if not is_float0(g)]  # float0: no gradient
    out = list(grads)
    for i, g in zip(real, _scale([grads[i] for i in real], jnp.asarray(cotangent)),
                    strict=True):
        out[i] = g
    return out
