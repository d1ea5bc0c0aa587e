"""Fixtures: real JAX worker processes on temporary unix sockets (and TCP with a token)."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator

import pytest
from service_workers import WorkerProcess, start_worker, stop_worker


@pytest.fixture
def short_tmp() -> Iterator[str]:
    """A short directory for unix sockets (paths are limited to 107 bytes)."""
    with tempfile.TemporaryDirectory(prefix="tji", dir="/tmp") as tmp:
        yield tmp


@pytest.fixture(scope="module")
def worker() -> Iterator[WorkerProcess]:
    """One worker shared by a module's tests (unix socket + TCP with a token)."""
    with tempfile.TemporaryDirectory(prefix="tji", dir="/tmp") as tmp:
        process = start_worker(tmp, tcp=True, token="s3cret-test-token")
        try:
            yield process
        finally:
            assert stop_worker(process) == 0, process.log()


@pytest.fixture
def fresh_worker(short_tmp: str) -> Iterator[WorkerProcess]:
    """A worker of its own, for tests that kill or stop it."""
    process = start_worker(short_tmp)
    try:
        yield process
    finally:
        if process.process.poll() is None:
            process.process.kill()
            process.process.wait()
