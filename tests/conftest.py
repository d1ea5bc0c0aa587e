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
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from support.workers import WorkerProcess, start_worker, stop_worker


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


# -- Cleanup check after the whole run (issue 5, item 6) ---------------------------------
# No shared-memory segment with the project's prefix and no worker process started by this
# run may outlive it, kill tests included. Other runs share the machine, so only this run's
# leftovers count: processes below this pytest process or in its process group, and
# segments that appeared since the run started and were made by one of those processes or
# by a process that is gone (what a SIGKILLed owner would leak).

_CLEANUP: dict[str, Any] = {}
_SEGMENT_NAME = r"tji-([1-9][0-9]{0,9})-[0-9a-f]{16}"


def _shm_entries() -> dict[str, float]:
    """``path -> ctime`` of every project-prefixed entry in the shared-memory directories."""
    import re

    found: dict[str, float] = {}
    for directory in {"/dev/shm", os.environ.get("TORCH_JAX_INTEROP_SHM_DIR") or "/dev/shm"}:
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        for name in names:
            if re.fullmatch(_SEGMENT_NAME, name):
                path = os.path.join(directory, name)
                try:
                    found[path] = os.lstat(path).st_ctime
                except FileNotFoundError:
                    pass
    return found


def _processes() -> dict[int, tuple[int, int, str, str]]:
    """``pid -> (ppid, process group, state, command line)`` from /proc."""
    table: dict[int, tuple[int, int, str, str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                command = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # exited meanwhile
        table[int(entry)] = (int(fields[1]), int(fields[2]), fields[0], command)
    return table


def _leftovers() -> list[str]:
    table = _processes()
    me, group = os.getpid(), os.getpgid(0)
    ours = {pid for pid, (_, pgid, _, _) in table.items() if pgid == group} | {me}
    grew = True
    while grew:  # descendants, also those that moved to a process group of their own
        below = {pid for pid, (ppid, _, _, _) in table.items() if ppid in ours}
        grew = not below <= ours
        ours |= below
    problems = []
    for pid in sorted(ours - {me}):
        _, _, state, command = table[pid]
        if state not in "ZX" and ("torch_jax_interop.server" in command
                                  or "torch-jax-interop worker" in command):
            problems.append(f"worker process {pid} is still running: {command.strip()}")
    for path, ctime in sorted(_shm_entries().items()):
        if path in _CLEANUP["before"]:
            continue
        owner = int(os.path.basename(path).split("-")[1])
        alive = owner in table and table[owner][2] not in "ZX"
        if owner in ours or (not alive and ctime >= _CLEANUP["start"] - 1):
            problems.append(f"{path} is left behind (owner pid {owner}, "
                            f"{'still running' if alive else 'gone'})")
    return problems


def pytest_sessionstart(session: pytest.Session) -> None:
    if sys.platform.startswith("linux"):
        import time

        _CLEANUP["start"] = time.time()
        _CLEANUP["before"] = set(_shm_entries())


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run when it leaves a worker process or a shared-memory segment behind."""
    if "start" not in _CLEANUP:
        return
    import time

    deadline = time.monotonic() + 15  # a worker still draining, a finalizer still running
    while (problems := _leftovers()) and time.monotonic() < deadline:
        time.sleep(0.25)
    if not problems:
        return
    text = "\n".join(["this test run left processes or shared memory behind:", *problems])
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_sep("=", "cleanup check failed", red=True)
        reporter.write_line(text)
    else:
        print(text, file=sys.stderr)
    if session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# Real JAX worker processes on temporary unix sockets (and TCP with a token), for the client
# and server tests (tests/support/workers.py starts and stops them).

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
