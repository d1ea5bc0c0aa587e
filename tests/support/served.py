"""Small JAX functions for tests and benchmarks."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def identity(x: Any) -> Any:
    """Returns its input (a pytree of arrays) unchanged."""
    return x


def add_one(x: jax.Array) -> jax.Array:
    """``x + 1``."""
    return x + 1


def scale(params: jax.Array, x: jax.Array) -> jax.Array:
    """``params * x`` (broadcasting): a one-parameter model for gradient tests."""
    return params * x


def mlp_apply(params: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    """A 784-256-10 style MLP: ``relu(x @ w1 + b1) @ w2 + b2``."""
    hidden = jax.nn.relu(x @ params["w1"] + params["b1"])
    return hidden @ params["w2"] + params["b2"]


def mlp_loss(params: dict[str, jax.Array], x: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy of ``mlp_apply``: a scalar loss, whose gradients the worker
    computes with the forward pass."""
    log_probs = jax.nn.log_softmax(mlp_apply(params, x))
    return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=1))


def checksum(x: jax.Array) -> jax.Array:
    """Sum of the input as float32 (for load tests that verify every byte arrived)."""
    return jnp.sum(x.astype(jnp.float32))


def with_aux(params: jax.Array, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Returns ``(params * x, {"norm": |x|})``: for ``has_aux=True``."""
    return params * x, {"norm": jnp.linalg.norm(x)}


def fails(x: jax.Array) -> jax.Array:
    """Raises at trace time (a user error in the served function)."""
    raise RuntimeError("this function always fails")


def rejects_input(x: jax.Array) -> jax.Array:
    """Raises ``ValueError`` at trace time: an error of the served function, which the client
    gets as ``RemoteExecutionError`` (not as an error of its request)."""
    raise ValueError(f"rejects_input takes no input, got shape {tuple(x.shape)}")


def slow_scale(params: jax.Array, x: jax.Array) -> jax.Array:
    """``params * x`` computed after sleeping 2 s (differentiable in ``params`` only)."""
    return params * slow_identity(x)


def slow_identity(x: jax.Array) -> jax.Array:
    """Returns ``x`` after sleeping 2 s in the worker (for deadline and drain tests)."""
    import time

    def wait(value: Any) -> Any:
        time.sleep(2.0)
        return value

    return jax.pure_callback(wait, jax.ShapeDtypeStruct(x.shape, x.dtype), x)
