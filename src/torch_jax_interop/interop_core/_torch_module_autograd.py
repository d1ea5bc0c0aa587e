"""The torch computations behind ``torch_module_to_jax``: the module call and its derivatives.

Each computation is a ``TorchFn``: a function of a flat list of tensors that returns a flat
list of tensors, with the rules JAX needs (output shapes, which inputs are differentiable,
which inputs it is linear in). ``_torch_module_primitive`` turns every ``TorchFn`` into one
JAX primitive call; this module only speaks torch (and JAX's shape/dtype structs).

``ModuleCall`` runs the module. From a ``TorchFn`` ``F`` and a mask of the inputs JAX
differentiates, torch autograd derives two more, which are ``TorchFn`` again (so they can be
differentiated again, to any order):

* ``Jvp(F, mask)(x, t) = J_F(x) t`` (forward mode; the double-vjp construction of
  ``torch.autograd.functional.jvp``, so every op with a double backward works);
* ``Vjp(F, mask)(x, c) = J_F(x)^T c`` (reverse mode). Each is linear in its last inputs and
  the transpose of the other.

# Note [Randomness and the kept graph]

When JAX differentiates ``apply``, the forward runs as ``KeepGraph``: it records torch's RNG
state (CPU generator, and the CUDA generators of the module's devices) *before* the module
draws, runs the module with autograd on for the differentiated inputs, and returns, besides
the outputs, that RNG state and a token (both ordinary JAX arrays, so JAX carries them as
residuals to the backward and frees them with the rest). The torch graph itself stays in
``GRAPHS`` under the token. The backward (``Vjp`` of ``Replay``) then

* takes the graph from ``GRAPHS`` and runs only ``torch.autograd.grad`` on it, when it is
  still there, was built for (at least) the inputs now differentiated, and XLA hands the
  backward the very same input buffers the forward read (the graph's saved tensors view
  them: same address and, by JAX's semantics, same values). This is the common case: eager
  ``jax.grad`` / ``jax.vjp`` and ``jax.jit`` of a training step;
* otherwise re-runs the module with the recorded RNG state restored (the global generators
  are put back afterwards), so a dropout mask drawn in the forward is drawn again,
  identically. vmap, higher-order derivatives, and a graph evicted from ``GRAPHS`` take
  this path: slower, never wrong.

A graph whose backward never comes (``jax.linearize`` dropped, a cotangent that is zero) is
dropped when ``GRAPHS`` holds more than ``MAX_KEPT_GRAPHS`` (oldest first); ``Jvp`` pops the
graph too. Re-runs never advance the global generators, so a sequence of steps draws the
same numbers as the same steps in pure torch.

Not covered: ``jax.checkpoint`` (remat) around a module that draws random numbers. Remat
runs the forward again inside the backward, and that second ``KeepGraph`` is a new call that
draws new numbers (as any stateful callback under remat would), so the gradient belongs to
other draws than the returned value. Keep random modules outside ``jax.checkpoint``, or put
them in eval mode there.

# Note [In-place writes to inputs]

Inside the callback the module's inputs are views of XLA's buffers: the caller's arrays, or
values inside a compiled program that other operations still read. A module that writes to
its input (``x /= 255``, ``relu(x, inplace=True)``) must not change them. The first call of
each signature gives the module copies of every input and records which ones it wrote
(version counters); from then on only those are copied. A later call that writes to an
input the first call did not (a data-dependent in-place write) raises ``InPlaceWriteError``
instead of returning results computed from silently changed inputs; the signature then
copies that input too. Cost: one version-counter read per input per call, plus one copy of
each written input (measured in ``tests/interop_core/test_torch_module_semantics.py``).
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
import torch

from .._compat._torch import set_grad_mode, version_counter

__all__ = [
    "GRAPHS",
    "MAX_KEPT_GRAPHS",
    "InPlaceWriteError",
    "Jvp",
    "KeepGraph",
    "ModuleCall",
    "Replay",
    "TorchFn",
    "Vjp",
    "inexact",
]

MAX_KEPT_GRAPHS = 16
"""How many forward graphs wait for their backward at most (see Note [Randomness and the
kept graph]); older ones are dropped and their backward re-runs the module."""

Aval = jax.ShapeDtypeStruct


class InPlaceWriteError(RuntimeError):
    """The module wrote in place to an input that the first call did not write."""


def inexact(dtype: Any) -> bool:
    """Whether JAX differentiates values of ``dtype`` (floats, bfloat16 and complex)."""
    return bool(jax.numpy.issubdtype(dtype, jax.numpy.inexact))


def _is_float(t: torch.Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


def _leaf(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a tensor autograd differentiates against (itself if it already is one)."""
    return t if t.requires_grad else t.detach().requires_grad_()


def _zeros(like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like, memory_format=torch.contiguous_format)


class TorchFn:
    """A torch computation on flat tensor lists, as JAX sees it (one primitive call).

    Derivatives carry ``mask``: one flag per input of the function they derive from (so
    ``len(mask)`` is where their own tangents or cotangents start).
    """

    linear_from: int | None = None  # inputs from here on enter linearly (Jvp, Vjp)

    def __init__(self) -> None:
        self._derived: dict[Any, TorchFn] = {}
        self._lock = threading.Lock()

    def out_avals(self, in_avals: Sequence[Aval]) -> list[Aval]:
        raise NotImplementedError

    def evaluate(self, leaves: list[torch.Tensor]) -> list[torch.Tensor]:
        """Outputs for ``leaves``; differentiable (a torch graph) w.r.t. leaves that
        require grad."""
        raise NotImplementedError

    def differentiable(self, in_avals: Sequence[Aval]) -> tuple[bool, ...]:
        return tuple(inexact(a.dtype) for a in in_avals)

    def _derive(self, key: Any, make: Callable[[], TorchFn]) -> TorchFn:
        # One object per derivative: equal primitive parameters keep jit's caches warm.
        with self._lock:
            fn = self._derived.get(key)
            if fn is None:
                fn = self._derived[key] = make()
            return fn

    def jvp(self, mask: tuple[bool, ...]) -> TorchFn:
        return self._derive(("jvp", mask), lambda: Jvp(self, mask))

    def vjp(self, mask: tuple[bool, ...]) -> TorchFn:
        return self._derive(("vjp", mask), lambda: Vjp(self, mask))

    def transpose(self) -> TorchFn:
        raise TypeError(f"`{type(self).__name__}` is not linear in any input")


# ---------------------------------------------------------------------------------------
# The module call


class ModuleCall(TorchFn):
    """The module itself, for one argument structure: ``run(tensors) -> flat outputs``."""

    def __init__(
        self,
        num_inputs: int,
        run: Callable[[list[torch.Tensor]], list[torch.Tensor]],
        infer: Callable[[Sequence[Aval]], list[Aval]],
        rng_devices: tuple[int, ...],
    ) -> None:
        super().__init__()
        self.num_inputs = num_inputs
        self.run = run
        self.infer = infer
        self.rng_devices = rng_devices
        self.written: frozenset[int] | None = None  # Note [In-place writes to inputs]
        self.replay = Replay(self)

    def out_avals(self, in_avals: Sequence[Aval]) -> list[Aval]:
        return self.infer(in_avals)

    def keep(self, mask: tuple[bool, ...]) -> KeepGraph:
        # _derive caches by key and returns what the factory built: a KeepGraph for this key
        return self._derive(("keep", mask), lambda: KeepGraph(self, mask))  # type: ignore[return-value]

    def evaluate(self, leaves: list[torch.Tensor]) -> list[torch.Tensor]:
        written = self.written
        grad = False
        for t in leaves:
            if t.requires_grad:
                grad = True
                break
        # a bare switch rather than `torch.set_grad_enabled(grad)`: this runs per call
        enabled = torch.is_grad_enabled()
        set_grad_mode(grad)
        try:
            if written is None:
                inputs = [t.clone() for t in leaves]
                watched: list[tuple[int, torch.Tensor, int | None]] = []
            else:
                inputs = [t.clone() if i in written else t for i, t in enumerate(leaves)]
                watched = [
                    (i, t, version_counter(t))
                    for i, t in enumerate(leaves)
                    if i not in written
                ]
            outs = self.run(inputs)
        finally:
            set_grad_mode(enabled)
        if written is None:
            self.written = frozenset(
                i for i, t in enumerate(inputs) if version_counter(t) != 0  # None: unknown, copy
            )
        else:
            changed = [i for i, t, v in watched if version_counter(t) != v]
            if changed:
                self.written = written | frozenset(changed)
                raise InPlaceWriteError(
                    f"the torch module wrote in place to its input(s) at flat position(s) "
                    f"{changed} (parameters first, then array arguments), which the first "
                    "call of this signature did not write, so the JAX array(s) behind them "
                    "changed. Later calls copy these inputs; to keep this call correct, "
                    "write to a copy in the module (`x = x / 255` instead of `x /= 255`)."
                )
        return outs


class KeepGraph(TorchFn):
    """The forward of a differentiated call: outputs, RNG state, and a token for the graph.

    See Note [Randomness and the kept graph]. Never differentiated itself in torch: the
    JAX rules of ``_torch_module_primitive`` turn its derivatives into ``Replay``'s.
    """

    def __init__(self, base: ModuleCall, mask: tuple[bool, ...]) -> None:
        super().__init__()
        self.base = base
        self.mask = mask
        self.num_inputs = base.num_inputs

    def out_avals(self, in_avals: Sequence[Aval]) -> list[Aval]:
        rng = rng_state(self.base.rng_devices)
        return [
            *self.base.out_avals(in_avals),
            Aval((int(rng.numel()),), np.uint8),
            Aval((), np.int32),
        ]

    def evaluate(self, leaves: list[torch.Tensor]) -> list[torch.Tensor]:
        state = rng_state(self.base.rng_devices)
        prepared = [_leaf(t) if m else t for t, m in zip(leaves, self.mask, strict=True)]
        outs = self.base.evaluate(prepared)
        key = GRAPHS.put(_KeptGraph(self.mask, prepared, _pointers(leaves), outs))
        return [*(o.detach() for o in outs), state, torch.tensor(key, dtype=torch.int32)]


class Replay(TorchFn):
    """``(x, rng_state, token) -> module(x)`` drawing the recorded random numbers."""

    def __init__(self, base: ModuleCall) -> None:
        super().__init__()
        self.base = base
        self.num_inputs = base.num_inputs + 2

    def out_avals(self, in_avals: Sequence[Aval]) -> list[Aval]:
        return self.base.out_avals(in_avals[:-2])

    def differentiable(self, in_avals: Sequence[Aval]) -> tuple[bool, ...]:
        return (*super().differentiable(in_avals[:-2]), False, False)

    def evaluate(self, leaves: list[torch.Tensor]) -> list[torch.Tensor]:
        *xs, state, _token = leaves
        with restored_rng(state, self.base.rng_devices):
            return self.base.evaluate(xs)

    def kept(self, leaves: list[torch.Tensor], mask: tuple[bool, ...]) -> _KeptGraph | None:
        """The forward's graph for this call, if it can serve ``mask`` (and is taken)."""
        *xs, _state, token = leaves
        if any(t.requires_grad for t in leaves):
            return None  # a higher-order derivative: it needs a graph of these leaves
        graph = GRAPHS.pop(int(token))
        if graph is None or graph.pointers != _pointers(xs):
            return None
        if any(m and not g for m, g in zip(mask[:-2], graph.mask, strict=True)):
            return None
        return graph


# ---------------------------------------------------------------------------------------
# Derivatives


def _forward_for(
    fn: TorchFn, leaves: list[torch.Tensor], mask: tuple[bool, ...]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Outputs of ``fn`` differentiable w.r.t. the masked leaves, and those leaves."""
    n = len(mask)
    if isinstance(fn, Replay):
        graph = fn.kept(leaves[:n], mask)
        if graph is not None:
            return graph.outs, [t for t, m in zip(graph.leaves, mask[:-2], strict=True) if m]
    xs = [_leaf(t) if m else t for t, m in zip(leaves[:n], mask, strict=True)]
    with torch.enable_grad():
        outs = fn.evaluate(xs)
    return outs, [t for t, m in zip(xs, mask, strict=True) if m]


def _float_outputs(outs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [o for o in outs if _is_float(o)]


class Vjp(TorchFn):
    """``(x, c) -> J_F(x)^T c`` for the masked inputs of ``F``; linear in ``c``."""

    def __init__(self, inner: TorchFn, mask: tuple[bool, ...]) -> None:
        super().__init__()
        self.inner = inner
        self.mask = mask
        self.linear_from = len(mask)  # then one cotangent per float output of ``inner``

    def out_avals(self, in_avals: Sequence[Aval]) -> list[Aval]:
        return [a for a, m in zip(in_avals[: len(self.mask)], self.mask, strict=True) if m]

    def differentiable(self, in_avals: Sequence[Aval]) -> tuple[bool, ...]:
        n = len(self.mask)
        return (*self.inner.differentiable(in_avals[:n]), *super().differentiable(in_avals[n:]))

    def transpose(self) -> TorchFn:
        return self.inner.jvp(self.mask)

    def evaluate(self, leaves: list[torch.Tensor]) -> list[torch.Tensor]:
        n = len(self.mask)
        cts = leaves[n:]
        create = any(t.requires_grad for t in leaves)
        if create:
            # A backward that torch cannot differentiate (``once_differentiable``) raises
            # only when its incoming gradient requires grad; otherwise it would return a
            # constant, read as a zero second derivative.
            cts = [_leaf(c) if _is_float(c) else c for c in cts]
        outs, wrt = _forward_for(self.inner, leaves[:n], self.mask)
        pairs = [
            (o, c) for o, c in zip(_float_outputs(outs), cts, strict=True) if o.requires_grad
        ]
        grads: Sequence[torch.Tensor | None] = (None,) * len(wrt)
        if pairs:
            with torch.enable_grad():
                grads = torch.autograd.grad(
                    [o for o, _ in pairs],
                    wrt,
                    [c.to(o.dtype) for o, c in pairs],
                    create_graph=create,
                    allow_unused=True,
                )
        if create:
            _check_differentiable(grads)
        return [_zeros(w) if g is None else g for w, g in zip(wrt, grads, strict=True)]


_ERROR_NODE = "torch::autograd::Error"  # what ``once_differentiable`` puts in the graph


def _check_differentiable(grads: Sequence[torch.Tensor | None]) -> None:
    """Refuse gradients whose own graph cannot be differentiated (torch would read the
    missing second derivative as zero)."""
    seen: set[Any] = set()
    stack: list[Any] = [g.grad_fn for g in grads if g is not None and g.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if node.name() == _ERROR_NODE:
            raise NotImplementedError(
                "torch_module_to_jax: a second (or higher) derivative through this module "
                "needs to differentiate its backward pass, but part of it is a "
                "`torch.autograd.Function` whose backward is marked `once_differentiable` "
                "(it cannot differentiate twice a function that was marked with "
                "@once_differentiable). Reverse-mode first derivatives (jax.grad, jax.vjp) "
                "work; for jax.hessian or jax.jvp, give that Function a differentiable "
                "backward."
            )
        stack.extend(next_node for next_node, _ in node.next_functions if next_node is not None)


class Jvp(TorchFn):
    """``(x, t) -> J_F(x) t`` for the masked inputs of ``F``; linear in ``t``."""

    def __init__(self, inner: TorchFn, mask: tuple[bool, ...]) -> None:
        super().__init__()
        self.inner = inner
        self.mask = mask
        self.linear_from = len(mask)  # then one tangent per masked input

    def out_avals(self, in_avals: Sequence[Aval]) -> list[Aval]:
        outs = self.inner.out_avals(in_avals[: len(self.mask)])
        return [a for a in outs if inexact(a.dtype)]

    def differentiable(self, in_avals: Sequence[Aval]) -> tuple[bool, ...]:
        n = len(self.mask)
        return (*self.inner.differentiable(in_avals[:n]), *super().differentiable(in_avals[n:]))

    def transpose(self) -> TorchFn:
        return self.inner.vjp(self.mask)

    def evaluate(self, leaves: list[torch.Tensor]) -> list[torch.Tensor]:
        n = len(self.mask)
        tangents = leaves[n:]
        create = any(t.requires_grad for t in leaves)
        outs, wrt = _forward_for(self.inner, leaves[:n], self.mask)
        floats = _float_outputs(outs)
        live = [o for o in floats if o.requires_grad]
        results: dict[int, torch.Tensor] = {}
        if live:
            with torch.enable_grad():
                # J t = d/du <J^T u, t>: two reverse passes, as torch.autograd.functional.jvp
                us = [torch.zeros_like(o, requires_grad=True) for o in live]
                vjps = torch.autograd.grad(live, wrt, us, create_graph=True, allow_unused=True)
                pairs = [
                    (g, t.to(g.dtype))
                    for g, t in zip(vjps, tangents, strict=True)
                    if g is not None and g.requires_grad
                ]
                if pairs:
                    jts = torch.autograd.grad(
                        [g for g, _ in pairs],
                        us,
                        [t for _, t in pairs],
                        create_graph=create,
                        allow_unused=True,
                    )
                    results = {
                        id(o): jt for o, jt in zip(live, jts, strict=True) if jt is not None
                    }
        return [results[id(o)] if id(o) in results else _zeros(o) for o in floats]


# ---------------------------------------------------------------------------------------
# Graphs kept from the forward, RNG state


@dataclass
class _KeptGraph:
    mask: tuple[bool, ...]
    leaves: list[torch.Tensor]
    pointers: list[int]
    outs: list[torch.Tensor]


def _pointers(tensors: Sequence[torch.Tensor]) -> list[int]:
    return [t.data_ptr() for t in tensors]


class GraphStore:
    """Forward graphs waiting for their backward, by token; at most ``cap``, oldest dropped."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._graphs: collections.OrderedDict[int, _KeptGraph] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._counter = itertools.count(1)

    def put(self, graph: _KeptGraph) -> int:
        with self._lock:
            key = next(self._counter) % 2**31
            self._graphs[key] = graph
            while len(self._graphs) > self.cap:
                self._graphs.popitem(last=False)
            return key

    def pop(self, key: int) -> _KeptGraph | None:
        with self._lock:
            return self._graphs.pop(key, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._graphs)

    def clear(self) -> None:
        with self._lock:
            self._graphs.clear()


GRAPHS = GraphStore(MAX_KEPT_GRAPHS)


def rng_state(cuda_devices: tuple[int, ...]) -> torch.Tensor:
    """torch's CPU generator state, then each listed CUDA generator's, as one uint8 tensor."""
    states = [torch.get_rng_state()]
    states += [torch.cuda.get_rng_state(d) for d in cuda_devices]
    return states[0] if len(states) == 1 else torch.cat(states)


@contextlib.contextmanager
def restored_rng(state: torch.Tensor, cuda_devices: tuple[int, ...]) -> Iterator[None]:
    """Run with the generators set to ``state``; put the current states back afterwards."""
    saved = rng_state(cuda_devices)
    _set_rng_state(state.detach().cpu(), cuda_devices)
    try:
        yield
    finally:
        _set_rng_state(saved, cuda_devices)


def _set_rng_state(state: torch.Tensor, cuda_devices: tuple[int, ...]) -> None:
    cpu_size = torch.get_rng_state().numel()
    torch.set_rng_state(state[:cpu_size].clone())
    offset = cpu_size
    for device in cuda_devices:
        size = torch.cuda.get_rng_state(device).numel()
        torch.cuda.set_rng_state(state[offset: offset + size].clone(), device)
        offset += size
