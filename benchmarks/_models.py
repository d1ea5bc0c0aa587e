"""JAX functions the benchmarks call, in one process and on a worker.

A worker loads them by name (``--function mlp=benchmarks._models:mlp_apply``) with the
repository root on its ``PYTHONPATH``. Imports only numpy and JAX (a worker has no torch).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

MLP_SIZES = (784, 256, 10)
MLP_BATCH = 256
LEARNING_RATE = 0.01


def identity(x: Any) -> Any:
    return x


def tiny(params: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    """A few flops: the cost measured around it is the wrapper's own."""
    return jnp.tanh(x @ params["w"] + params["b"])


def tiny_params() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "w": rng.standard_normal((3, 2)).astype(np.float32),
        "b": np.zeros(2, np.float32),
    }


def mlp_apply(params: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    """784-256-10 MLP, ReLU: logits."""
    hidden = jax.nn.relu(x @ params["w1"] + params["b1"])
    return hidden @ params["w2"] + params["b2"]


def mlp_params(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    d_in, d_hidden, d_out = MLP_SIZES
    return {
        "w1": (rng.standard_normal((d_in, d_hidden)) / np.sqrt(d_in)).astype(np.float32),
        "b1": np.zeros(d_hidden, np.float32),
        "w2": (rng.standard_normal((d_hidden, d_out)) / np.sqrt(d_hidden)).astype(np.float32),
        "b2": np.zeros(d_out, np.float32),
    }


def mlp_batch(seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((MLP_BATCH, MLP_SIZES[0])).astype(np.float32)
    y = rng.integers(0, MLP_SIZES[-1], MLP_BATCH).astype(np.int32)
    return x, y


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy, as ``torch.nn.functional.cross_entropy`` computes it."""
    log_probs = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=1))


def mlp_loss(params: dict[str, jax.Array], x: jax.Array, labels: jax.Array) -> jax.Array:
    """The MLP's mean cross-entropy: a scalar, the function a loss-in-JAX step wraps."""
    return cross_entropy(mlp_apply(params, x), labels)


def make_sgd_step(apply: Any = mlp_apply, learning_rate: float = LEARNING_RATE) -> Any:
    """One pure-JAX training step, optax-style SGD written by hand, jitted."""

    def loss_fn(params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        return cross_entropy(apply(params, x), y)

    @jax.jit
    def step(params: Any, x: jax.Array, y: jax.Array) -> tuple[Any, jax.Array]:
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates = jax.tree.map(lambda g: -learning_rate * g, grads)
        return jax.tree.map(jnp.add, params, updates), loss

    return step
