"""A served JAX function: the engine (``_engine.py``) plus what the worker adds to it.

The worker decodes a call into a flat list of arrays and the structures of ``args`` and
``kwargs`` from the wire; the engine runs one jitted program per input signature (vjp of
the leaves the client wants gradients for, fused gradients for a scalar loss, residuals that
are inputs kept by reference: the client keeps those input slices leased until it releases
the residuals).

# Note [Registered pytree nodes in service mode]

The wire describes structure with tuples, lists, dicts with str keys and ``None`` only:
nothing executable, no class names to import. A Flax ``struct.dataclass``, an Equinox
module or any node registered with ``jax.tree_util`` therefore cannot travel as a node.
Instead, a served function *declares* the structure of its parameters (its first
argument), and the client sends only their array leaves:

* the served object carries ``__torch_jax_interop_params__``, a zero-argument callable that
  returns example parameters (``lambda: init(jax.random.key(0))``). The worker calls it
  once, at the first call, and keeps the structure and the leaves that are not arrays (an
  Equinox module's activation functions): a ``TreeTemplate``, one per served function,
  holding no request's data;
* a client whose parameters the wire cannot describe (``WrappedJaxFunction(remote, params)``
  with such nodes, or with non-array leaves) sends them as a flat list of their array
  leaves, in JAX's leaf order (Note [One pytree policy] in ``_pytree.py``);
* a call whose first argument is a flat list of exactly as many arrays as the declared
  parameters have, and whose structure differs from the declared one, gets the declared
  structure rebuilt around those arrays; gradients come back as the same flat list.

A torch-only client can thus train a Flax or Equinox model served by the worker by sending
the leaves as a list (``jax.tree_util.tree_leaves`` order). Registered nodes in other
arguments or in outputs are refused with a message that says so.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import _pytree
from .._engine import Engine, Program, Residuals, is_float0
from .._errors import InvalidArgumentError
from .._pytree import TreeSpec, TreeTemplate

__all__ = ["PARAMS_ATTRIBUTE", "CompiledFunction", "VjpResiduals", "is_float0"]

PARAMS_ATTRIBUTE = "__torch_jax_interop_params__"
_MAX_PROGRAMS = 1024  # input signatures compiled per served function (least recent dropped)


@dataclass
class VjpResiduals:
    """One forward's residuals (kept by the session's ``ResidualStore``) and the structure
    of the call's arguments, to shape the gradients like them. Holds no request message."""

    residuals: Residuals
    args_spec: TreeSpec
    kwargs_spec: TreeSpec


class _Arguments:
    """Builds ``(args, kwargs)`` from the call's flat arrays (or tracers): the wire
    structures, and the declared parameters (see the Note) where the call sent them flat."""

    __slots__ = ("args_spec", "kwargs_spec", "num_args", "params")

    def __init__(self, args_spec: TreeSpec, kwargs_spec: TreeSpec,
                 params: TreeTemplate | None) -> None:
        self.args_spec = args_spec
        self.kwargs_spec = kwargs_spec
        self.num_args = args_spec.num_leaves
        self.params = params

    def __call__(self, arrays: Sequence[Any]) -> tuple[tuple, dict]:
        args = self.args_spec.unflatten(arrays[: self.num_args])
        kwargs = self.kwargs_spec.unflatten(arrays[self.num_args:])
        if self.params is not None:
            args = (self.params.fill(args[0]), *args[1:])
        return args, kwargs


def _sent_flat(first: TreeSpec, params: TreeTemplate) -> bool:
    return (first.kind in (_pytree.LIST, _pytree.TUPLE) and first != params.spec
            and all(child.kind == _pytree.LEAF for child in first.children))


class CompiledFunction:
    """One JAX function as the worker serves it."""

    def __init__(self, name: str, fn: Callable[..., Any], target: str = "", *,
                 max_programs: int = _MAX_PROGRAMS) -> None:
        self.name = name
        self.fn = fn
        self.target = target
        # gather=False: the output writer puts each shard of a sharded output straight into
        # the client's arena (Note [Sharded served functions] in ``_sharding.py``)
        self.engine = Engine(fn, max_programs=max_programs, name=name, gather=False)
        self._declared: TreeTemplate | None | bool = False  # False: not looked up yet

    @property
    def mesh(self) -> str:
        """The mesh the function states (``sharded``), as ``axis=size, ...``; "" if none."""
        shardings = self.engine.shardings
        return "" if shardings is None else shardings.describe()

    @property
    def signature(self) -> str:
        try:
            return str(inspect.signature(self.fn))
        except (TypeError, ValueError):
            return "(...)"

    @property
    def doc(self) -> str:
        return (inspect.getdoc(self.fn) or "").split("\n\n")[0]

    @property
    def declared_params(self) -> TreeTemplate | None:
        """The parameter structure the function declares (see the Note), or None."""
        if self._declared is False:
            factory = getattr(self.fn, PARAMS_ATTRIBUTE, None)
            self._declared = (None if factory is None
                              else TreeTemplate.of(factory(), _pytree.is_array_leaf)[0])
        # `_declared` starts as a sentinel (not yet looked up); set above, so never it here
        return self._declared  # type: ignore[return-value]

    def program(self, key: Hashable, args_spec: TreeSpec, kwargs_spec: TreeSpec | None,
                has_aux: bool, diff: tuple[int, ...]) -> Program:
        """The engine's program for a call with these wire structures. ``key`` identifies
        the structures, shapes and dtypes; ``diff`` the leaves to differentiate."""
        # `key` holds the structures: a program made for it passed the checks below
        program = self.engine.cached((key, has_aux, diff))
        if program is not None:
            return program
        if kwargs_spec is None:
            kwargs_spec = _pytree.flatten({})[1]
        if args_spec.kind != _pytree.TUPLE or kwargs_spec.kind != _pytree.DICT:
            raise InvalidArgumentError("args must be a tuple and kwargs a dict")
        params = self.declared_params
        if params is not None and not (args_spec.children
                                       and _sent_flat(args_spec.children[0], params)):
            params = None
        if params is not None and args_spec.children[0].num_leaves != params.num_slots:
            raise InvalidArgumentError(
                f"`{self.name}` declares parameters with {params.num_slots} arrays "
                f"({PARAMS_ATTRIBUTE}), but the call sent a flat list of "
                f"{args_spec.children[0].num_leaves}: send every array leaf of the "
                "parameters, in jax.tree_util.tree_leaves order"
            )
        build = _Arguments(args_spec, kwargs_spec, params)
        num = args_spec.num_leaves + kwargs_spec.num_leaves
        return self.engine.program((key, has_aux, diff), build, num, diff, has_aux)

    def describe(self, program: Program, arrays: Sequence[Any]) -> Any:
        """Shapes of the whole result (outputs and aux), traced once per signature."""
        return self.engine.describe(program, arrays)

    def call(self, program: Program, arrays: Sequence[Any]) -> tuple[Any, Any]:
        """Run without residuals: ``(outputs, aux or None)``. Outputs that are merely
        inputs passed through come back as those inputs (XLA would copy them)."""
        out_leaves, aux = self.engine.call(program, arrays, passthrough=True)
        return program.out_treedef.unflatten(out_leaves), aux

    def call_with_vjp(self, program: Program, arrays: Sequence[Any]
                      ) -> tuple[Any, Any, VjpResiduals]:
        """Run the vjp of the program's ``diff`` leaves: ``(outputs, aux, residuals)``."""
        out_leaves, aux, residuals = self.engine.forward(program, arrays)
        # the engine types `build` as a plain callable; the worker's programs take _Arguments
        build: _Arguments = program.build  # type: ignore[assignment]
        return (program.out_treedef.unflatten(out_leaves), aux,
                VjpResiduals(residuals, build.args_spec, build.kwargs_spec))

    def check_cotangents(self, vjp: VjpResiduals, cotangents: Sequence[Any]) -> None:
        """INVALID_ARGUMENT unless there is one cotangent per output leaf with the output's
        shape (and dtype, for floating-point outputs): nothing is broadcast, so a cotangent
        cannot make backward allocate more than the forward's outputs."""
        program = vjp.residuals.program
        num_outputs = len(program.out_float)
        if len(cotangents) != num_outputs:
            raise InvalidArgumentError(
                f"backward of `{self.name}` got {len(cotangents)} cotangents for "
                f"{num_outputs} outputs; send one per output leaf"
            )
        for i, (ct, shape, dtype, is_float) in enumerate(zip(
                cotangents, program.out_shapes, program.out_dtypes, program.out_float,
                strict=True)):
            got_shape = tuple(np.shape(ct))
            got_dtype = np.dtype(ct.dtype)
            if got_shape != tuple(shape) or (is_float and got_dtype != dtype):
                raise InvalidArgumentError(
                    f"backward of `{self.name}`: the cotangent of output {i} must have the "
                    f"output's shape {list(shape)} and dtype {dtype}, got shape "
                    f"{list(got_shape)} and dtype {got_dtype}"
                )

    def backward(self, vjp: VjpResiduals, cotangents: Sequence[Any], *,
                 retain: bool) -> tuple[Any, Any]:
        """Cotangents (one per output leaf, in the order the outputs were sent) ->
        ``(grad_args, grad_kwargs)`` shaped like the call's arguments, ``None`` where an
        input has no gradient."""
        self.check_cotangents(vjp, cotangents)
        grads = self.engine.backward(vjp.residuals, cotangents, retain=retain)
        num_args = vjp.args_spec.num_leaves
        return vjp.args_spec.unflatten(grads[:num_args]), vjp.kwargs_spec.unflatten(
            grads[num_args:])
