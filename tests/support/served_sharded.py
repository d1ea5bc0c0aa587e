"""Served functions that run over every device of the worker (Note [Sharded served
functions] in ``_sharding.py``): the MLP of ``served.py``, data parallel over the batch with
its hidden layer's weights sharded over the same devices."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from support import served
from torch_jax_interop.server import sharded


def all_devices() -> Mesh:
    """A one-axis mesh over every device of this process (2 with
    ``XLA_FLAGS=--xla_force_host_platform_device_count=2``)."""
    return Mesh(np.array(jax.devices()), ("data",))


PARAMS = {"w1": P(None, "data"), "b1": P("data"), "w2": P("data", None), "b2": None}
"""The hidden layer split over the devices (columns of w1, rows of w2); b2 replicated."""


@sharded(mesh=all_devices, in_shardings=(PARAMS, P("data")))
def mlp_apply(params: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    """``served.mlp_apply``, the batch and the hidden layer split over the devices."""
    return served.mlp_apply(params, x)


@sharded(mesh=all_devices, in_shardings=(PARAMS, P("data"), P("data")))
def mlp_loss(params: dict[str, jax.Array], x: jax.Array, labels: jax.Array) -> jax.Array:
    """``served.mlp_loss`` (a scalar: gradients with the forward pass), sharded likewise."""
    return served.mlp_loss(params, x, labels)


@sharded(mesh=all_devices, in_shardings=(P("data"),))
def batch_sum(x: Any) -> jax.Array:
    """Sums over the batch (an all-reduce across the devices)."""
    return x.sum(axis=0)
