"""Models whose parameters are registered pytree nodes (Flax ``struct.dataclass``, an
Equinox module), for library-mode tests and as functions a test worker serves (started
with this folder on ``PYTHONPATH``). Each served function declares its parameters'
structure (Note [Registered pytree nodes in service mode] in ``server/_compiled.py``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import struct

from torch_jax_interop.server._compiled import PARAMS_ATTRIBUTE

NUM_IN, NUM_OUT = 4, 3
LR = 0.1


@struct.dataclass
class DenseParams:
    """Flax-style parameters: ``w`` and ``b`` are leaves, ``scale`` is static metadata."""

    w: jax.Array
    b: jax.Array
    scale: float = struct.field(pytree_node=False, default=0.5)


def init_dense() -> DenseParams:
    return DenseParams(w=jax.random.normal(jax.random.key(0), (NUM_IN, NUM_OUT)) * 0.5,
                       b=jnp.full((NUM_OUT,), 0.1))


def dense_apply(params: DenseParams, x: jax.Array) -> jax.Array:
    """``tanh(x @ w + b) * scale`` with Flax ``struct.dataclass`` parameters."""
    return jnp.tanh(x @ params.w + params.b) * params.scale


def init_mlp() -> eqx.nn.MLP:
    """An Equinox MLP: its activation functions are leaves that are not arrays."""
    return eqx.nn.MLP(NUM_IN, NUM_OUT, 8, 1, key=jax.random.key(1))


def mlp_apply(model: eqx.nn.MLP, x: jax.Array) -> jax.Array:
    """The Equinox MLP applied to a batch."""
    return jax.vmap(model)(x)


def _declare(fn: Callable[..., Any], init: Callable[[], Any]) -> None:
    setattr(fn, PARAMS_ATTRIBUTE, init)


_declare(dense_apply, init_dense)
_declare(mlp_apply, init_mlp)

MODELS = {"flax": (dense_apply, init_dense), "equinox": (mlp_apply, init_mlp)}
SERVED = {"flax": "pytree_models:dense_apply", "equinox": "pytree_models:mlp_apply"}


def train_in_jax(apply: Callable[..., Any], params: Any, data: list[tuple[Any, Any]],
                 lr: float) -> Any:
    """The reference: ``jax.grad`` of the mean squared error and plain SGD on the arrays of
    ``params`` (``eqx.partition`` keeps the other leaves out of the gradient)."""
    arrays, static = eqx.partition(params, eqx.is_array)

    def loss(a: Any, x: Any, y: Any) -> Any:
        return jnp.mean((apply(eqx.combine(a, static), x) - y) ** 2)

    for x, y in data:
        grads = jax.grad(loss)(arrays, x, y)
        arrays = jax.tree_util.tree_map(lambda p, g: p - lr * g, arrays, grads)
    return arrays


def batches(steps: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(6, 4, generator=generator), torch.randn(6, 3, generator=generator))
            for _ in range(steps)]


def train_in_torch(module: torch.nn.Module, data: list[tuple[torch.Tensor, torch.Tensor]]
                   ) -> None:
    optimizer = torch.optim.SGD(module.parameters(), lr=LR)
    for x, y in data:
        loss = torch.mean((module(x) - y) ** 2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def assert_trained_like_jax(module: torch.nn.Module, apply: Any, init: Any,
                            data: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    expected = train_in_jax(apply, init(), [(x.numpy(), y.numpy()) for x, y in data], LR)
    leaves = jax.tree_util.tree_leaves(expected)
    params = list(module.parameters())
    assert len(params) == len(leaves)
    initial = jax.tree_util.tree_leaves(eqx.filter(init(), eqx.is_array))
    assert not np.allclose(np.asarray(initial[0]), np.asarray(leaves[0]))  # it trained
    for tensor, leaf in zip(params, leaves, strict=True):
        np.testing.assert_allclose(tensor.detach().numpy(), np.asarray(leaf), rtol=2e-5,
                                   atol=2e-6)


