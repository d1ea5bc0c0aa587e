"""``sharded``: what it refuses, and how (Note [Sharded served functions] in
``_sharding.py``). In this process, on its one CPU device: the engine that both the worker
and ``WrappedJaxFunction`` use, with real JAX; the two-device behaviour is tested through a
worker in test_sharded_worker.py."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from torch_jax_interop._engine import Engine
from torch_jax_interop.errors import InvalidArgumentError
from torch_jax_interop.server import sharded


def one_device() -> Mesh:
    return Mesh(np.array(jax.devices()[:1]), ("data",))


def _call(fn: Any, *args: Any) -> list[Any]:
    """Run ``fn(*args)`` through the engine (flat array inputs, positional arguments)."""
    leaves, treedef = jax.tree_util.tree_flatten(args)
    engine = Engine(fn)
    program = engine.program("key", lambda arrays: (treedef.unflatten(arrays), {}),
                             len(leaves), (), False)
    out, _ = engine.call(program, leaves)
    return out


def test_a_function_with_shardings_is_called_unchanged_and_keeps_its_attributes() -> None:
    def add(x: jax.Array, y: jax.Array) -> jax.Array:
        """Adds."""
        return x + y

    add.__torch_jax_interop_params__ = lambda: {}  # type: ignore[attr-defined]
    wrapped = sharded(add, mesh=one_device, in_shardings=(P("data"), None))
    assert wrapped(1, 2) == 3
    assert wrapped.__doc__ == "Adds." and wrapped.__name__ == "add"
    assert wrapped.__torch_jax_interop_params__() == {}
    out = _call(wrapped, np.ones(4, np.float32), np.ones(4, np.float32))
    np.testing.assert_array_equal(np.asarray(out[0]), np.full(4, 2.0, np.float32))


def test_wrong_types_are_refused_when_decorating() -> None:
    with pytest.raises(TypeError, match=r"`mesh` must be a jax.sharding.Mesh or a "
                                        r"zero-argument callable"):
        sharded(lambda x: x, mesh="data", in_shardings=(P(),))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"`in_shardings` must be a tuple with one entry per "
                                        r"positional argument.*write `\(spec,\)`"):
        sharded(lambda x: x, mesh=one_device, in_shardings=P("data"))
    with pytest.raises(TypeError, match=r"`in_shardings` holds a str \('data'\); its leaves "
                                        r"must be PartitionSpecs"):
        sharded(lambda x: x, mesh=one_device, in_shardings=("data",))


@pytest.mark.parametrize(("in_shardings", "args", "message"), [
    ((P(), P()), (np.ones(2),),
     r"`f` states 2 input shardings \(one per positional argument\) but was called with 1"),
    (({"w": P()},), (np.ones(2),),
     r"`f`: the input sharding of argument 0 does not fit the argument's structure"),
    ((P("model"),), (np.ones(2),),
     r"`f`: the input sharding P(?:artitionSpec)?\('model',\) names mesh axis `model`, "
     r"but the mesh's axes are \['data'\]"),
    ((P(None, "data"),), (np.ones(2),),
     r"`f`: args\[0\] has shape \[2\] \(1 dimensions\), but its sharding "
     r"P(?:artitionSpec)?\(None, 'data'\) names 2; state a PartitionSpec with at most 1 entries"),
    (({"w": P("data")},), ({"w": np.ones((2, 3))},),
     None),  # fits: a dict of specs for a dict argument
])
def test_arguments_that_do_not_fit_the_stated_shardings_are_refused(
        in_shardings: tuple[Any, ...], args: tuple[Any, ...], message: str | None) -> None:
    def f(*args: Any) -> Any:
        return args

    fn = sharded(f, mesh=one_device, in_shardings=in_shardings)
    if message is None:
        _call(fn, *args)
        return
    with pytest.raises(InvalidArgumentError, match=message):
        _call(fn, *args)


def test_a_sharding_on_other_devices_is_refused() -> None:
    other = NamedSharding(Mesh(np.array(jax.devices()[:1]), ("x",)), P())
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    # the same devices: accepted (one device here), used as given
    _call(sharded(lambda x: x + 1, mesh=mesh, in_shardings=(other,)), np.ones(2))

    class Elsewhere(jax.sharding.SingleDeviceSharding):
        @property
        def device_set(self) -> set[Any]:  # a device this mesh does not have
            return {object()}

    fn = sharded(lambda x: x + 1, mesh=mesh,
                 in_shardings=(Elsewhere(jax.devices()[0]),))
    with pytest.raises(InvalidArgumentError, match=r"is not on the mesh's devices \(data=1\)"):
        _call(fn, np.ones(2))


def test_a_mesh_callable_that_returns_no_mesh_is_named() -> None:
    fn = sharded(lambda x: x, mesh=lambda: "not a mesh", in_shardings=(P(),))
    with pytest.raises(TypeError, match=r"the `mesh` callable returned str, not a "
                                        r"jax.sharding.Mesh"):
        _call(fn, np.ones(2))
