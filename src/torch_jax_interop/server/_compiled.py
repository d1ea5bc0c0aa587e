"""A served JAX function: jitted forward, jitted vjp forward and backward, cached shapes.

``jax.jit`` caches one executable per input signature, so each function is traced once per
signature; the vjp residuals come back from the jitted forward as a ``jax.tree_util.Partial``
(a pytree) and are applied by a second jitted function.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax

_FLOAT0 = jax.dtypes.float0


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

        def vjp_forward(args: tuple, kwargs: dict, has_aux: bool) -> Any:
            if has_aux:
                return jax.vjp(lambda a, k: fn(*a, **k), args, kwargs, has_aux=True)
            return jax.vjp(lambda a, k: fn(*a, **k), args, kwargs)

        self._vjp_forward = jax.jit(vjp_forward, static_argnums=2)
        self._vjp_backward = jax.jit(lambda vjp_fn, cotangents: vjp_fn(cotangents))
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

    def call_with_vjp(self, args: tuple, kwargs: dict, has_aux: bool) -> tuple[Any, Any, Any]:
        """Returns (outputs, aux or None, vjp function holding the residuals)."""
        if has_aux:
            out, vjp_fn, aux = self._vjp_forward(args, kwargs, True)
            return out, aux, vjp_fn
        out, vjp_fn = self._vjp_forward(args, kwargs, False)
        return out, None, vjp_fn

    def backward(self, vjp_fn: Any, cotangents: Any) -> tuple[Any, Any]:
        """Gradients (args, kwargs); float0 leaves mark inputs without gradient (ints, bools)."""
        grad_args, grad_kwargs = self._vjp_backward(vjp_fn, cotangents)
        return grad_args, grad_kwargs


def is_float0(value: Any) -> bool:
    return getattr(value, "dtype", None) == _FLOAT0
