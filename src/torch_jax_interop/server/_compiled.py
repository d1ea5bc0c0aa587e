"""A served JAX function: jitted forward, jitted vjp forward and backward, cached shapes.

``jax.jit`` caches one executable per input signature, so each function is traced once per
signature; the vjp residuals come back from the jitted forward as a ``jax.tree_util.Partial``
(a pytree) and are applied by a second jitted function.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import jax

_FLOAT0 = jax.dtypes.float0


class CompiledFunction:
    """One JAX function as the worker runs it."""

    def __init__(self, name: str, fn: Callable[..., Any], target: str = "") -> None:
        self.name = name
        self.fn = fn
        self.target = target
        self._forward = jax.jit(lambda args, kwargs: fn(*args, **kwargs))

        def vjp_forward(args: tuple, kwargs: dict, has_aux: bool) -> Any:
            return jax.vjp(lambda a, k: fn(*a, **k), args, kwargs, has_aux=has_aux)

        self._vjp_forward = jax.jit(vjp_forward, static_argnums=2)
        self._vjp_backward = jax.jit(lambda vjp_fn, cotangents: vjp_fn(cotangents))
        self._output_shapes: dict[Any, Any] = {}

    @property
    def signature(self) -> str:
        try:
            return str(inspect.signature(self.fn))
        except (TypeError, ValueError):
            return "(...)"

    @property
    def doc(self) -> str:
        return (inspect.getdoc(self.fn) or "").split("\n\n")[0]

    def output_shapes(self, key: Any, args: tuple, kwargs: dict) -> Any:
        """``jax.eval_shape`` of the forward, cached under ``key`` (the input signature)."""
        shapes = self._output_shapes.get(key)
        if shapes is None:
            shapes = jax.eval_shape(self._forward, args, kwargs)
            self._output_shapes[key] = shapes
        return shapes

    def call(self, args: tuple, kwargs: dict) -> Any:
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
