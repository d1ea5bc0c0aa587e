"""Fixtures shared by the whole test suite. Keep this small and generic.

* ``run_python``: run a snippet in a fresh interpreter (for anything that must not touch this
  process's global state: jax config, XLA_FLAGS device counts, import side effects).
* ``x64``: JAX's x64 mode switched on for one test and restored afterwards.
* ``jax_default_cpu``: new JAX arrays on the CPU even where JAX has a GPU.
* Tests marked ``gpu`` are skipped, with a reason, unless both torch and JAX see a GPU.
* Every test must leave JAX's global config as it found it (checked after each test).

This module imports neither torch nor JAX at import time: the server tests run without
torch and the client tests without JAX.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from typing import Any

import pytest


def _gpu_missing_reason() -> str | None:
    """Why the GPU tests cannot run here, or None when torch and JAX both see a GPU."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "torch sees no CUDA GPU"
    try:
        import jax

        jax.devices("gpu")
    except (ImportError, RuntimeError):
        return "JAX has no GPU backend (install jax[cuda])"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    reason = _gpu_missing_reason()
    if reason is not None:
        for item in gpu_items:
            item.add_marker(pytest.mark.skip(reason=f"needs a GPU: {reason}"))


@pytest.fixture
def run_python() -> Callable[..., subprocess.CompletedProcess[str]]:
    """``run_python(code, env=None, timeout=120)``: run ``code`` in a fresh interpreter.

    ``code`` is dedented; ``env`` entries are added to this process's environment. Returns
    the ``CompletedProcess`` (text mode, stdout and stderr captured); the caller checks it.
    """

    def run(
        code: str, env: dict[str, str] | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        full_env = {**os.environ, **(env or {})}
        return subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code)],
            env=full_env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return run


@pytest.fixture
def x64() -> Iterator[None]:
    """JAX's x64 mode on for the test, through JAX's own context manager (restored after)."""
    import jax

    from torch_jax_interop.interop_core._convert import x64_enabled

    with jax.enable_x64(True):
        assert x64_enabled(), "jax.enable_x64(True) did not reach the converter"
        yield
    assert not x64_enabled()


@pytest.fixture
def jax_default_cpu() -> Iterator[None]:
    """New JAX arrays land on the CPU, also on a GPU machine (JAX's own context manager).

    For CPU tests that compare with numpy; GPU tests place their arrays explicitly.
    """
    import jax

    with jax.default_device(jax.devices("cpu")[0]):
        yield


_WATCHED_JAX_FLAGS = (
    "jax_enable_x64",
    "jax_platforms",
    "jax_default_matmul_precision",
    "jax_default_device",
    "jax_numpy_dtype_promotion",
)


@pytest.fixture(autouse=True)
def _jax_config_unchanged() -> Iterator[None]:
    """Fail a test that changes JAX's global config and leaves it changed."""
    if "jax" not in sys.modules:
        yield
        return
    config = sys.modules["jax"].config
    before: dict[str, Any] = {name: config.values.get(name) for name in _WATCHED_JAX_FLAGS}
    yield
    after = {name: config.values.get(name) for name in _WATCHED_JAX_FLAGS}
    assert after == before, "the test changed JAX's global config and did not restore it"
