"""Pytrees through torch_to_jax / jax_to_torch: exact structure kept, both directions.

Containers are rebuilt with the same type (tuples of any length, lists, dicts with any
hashable keys in insertion order, OrderedDict, defaultdict with its factory, namedtuples,
dataclasses of the same class) and ``None`` stays ``None``. Every other leaf passes through
as the *same object*: Python scalars, strings, numpy arrays, modules, and for the opposite
framework's arrays. Dataclasses are rebuilt by a shallow copy, so non-field attributes and
non-container field values keep their identity (no deep copy).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict, defaultdict, namedtuple
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from torch_jax_interop import jax_to_torch, torch_to_jax

# CPU tests: JAX arrays they create stay on the CPU even where JAX has a GPU.
pytestmark = pytest.mark.usefixtures("jax_default_cpu")

Point = namedtuple("Point", ["x", "y"])


@dataclasses.dataclass
class Batch:
    inputs: Any
    labels: Any
    name: str = "batch"


@dataclasses.dataclass(frozen=True)
class FrozenState:
    params: Any
    config: Any
    step: int = dataclasses.field(default=0)
    derived: int = dataclasses.field(init=False, default=-1)


@dataclasses.dataclass
class Slotted:
    __slots__ = ("value", "tag")
    value: Any
    tag: str


class Config:
    """An arbitrary object: a leaf, passed through by identity."""


DIRECTIONS = {
    "torch->jax": (torch_to_jax, lambda: torch.arange(3.0), torch.Tensor, jax.Array),
    "jax->torch": (jax_to_torch, lambda: jnp.arange(3.0), jax.Array, torch.Tensor),
}


@pytest.fixture(params=list(DIRECTIONS))
def direction(request: pytest.FixtureRequest) -> tuple[Any, Any, type, type]:
    return DIRECTIONS[request.param]


def assert_converted(out: Any, source: Any, target_type: type) -> None:
    assert isinstance(out, target_type), type(out)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(source))


def test_single_tensor_in_a_1_tuple_stays_a_1_tuple(direction) -> None:  # noqa: ANN001
    """The original package returned garbage for ``torch_to_jax((a,))``."""
    convert, make, _, target = direction
    leaf = make()
    out = convert((leaf,))
    assert type(out) is tuple and len(out) == 1
    assert_converted(out[0], leaf, target)
    nested = convert(((leaf,),))
    assert type(nested) is tuple and type(nested[0]) is tuple and len(nested[0]) == 1


@pytest.mark.parametrize("empty", [(), [], {}, OrderedDict()], ids=repr)
def test_empty_containers_keep_their_type(direction, empty) -> None:  # noqa: ANN001
    convert = direction[0]
    out = convert(empty)
    assert type(out) is type(empty) and len(out) == 0


def test_tuples_and_lists(direction) -> None:  # noqa: ANN001
    convert, make, _, target = direction
    a, b = make(), make()
    out = convert([a, (b, 1), [None, "s"]])
    assert type(out) is list and type(out[1]) is tuple and type(out[2]) is list
    assert_converted(out[0], a, target)
    assert_converted(out[1][0], b, target)
    assert out[1][1] == 1 and out[2] == [None, "s"]


def test_dict_keys_of_any_hashable_type_keep_insertion_order(direction) -> None:  # noqa: ANN001
    convert, make, _, target = direction
    key_obj = Config()
    source = {"b": make(), 1: make(), (2, "x"): 3, None: make(), frozenset({1}): "v",
              key_obj: make(), 0.5: None, "a": make()}  # fmt: skip
    out = convert(source)
    assert type(out) is dict
    assert list(out) == list(source)  # same keys, same order (no sorting)
    assert next(k for k in out if isinstance(k, Config)) is key_obj
    for key, value in source.items():
        if isinstance(value, (torch.Tensor, jax.Array)):
            assert_converted(out[key], value, target)
        else:
            assert out[key] is value


def test_ordered_dict_and_defaultdict_keep_their_type(direction) -> None:  # noqa: ANN001
    convert, make, _, target = direction
    ordered = OrderedDict([("z", make()), ("a", make())])
    out = convert(ordered)
    assert type(out) is OrderedDict and list(out) == ["z", "a"]
    assert_converted(out["z"], ordered["z"], target)

    default = defaultdict(list, {"x": make()})
    out = convert(default)
    assert type(out) is defaultdict and out.default_factory is list
    assert_converted(out["x"], default["x"], target)
    assert out["missing"] == []


def test_namedtuples_keep_their_class(direction) -> None:  # noqa: ANN001
    convert, make, _, target = direction
    point = Point(make(), (make(), "tag"))
    out = convert(point)
    assert type(out) is Point
    assert_converted(out.x, point.x, target)
    assert type(out.y) is tuple and out.y[1] == "tag"
    single = convert(Point(make(), None))
    assert type(single) is Point and single.y is None


def test_dataclasses_keep_their_class_without_deep_copy(direction) -> None:  # noqa: ANN001
    convert, make, source_type, target = direction
    config = Config()
    batch = Batch(inputs=[make(), make()], labels=make(), name="train")
    batch.extra = config  # a non-field attribute
    out = convert(batch)
    assert type(out) is Batch and out is not batch
    assert type(out.inputs) is list and len(out.inputs) == 2
    assert_converted(out.inputs[1], batch.inputs[1], target)
    assert_converted(out.labels, batch.labels, target)
    assert out.name is batch.name and out.extra is config
    assert isinstance(batch.labels, source_type), "the input was changed"


def test_frozen_and_slotted_dataclasses(direction) -> None:  # noqa: ANN001
    convert, make, _, target = direction
    config = Config()
    state = FrozenState(params={"w": make()}, config=config, step=3)
    out = convert(state)
    assert type(out) is FrozenState
    assert_converted(out.params["w"], state.params["w"], target)
    assert out.config is config and out.step == 3 and out.derived == -1
    with pytest.raises(dataclasses.FrozenInstanceError):
        out.step = 4  # type: ignore[misc]

    slotted = convert(Slotted(make(), "t"))
    assert type(slotted) is Slotted and slotted.tag == "t"
    assert isinstance(slotted.value, target)


@pytest.mark.parametrize(
    "leaf",
    [None, 0, 1.5, True, 2 + 1j, "text", b"bytes", Ellipsis, np.arange(3), Config()],
    ids=lambda v: type(v).__name__,
)
def test_non_tensor_leaves_pass_through_unchanged(direction, leaf) -> None:  # noqa: ANN001
    convert = direction[0]
    assert convert(leaf) is leaf
    out = convert({"leaf": leaf, "in_list": [leaf]})
    assert out["leaf"] is leaf and out["in_list"][0] is leaf


def test_the_other_frameworks_arrays_pass_through(direction) -> None:  # noqa: ANN001
    convert, _, source_type, _ = direction
    other = jnp.ones(2) if source_type is torch.Tensor else torch.ones(2)
    assert convert(other) is other
    assert convert([other])[0] is other


def test_deeply_nested_mix(direction) -> None:  # noqa: ANN001
    convert, make, _, target = direction
    leaves = [make() for _ in range(5)]
    tree = {
        "batch": Batch(inputs=(leaves[0],), labels=Point(leaves[1], [leaves[2], None])),
        7: [OrderedDict(a=(leaves[3], "s")), {"deep": [[[(leaves[4],)]]]}],
        "scalar": 3,
    }
    out = convert(tree)
    assert list(out) == ["batch", 7, "scalar"] and out["scalar"] == 3
    assert type(out["batch"]) is Batch and type(out["batch"].labels) is Point
    assert_converted(out["batch"].inputs[0], leaves[0], target)
    assert_converted(out["batch"].labels.y[0], leaves[2], target)
    assert out["batch"].labels.y[1] is None
    assert type(out[7][0]) is OrderedDict and out[7][0]["a"][1] == "s"
    assert_converted(out[7][0]["a"][0], leaves[3], target)
    deepest = out[7][1]["deep"][0][0][0]
    assert type(deepest) is tuple and len(deepest) == 1
    assert_converted(deepest[0], leaves[4], target)


def test_pytree_leaves_are_converted_zero_copy() -> None:
    t = torch.arange(16.0)
    out = torch_to_jax({"t": t, "pair": (t, t)})
    assert out["t"].unsafe_buffer_pointer() == t.data_ptr()
    assert out["pair"][1].unsafe_buffer_pointer() == t.data_ptr()
    a = jnp.arange(16.0)
    back = jax_to_torch([a, (a,)])
    assert back[1][0].data_ptr() == a.unsafe_buffer_pointer()


def test_copy_and_device_reach_every_leaf() -> None:
    t = torch.arange(16.0)
    out = torch_to_jax([t, {"k": (t,)}], copy=True)
    assert out[0].unsafe_buffer_pointer() != t.data_ptr()
    assert out[1]["k"][0].unsafe_buffer_pointer() != t.data_ptr()
    a = jnp.arange(16.0)
    back = jax_to_torch({"a": [a]}, copy=True, device="cpu")
    assert back["a"][0].data_ptr() != a.unsafe_buffer_pointer()


def test_decorated_functions_convert_pytree_arguments_and_results() -> None:
    @torch_to_jax
    def jax_fn(batch: Batch, scale: dict[str, jax.Array]) -> tuple[jax.Array, Point]:
        assert isinstance(batch.inputs[0], jax.Array) and isinstance(scale["s"], jax.Array)
        return (batch.inputs[0] * scale["s"],), Point(batch.labels, batch.name)

    (y,), point = jax_fn(Batch((torch.ones(2),), torch.zeros(1)), scale={"s": torch.tensor(3.0)})
    assert isinstance(y, torch.Tensor) and y.tolist() == [3.0, 3.0]
    assert type(point) is Point and isinstance(point.x, torch.Tensor) and point.y == "batch"
