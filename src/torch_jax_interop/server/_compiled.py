"""A served JAX function: jitted forward, jitted vjp forward and backward, cached shapes.

``jax.jit`` caches one executable per input signature, so each function is traced once per
signature; the vjp residuals come back from the jitted forward as a ``jax.tree_util.Partial``
(a pytree) and are applied by a second jitted function.

The vjp is taken with respect to the input leaves the client needs gradients for (the
request's ``no_grad_leaves`` names the others): a frozen input batch costs no gradient
computation and no transfer. When the output is one real floating-point scalar (a loss),
the jitted forward computes the gradients too, in one XLA computation (as
``jax.value_and_grad``), and keeps them instead of residuals; backward multiplies them by
the cotangent (exact: the vjp is linear in it; see Note [Scalar outputs] in
``interop_core/_local_backend.py``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from .. import _pytree

_FLOAT0 = jax.dtypes.float0


def _is_array(value: Any) -> bool:
    return isinstance(value, (jax.Array, np.ndarray))


class _Gradients:
    """What a scalar-output vjp forward returns (and the residual store keeps) instead of a
    vjp function: the gradients themselves. A pytree node, so that jit returns it."""

    __slots__ = ("grads",)

    def __init__(self, grads: list[Any]) -> None:
        self.grads = grads


jax.tree_util.register_pytree_node(
    _Gradients, lambda g: (g.grads, None), lambda _, children: _Gradients(list(children))
)


@dataclass
class VjpResiduals:
    """One forward's residuals (a vjp function, or the gradients of a scalar output) and
    how to place the gradients of the differentiated leaves back into (args, kwargs)."""

    vjp_fn: Any
    spec: _pytree.TreeSpec
    diff: tuple[int, ...]
    num_leaves: int


@dataclass
class CallPlan:
    """Per input signature: output shapes / structure, and which outputs are inputs."""

    shapes: Any
    out_tree: Any
    forwarded: tuple[int | None, ...]
    arena_bytes: int | None = None  # filled in by the servicer on first use

    @property
    def all_forwarded(self) -> bool:
        return all(i is not None for i in self.forwarded)


class CompiledFunction:
    """One JAX function as the worker runs it."""

    def __init__(self, name: str, fn: Callable[..., Any], target: str = "") -> None:
        self.name = name
        self.fn = fn
        self.target = target
        self._call_fn = lambda args, kwargs: fn(*args, **kwargs)
        self._forward = jax.jit(self._call_fn)

        def vjp_forward(
            diff_leaves: list[Any],
            const_leaves: list[Any],
            spec: _pytree.TreeSpec,
            diff: tuple[int, ...],
            has_aux: bool,
        ) -> Any:
            def of_diff(values: list[Any]) -> Any:
                leaves = list(const_leaves)
                for index, value in zip(diff, values, strict=True):
                    leaves[index] = value
                args, kwargs = spec.unflatten(leaves)
                return fn(*args, **kwargs)

            if has_aux:
                out, vjp_fn, aux = jax.vjp(of_diff, diff_leaves, has_aux=True)
            else:
                (out, vjp_fn), aux = jax.vjp(of_diff, diff_leaves), None
            if _is_real_scalar(out):
                (grads,) = vjp_fn(jax.numpy.ones_like(out))
                return out, aux, _Gradients(grads)
            return out, aux, vjp_fn

        self._vjp_forward = jax.jit(vjp_forward, static_argnums=(2, 3, 4))
        self._vjp_backward = jax.jit(lambda vjp_fn, cotangents: vjp_fn(cotangents)[0])
        self._scale = jax.jit(
            lambda grads, cotangent: [g * cotangent.astype(g.dtype) for g in grads]
        )
        self._plans: dict[Any, CallPlan] = {}

    @property
    def signature(self) -> str:
        try:
            return str(inspect.signature(self.fn))
        except (TypeError, ValueError):
            return "(...)"

    @property
    def doc(self) -> str:
        return (inspect.getdoc(self.fn) or "").split("\n\n")[0]

    def plan(self, key: Any, args: tuple, kwargs: dict) -> CallPlan:
        """What a call with this input signature returns, traced once and cached by ``key``."""
        plan = self._plans.get(key)
        if plan is None:
            closed, shapes = jax.make_jaxpr(self._call_fn, return_shape=True)(args, kwargs)
            position = {id(var): i for i, var in enumerate(closed.jaxpr.invars)}
            forwarded = tuple(position.get(id(var)) for var in closed.jaxpr.outvars)
            plan = CallPlan(shapes, jax.tree_util.tree_structure(shapes), forwarded)
            self._plans[key] = plan
        return plan

    def call(self, args: tuple, kwargs: dict, plan: CallPlan | None = None) -> Any:
        """Run the forward. Outputs that are merely inputs passed through are returned as
        those inputs: XLA would copy them (the whole cost of an identity function)."""
        if plan is not None and plan.all_forwarded:
            inputs = jax.tree_util.tree_leaves((args, kwargs))
            return jax.tree_util.tree_unflatten(plan.out_tree,
                                                [inputs[i or 0] for i in plan.forwarded])
        return self._forward(args, kwargs)

    def call_with_vjp(
        self, args: tuple, kwargs: dict, has_aux: bool, no_grad: frozenset[int] = frozenset()
    ) -> tuple[Any, Any, VjpResiduals]:
        """Returns (outputs, aux or None, residuals). ``no_grad``: leaf indices (over args,
        then kwargs) that need no gradient."""
        leaves, spec = _pytree.flatten((args, kwargs), is_leaf=_is_array)
        diff = tuple(i for i in range(len(leaves)) if i not in no_grad)
        diff_leaves = [leaves[i] for i in diff]
        const_leaves = [None if i not in no_grad else leaf for i, leaf in enumerate(leaves)]
        out, aux, vjp_fn = self._vjp_forward(diff_leaves, const_leaves, spec, diff, has_aux)
        return out, aux, VjpResiduals(vjp_fn, spec, diff, len(leaves))

    def backward(self, residuals: VjpResiduals, cotangents: Any) -> tuple[Any, Any]:
        """Gradients (args, kwargs); ``None`` (or float0, for ints and bools) marks inputs
        without gradient."""
        vjp_fn = residuals.vjp_fn
        if isinstance(vjp_fn, _Gradients):
            (cotangent,) = jax.tree_util.tree_leaves(cotangents)
            diff_grads = self._scale(vjp_fn.grads, cotangent)
        else:
            diff_grads = self._vjp_backward(vjp_fn, cotangents)
        grads: list[Any] = [None] * residuals.num_leaves
        for index, grad in zip(residuals.diff, diff_grads, strict=True):
            grads[index] = grad
        grad_args, grad_kwargs = residuals.spec.unflatten(grads)
        return grad_args, grad_kwargs


def _is_real_scalar(out: Any) -> bool:
    return (
        isinstance(out, jax.Array)  # a tracer while tracing
        and out.shape == ()
        and bool(jax.numpy.issubdtype(out.dtype, jax.numpy.floating))
    )


def is_float0(value: Any) -> bool:
    return getattr(value, "dtype", None) == _FLOAT0
