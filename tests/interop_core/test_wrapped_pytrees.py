"""WrappedJaxFunction with parameters that are registered pytree nodes (Flax
``struct.dataclass``, Equinox modules), JAX's leaf order, and no call's tensors kept alive."""

from __future__ import annotations

import dataclasses
import gc
import weakref
from collections import OrderedDict, defaultdict, namedtuple
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from pytree_models import (
    MODELS,
    DenseParams,
    assert_trained_like_jax,
    batches,
    init_dense,
    train_in_torch,
)

from torch_jax_interop import WrappedJaxFunction, torch_to_jax
from torch_jax_interop._pytree import flatten

pytestmark = pytest.mark.usefixtures("jax_default_cpu")

@pytest.mark.parametrize("model", list(MODELS))
def test_registered_node_params_train_like_pure_jax(model: str) -> None:
    apply, init = MODELS[model]
    module = WrappedJaxFunction(apply, init(), clone_params=True)
    data = batches()
    train_in_torch(module, data)
    assert_trained_like_jax(module, apply, init, data)


def test_flax_params_keep_their_class_static_fields_and_names() -> None:
    params = init_dense()
    module = WrappedJaxFunction(lambda p, x: x @ p.w * p.scale + p.b, params)
    assert list(module.state_dict()) == ["params.w", "params.b"]  # field order, as JAX
    assert module.params["w"].data_ptr() == params.w.unsafe_buffer_pointer()  # shared
    tree = module.parameter_tree()
    assert type(tree) is DenseParams and tree.scale == 0.5
    assert tree.w is module.params["w"]


def test_equinox_module_functions_stay_constants() -> None:
    apply, init = MODELS["equinox"]
    model = init()
    module = WrappedJaxFunction(apply, model)
    assert list(module.state_dict()) == ["params.layers.0.weight", "params.layers.0.bias",
                                         "params.layers.1.weight", "params.layers.1.bias"]
    tree = module.parameter_tree()
    assert type(tree) is type(model) and tree.activation is model.activation
    x = torch.randn(2, 4)
    with torch.no_grad():
        np.testing.assert_allclose(module(x).numpy(), np.asarray(apply(model, x.numpy())),
                                   rtol=1e-6)


Pair = namedtuple("Pair", ["z", "a"])


def test_leaf_order_is_jax_order() -> None:
    tree = {
        "b": 1,
        "a": [2, None, (3, 4)],
        "c": OrderedDict([("z", 5), ("y", 6)]),
        "d": defaultdict(list, {"q": 7, "p": 8}),
        "e": Pair(9, 10),
        "f": init_dense(),
    }
    leaves, spec = flatten(tree)
    assert leaves[:10] == jax.tree_util.tree_leaves(tree)[:10]
    assert len(leaves) == len(jax.tree_util.tree_leaves(tree))
    for ours, theirs in zip(leaves, jax.tree_util.tree_leaves(tree), strict=True):
        assert ours is theirs
    rebuilt = spec.unflatten(leaves)
    assert list(rebuilt) == list(tree)  # the user's insertion order, when rebuilt
    assert type(rebuilt["f"]) is DenseParams
    assert flatten({"b": 1, "a": 2})[0] == [2, 1] == jax.tree_util.tree_leaves({"b": 1, "a": 2})


def test_torch_to_jax_converts_tensors_inside_registered_nodes() -> None:
    params = DenseParams(w=torch.ones(4, 3), b=torch.zeros(3))
    out = torch_to_jax(params)
    assert type(out) is DenseParams and out.scale == 0.5
    assert isinstance(out.w, jax.Array) and isinstance(out.b, jax.Array)
    assert out.w.unsafe_buffer_pointer() == params.w.data_ptr()  # zero-copy


@dataclasses.dataclass
class Batch:
    x: Any
    tag: str = "train"


def test_no_call_tensors_outlive_the_call() -> None:
    """The compile cache keys by structure; it must not keep the first call's tensors
    (dataclass templates used to)."""
    module = WrappedJaxFunction(lambda p, batch: jnp.sum(batch.x * p), jnp.ones(3))
    for grad in (False, True):
        x = torch.randn(3)
        watched = weakref.ref(x)
        with torch.set_grad_enabled(grad):
            out = module(Batch(x))
        if grad:
            out.backward()
        del x, out
        gc.collect()
        assert watched() is None, f"grad={grad}"
    assert module.backend.engine.live_residuals == 0


def test_registered_nodes_as_inputs_and_outputs() -> None:
    """A Flax struct as an argument (its tensors get gradients) and as the output."""

    def f(p: jax.Array, batch: DenseParams) -> DenseParams:
        return DenseParams(w=batch.w * p, b=jnp.sin(batch.b), scale=batch.scale * 2)

    module = WrappedJaxFunction(f, jnp.full((4, 3), 2.0))
    w = torch.randn(4, 3, requires_grad=True)
    b = torch.randn(3, requires_grad=True)
    out = module(DenseParams(w=w, b=b, scale=0.25))
    assert type(out) is DenseParams and out.scale == 0.5
    assert isinstance(out.w, torch.Tensor) and out.w.requires_grad
    (out.w.sum() + out.b.sum()).backward()
    torch.testing.assert_close(w.grad, torch.full((4, 3), 2.0))
    torch.testing.assert_close(b.grad, torch.cos(b.detach()))
    torch.testing.assert_close(module.params[0].grad, w.detach())
