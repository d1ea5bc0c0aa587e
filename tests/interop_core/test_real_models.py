"""Real models trained through ``WrappedJaxFunction`` with torch optimisers match the same
training in pure JAX with optax: a Flax linen CNN (conv + dense on 8x8 images) and an
Equinox MLP, with SGD and Adam, the loss in torch or in JAX.

``test_wrapped_pytrees.py`` checks registered pytree nodes as parameters with a hand-written
SGD step; these use the real model libraries and optax as the reference.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from torch_jax_interop import WrappedJaxFunction, WrappedJaxScalarFunction

pytestmark = pytest.mark.usefixtures("jax_default_cpu")

STEPS, BATCH, CLASSES = 5, 8, 4
OPTIMISERS = {  # (torch optimiser, optax optimiser): the same update rule and defaults
    "sgd": (lambda params: torch.optim.SGD(params, lr=0.1), optax.sgd(0.1)),
    "adam": (lambda params: torch.optim.Adam(params, lr=1e-2), optax.adam(1e-2)),
}


class CNN(nn.Module):
    """Conv (3x3, 4 channels) -> relu -> 2x2 average pool -> dense: 8x8x1 images."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(nn.Conv(features=4, kernel_size=(3, 3))(x))
        x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
        return nn.Dense(CLASSES)(x.reshape((x.shape[0], -1)))


def _flax_cnn() -> tuple[Callable[..., Any], Any, tuple[int, ...]]:
    model = CNN()
    shape = (BATCH, 8, 8, 1)
    variables = model.init(jax.random.key(0), jnp.zeros(shape))
    return model.apply, variables, shape


def _equinox_mlp() -> tuple[Callable[..., Any], Any, tuple[int, ...]]:
    mlp = eqx.nn.MLP(16, CLASSES, width_size=12, depth=2, key=jax.random.key(1))
    return (lambda model, x: jax.vmap(model)(x)), mlp, (BATCH, 16)


MODELS = {"flax-cnn": _flax_cnn, "equinox-mlp": _equinox_mlp}


def _data(shape: tuple[int, ...]) -> list[tuple[np.ndarray, np.ndarray]]:
    """One batch, seen at every step (so that the loss must go down), in fresh arrays."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape, dtype=np.float32)
    labels = rng.integers(0, CLASSES, BATCH).astype(np.int32)
    return [(x.copy(), labels.copy()) for _ in range(STEPS)]


def _jax_loss(apply: Callable[..., Any]) -> Callable[..., Any]:
    def loss(params: Any, x: jax.Array, labels: jax.Array) -> jax.Array:
        logits = apply(params, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    return loss


def _train_with_optax(apply: Callable[..., Any], params: Any, optimiser: Any,
                      data: list[tuple[np.ndarray, np.ndarray]]) -> tuple[Any, list[float]]:
    arrays, static = eqx.partition(params, eqx.is_array)
    loss_of = _jax_loss(lambda a, x: apply(eqx.combine(a, static), x))
    state = optimiser.init(arrays)
    losses = []
    for x, labels in data:
        loss, grads = jax.value_and_grad(loss_of)(arrays, x, labels)
        updates, state = optimiser.update(grads, state, arrays)
        arrays = optax.apply_updates(arrays, updates)
        losses.append(float(loss))
    return arrays, losses


def _train_with_torch(module: torch.nn.Module, make_optimiser: Callable[..., Any],
                      data: list[tuple[np.ndarray, np.ndarray]], loss_in: str) -> list[float]:
    optimiser = make_optimiser(module.parameters())
    losses = []
    for x, labels in data:
        x_t, labels_t = torch.from_numpy(x), torch.from_numpy(labels)
        if loss_in == "jax":
            loss = module(x_t, labels_t)
        else:
            loss = torch.nn.functional.cross_entropy(module(x_t), labels_t.long())
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("loss_in", ["torch", "jax"])
@pytest.mark.parametrize("optimiser", list(OPTIMISERS))
@pytest.mark.parametrize("model", list(MODELS))
def test_training_through_wrapped_function_matches_optax(model: str, optimiser: str,
                                                         loss_in: str) -> None:
    apply, params, shape = MODELS[model]()
    data = _data(shape)
    make_torch_optimiser, optax_optimiser = OPTIMISERS[optimiser]
    expected, expected_losses = _train_with_optax(apply, params, optax_optimiser, data)

    if loss_in == "jax":  # a scalar output: gradients come with the forward pass
        module: torch.nn.Module = WrappedJaxScalarFunction(_jax_loss(apply), params,
                                                           has_aux=False, clone_params=True)
    else:
        module = WrappedJaxFunction(apply, params, clone_params=True)
    losses = _train_with_torch(module, make_torch_optimiser, data, loss_in)

    assert losses[-1] < losses[0]  # it learns
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-5, atol=1e-6)
    trained = [leaf for leaf in jax.tree_util.tree_leaves(module.parameter_tree())
               if isinstance(leaf, torch.Tensor)]  # not an Equinox module's functions
    reference = jax.tree_util.tree_leaves(expected)
    initial = jax.tree_util.tree_leaves(eqx.filter(params, eqx.is_array))
    assert len(trained) == len(reference) == len(initial)
    for ours, theirs, before in zip(trained, reference, initial, strict=True):
        ours = ours.detach().numpy()
        assert not np.allclose(ours, np.asarray(before))  # every leaf trained
        np.testing.assert_allclose(ours, np.asarray(theirs), rtol=1e-5, atol=1e-6)
    if loss_in == "jax":
        assert module.backend.engine.fused_calls == STEPS
