"""Functions that run on every device of a mesh: ``sharded(...)``, and where their inputs go.

JAX side of the layers: imports JAX, never torch. The engine (``_engine.py``) uses it for
both places that run a user's function: the worker (service mode) and ``WrappedJaxFunction``
in this process (library mode).

# Note [Sharded served functions]

A function states how its inputs are laid out over a ``jax.sharding.Mesh`` (for instance
over the worker's local devices) with ``sharded(fn, mesh=..., in_shardings=...)``:

* ``in_shardings`` has one entry per positional argument, each a pytree *prefix* of that
  argument (as ``jax.jit``'s ``in_shardings``): a ``PartitionSpec`` over the mesh, a
  ``jax.sharding.Sharding`` on the mesh's devices, or ``None`` (replicated). Keyword
  arguments are replicated.
* Tensors arrive on one device (from shared memory, inline bytes, CUDA IPC, or a torch
  tensor in this process). For each call, the engine ``jax.device_put`` s every input with
  its stated sharding (a copy per device: the data is not on the mesh yet), then runs the
  jitted function, which XLA partitions from those input shardings: data parallel over a
  batch sharded on ``"data"``, a weight sharded on ``"model"``, and whatever collectives
  that needs.
* A shape the mesh does not divide (a batch of 5 over 2 devices) is refused before anything
  is copied, naming the argument, the dimension and the mesh axes (``InvalidArgumentError``:
  INVALID_ARGUMENT from a worker, which keeps serving).
* Cotangents in backward get the sharding of the output they belong to; gradients come out
  with the sharding of their input.
* Outputs and gradients leave the mesh whole: the worker writes each shard straight into
  its place in the client's output arena (``write_sharded``: one copy, no gather buffer);
  in this process the engine gathers them onto the mesh's first device first (one copy),
  since a torch tensor lives on one device.

The mesh may be given as a zero-argument callable (``lambda: jax.make_mesh(...)``): it is
built on first use, in the process that runs the function, so importing the module that
defines it neither initialises a JAX backend nor needs the devices to exist yet.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec, Sharding

from ._errors import InvalidArgumentError

__all__ = ["SHARDINGS_ATTRIBUTE", "Placement", "ShardedFunction", "Shardings", "sharded",
           "shardings_of", "write_sharded"]

SHARDINGS_ATTRIBUTE = "__torch_jax_interop_shardings__"
"""The attribute through which a function states its shardings (a ``Shardings``)."""


def _is_spec(value: Any) -> bool:
    return value is None or isinstance(value, (PartitionSpec, Sharding))


class Shardings:
    """A mesh and the input shardings of one function (see Note [Sharded served functions]).

    Holds no array. ``mesh`` is built on first use when given as a callable.
    """

    def __init__(self, mesh: Mesh | Callable[[], Mesh], in_shardings: Sequence[Any]) -> None:
        if not (isinstance(mesh, Mesh) or callable(mesh)):
            raise TypeError(
                f"`mesh` must be a jax.sharding.Mesh or a zero-argument callable that returns "
                f"one, got {type(mesh).__name__}"
            )
        if not isinstance(in_shardings, (tuple, list)):
            raise TypeError(
                "`in_shardings` must be a tuple with one entry per positional argument (a "
                "PartitionSpec, a Sharding, None, or a pytree of them shaped like a prefix "
                f"of the argument), got {type(in_shardings).__name__}; for one argument "
                "write `(spec,)`"
            )
        wrong = [leaf for leaf in jax.tree_util.tree_leaves(in_shardings, is_leaf=_is_spec)
                 if not _is_spec(leaf)]
        if wrong:
            raise TypeError(
                f"`in_shardings` holds a {type(wrong[0]).__name__} ({wrong[0]!r}); its leaves "
                "must be PartitionSpecs, jax.sharding.Shardings or None"
            )
        self._mesh = mesh
        self.in_shardings = tuple(in_shardings)

    @functools.cached_property
    def mesh(self) -> Mesh:
        mesh = self._mesh if isinstance(self._mesh, Mesh) else self._mesh()
        if not isinstance(mesh, Mesh):
            raise TypeError(f"the `mesh` callable returned {type(mesh).__name__}, not a "
                            "jax.sharding.Mesh")
        return mesh

    @functools.cached_property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    @functools.cached_property
    def first_device(self) -> Any:
        return self.mesh.devices.flat[0]

    def describe(self) -> str:
        """One line for logs: the mesh's axes and sizes."""
        return ", ".join(f"{name}={size}" for name, size in self.mesh.shape.items())

    def resolve(self, name: str, spec: Any) -> Sharding:
        """The sharding an ``in_shardings`` leaf stands for."""
        if spec is None:
            return self.replicated
        if isinstance(spec, PartitionSpec):
            for axes in spec:
                names = axes if isinstance(axes, tuple) else (axes,)
                unknown = [a for a in names if isinstance(a, str) and a not in self.mesh.shape]
                if unknown:
                    raise InvalidArgumentError(
                        f"`{name}`: the input sharding {spec} names mesh axis "
                        f"`{unknown[0]}`, but the mesh's axes are {list(self.mesh.shape)}"
                    )
            return NamedSharding(self.mesh, spec)
        if not isinstance(spec, Sharding):
            raise InvalidArgumentError(
                f"`{name}`: an entry of in_shardings is a {type(spec).__name__}; use a "
                "PartitionSpec, a jax.sharding.Sharding or None"
            )
        if set(spec.device_set) != set(self.mesh.devices.flat):
            raise InvalidArgumentError(
                f"`{name}`: the input sharding {spec} is not on the mesh's devices "
                f"({self.describe()}); every input of one function must be on the same "
                "devices: use a PartitionSpec, or a NamedSharding of the function's mesh"
            )
        return spec

    def placement(self, name: str, build: Callable[[Sequence[Any]], tuple[tuple, dict]],
                  arrays: Sequence[Any]) -> Placement:
        """The sharding of each input of one call signature (``build`` turns the flat
        inputs into ``(args, kwargs)``); ``InvalidArgumentError`` when the arguments do
        not fit ``in_shardings`` or a shape does not divide over the mesh."""
        slots = [_Slot(i) for i in range(len(arrays))]
        args, _ = build(slots)
        if len(args) != len(self.in_shardings):
            raise InvalidArgumentError(
                f"`{name}` states {len(self.in_shardings)} input shardings (one per positional "
                f"argument) but was called with {len(args)} positional arguments; state one "
                "per argument (None for a replicated one)"
            )
        shardings: list[Sharding] = [self.replicated] * len(arrays)
        paths = ["keyword argument"] * len(arrays)
        for position, (spec, arg) in enumerate(zip(self.in_shardings, args, strict=True)):
            for path, leaf in jax.tree_util.tree_flatten_with_path(arg)[0]:
                if isinstance(leaf, _Slot):
                    paths[leaf.index] = f"args[{position}]{jax.tree_util.keystr(path)}"

            try:
                pairs = _prefix_pairs(spec, arg)
            except ValueError as error:
                raise InvalidArgumentError(
                    f"`{name}`: the input sharding of argument {position} does not fit the "
                    f"argument's structure ({error}). State a PartitionSpec for the whole "
                    "argument, or a pytree of them shaped like a prefix of the argument"
                ) from None
            for spec_leaf, subtree in pairs:
                sharding = self.resolve(name, spec_leaf)
                for leaf in jax.tree_util.tree_leaves(subtree):
                    if isinstance(leaf, _Slot):
                        shardings[leaf.index] = sharding
        for index, array in enumerate(arrays):
            _check_divisible(name, paths[index], tuple(np.shape(array)), shardings[index])
        return Placement(shardings)


def _prefix_pairs(prefix: Any, tree: Any) -> list[tuple[Any, Any]]:
    """``(spec, subtree)`` for each leaf of ``prefix`` (a pytree prefix of ``tree``);
    ``ValueError`` when it is not one."""
    pairs: list[tuple[Any, Any]] = []
    jax.tree_util.tree_map(lambda spec, subtree: pairs.append((spec, subtree)), prefix, tree,
                           is_leaf=_is_spec)
    return pairs


class Placement:
    """The sharding of each input of one call signature; ``put`` places a call's inputs."""

    __slots__ = ("shardings",)

    def __init__(self, shardings: Sequence[Sharding]) -> None:
        self.shardings = tuple(shardings)

    def put(self, arrays: Sequence[Any]) -> list[Any]:
        return jax.device_put(list(arrays), list(self.shardings))  # type: ignore[no-any-return]


class _Slot:
    """Stands for input ``index`` while finding which sharding each input gets."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index


def _check_divisible(name: str, where: str, shape: tuple[int, ...], sharding: Sharding) -> None:
    if isinstance(sharding, NamedSharding):
        spec, mesh = sharding.spec, sharding.mesh
        if len(spec) > len(shape):
            raise InvalidArgumentError(
                f"`{name}`: {where} has shape {list(shape)} ({len(shape)} dimensions), but "
                f"its sharding {spec} names {len(spec)}; state a PartitionSpec with at most "
                f"{len(shape)} entries"
            )
        for dim, axes in enumerate(spec):
            if axes is None or axes is PartitionSpec.UNCONSTRAINED:
                continue
            names = axes if isinstance(axes, tuple) else (axes,)
            parts = math.prod(mesh.shape[a] for a in names)
            if shape[dim] % parts:
                axes_text = " x ".join(f"`{a}` ({mesh.shape[a]})" for a in names)
                raise InvalidArgumentError(
                    f"`{name}`: {where} has shape {list(shape)}, and its dimension {dim} "
                    f"({shape[dim]}) is split over mesh axis {axes_text}: {shape[dim]} is not "
                    f"divisible by {parts}. Send a size that is a multiple of {parts} (pad the "
                    "batch), or serve the function with a sharding that does not split this "
                    "dimension"
                )
        return
    try:
        sharding.shard_shape(shape)
    except ValueError as error:
        raise InvalidArgumentError(
            f"`{name}`: {where} of shape {list(shape)} does not fit its sharding: {error}"
        ) from None


class ShardedFunction:
    """A JAX function together with its ``Shardings`` (what ``sharded`` returns).

    Calling it calls the function unchanged; the worker and ``WrappedJaxFunction`` read
    ``__torch_jax_interop_shardings__`` and place the inputs (Note [Sharded served
    functions]). Attributes of the function (``__torch_jax_interop_params__``, the
    docstring, the signature) are kept.
    """

    def __init__(self, fn: Callable[..., Any], shardings: Shardings) -> None:
        functools.update_wrapper(self, fn)
        self.fn = fn
        setattr(self, SHARDINGS_ATTRIBUTE, shardings)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"sharded({getattr(self.fn, '__qualname__', self.fn)!r})"


def sharded(fn: Callable[..., Any] | None = None, /, *, mesh: Mesh | Callable[[], Mesh],
            in_shardings: Sequence[Any]) -> Any:
    """State how a JAX function's inputs are laid out over the devices of ``mesh``.

    Use it as a decorator (``@sharded(mesh=..., in_shardings=...)``) or a call
    (``sharded(apply, mesh=..., in_shardings=...)``) on a function to serve
    (``--function NAME=package.module:attr`` naming the decorated function, or
    ``create_server({"name": sharded_fn}, ...)``) or to wrap in this process
    (``WrappedJaxFunction(sharded_fn, params)``). Every call then puts each input on the
    mesh with its sharding (``jax.device_put``: a copy), runs the jitted function there,
    and returns outputs and gradients whole (Note [Sharded served functions]).

    Args:
        fn: the JAX function ``fn(*args, **kwargs)``.
        mesh: a ``jax.sharding.Mesh``, or a zero-argument callable returning one (built
            on first use, in the process that runs the function).
        in_shardings: one entry per positional argument: a ``PartitionSpec`` over
            ``mesh``, a ``Sharding`` on the mesh's devices, ``None`` (replicated), or a
            pytree of these shaped like a prefix of the argument (``{"w1": P(None,
            "model"), "b1": P("model"), ...}`` for a dict of parameters). Keyword
            arguments are replicated.

    Returns:
        A callable that calls ``fn`` unchanged and carries the shardings (memory: it holds
        no array).

    Raises:
        TypeError: ``mesh`` or ``in_shardings`` has the wrong type.

    On a call, an input whose shape the mesh does not divide raises
    ``InvalidArgumentError`` naming the argument and the fix.
    """
    shardings = Shardings(mesh, in_shardings)
    if fn is None:
        return lambda f: ShardedFunction(f, shardings)
    return ShardedFunction(fn, shardings)


def shardings_of(fn: Any) -> Shardings | None:
    """The ``Shardings`` a function states, or None."""
    found = getattr(fn, SHARDINGS_ATTRIBUTE, None)
    return found if isinstance(found, Shardings) else None


def is_multi_device(array: Any) -> bool:
    sharding = getattr(array, "sharding", None)
    return sharding is not None and len(sharding.device_set) > 1


def write_sharded(target: np.ndarray, array: jax.Array) -> None:
    """Copy a (host-addressable) sharded array into ``target`` shard by shard: one copy,
    each replicated shard once, no gathered intermediate."""
    for shard in array.addressable_shards:
        if shard.replica_id == 0:
            target[shard.index] = np.asarray(shard.data)
