"""A served function that waits for the test: proves that an asynchronous call overlaps
the caller's work without timing anything.

``gated_scale(params, x)`` returns ``params * x``; before that, the worker writes
``started-<k>`` into the directory named by ``TJI_TEST_GATE_DIR`` (``k``: ``x``'s first
element as an int) and waits until the test creates ``gate-<k>`` there (at most
``GATE_LIMIT_S``: a test that forgets the gate fails instead of hanging).
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax

GATE_DIR_ENV = "TJI_TEST_GATE_DIR"
GATE_LIMIT_S = 60.0


def wait_for_gate(value: Any) -> Any:
    directory = os.environ[GATE_DIR_ENV]
    key = int(value.reshape(-1)[0])
    with open(os.path.join(directory, f"started-{key}"), "w"):
        pass
    gate = os.path.join(directory, f"gate-{key}")
    deadline = time.monotonic() + GATE_LIMIT_S
    while not os.path.exists(gate):
        if time.monotonic() > deadline:
            raise TimeoutError(f"nobody opened {gate} within {GATE_LIMIT_S:g} s")
        time.sleep(0.005)
    return value


def gated_scale(params: jax.Array, x: jax.Array) -> jax.Array:
    """``params * x`` once the test opened gate ``int(x[0])`` (differentiable in
    ``params`` only)."""
    return params * jax.pure_callback(wait_for_gate, jax.ShapeDtypeStruct(x.shape, x.dtype), x)
