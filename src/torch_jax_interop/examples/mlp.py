"""A small JAX MLP: the remote middle of the demo's torch model.

``params`` is a dict ``{"w1", "b1", "w2", "b2"}``; the trainer creates it with torch
(``init_params_torch`` in ``torch_jax_interop.demo``), so the torch side needs no JAX.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def apply(params: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    """Two dense layers with a tanh between: ``tanh(x @ w1 + b1) @ w2 + b2``."""
    hidden = jnp.tanh(x @ params["w1"] + params["b1"])
    return hidden @ params["w2"] + params["b2"]
