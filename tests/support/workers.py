"""Starting and stopping real JAX worker processes for the service tests."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
"""The tests folder: on the worker's ``PYTHONPATH``, so that it can serve ``support.*``."""

FUNCTIONS = {
    name: f"support.served:{name}"
    for name in ("identity", "add_one", "scale", "mlp_apply", "mlp_loss", "checksum", "with_aux",
                 "fails", "rejects_input", "slow_identity", "slow_scale")
}
FUNCTIONS["mlp"] = "torch_jax_interop.examples.mlp:apply"


@dataclass
class WorkerProcess:
    process: subprocess.Popen[bytes]
    address: str
    socket_path: str | None
    tcp_address: str | None
    token: str | None
    log_path: str

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()


def start_worker(tmp: str, *, tcp: bool = False, token: str | None = None,
                 extra: list[str] | None = None, env: dict[str, str] | None = None,
                 timeout: float = 120.0) -> WorkerProcess:
    """Start ``python -m torch_jax_interop.server`` and wait for its ready file."""
    socket_path = os.path.join(tmp, "w.sock")
    ready = os.path.join(tmp, "ready.json")
    log_path = os.path.join(tmp, "worker.log")
    # A worker killed earlier in the same folder leaves its ready file and socket behind: the
    # wait below would return before this worker listens, and a stop would reach it before it
    # installed its SIGTERM handler.
    for stale in (socket_path, ready, f"{ready}.tmp"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(stale)
    cmd = [sys.executable, "-m", "torch_jax_interop.server", "--listen",
           f"unix://{socket_path}", "--ready-file", ready, "--grace", "10"]
    if tcp:
        cmd += ["--listen", "127.0.0.1:0"]
    for name, target in FUNCTIONS.items():
        cmd += ["--function", f"{name}={target}"]
    cmd += extra or []
    full_env = dict(os.environ)
    full_env.pop("TORCH_JAX_INTEROP_TOKEN", None)
    if token:
        full_env["TORCH_JAX_INTEROP_TOKEN"] = token
    full_env.update(env or {})
    full_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (TESTS, full_env.get("PYTHONPATH")) if p
    )
    with open(log_path, "wb") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env)
    deadline = time.monotonic() + timeout
    while not os.path.exists(ready):
        if process.poll() is not None:
            with open(log_path) as f:
                raise RuntimeError(f"worker exited with {process.returncode}:\n{f.read()}")
        if time.monotonic() > deadline:
            process.kill()
            raise TimeoutError("worker did not start")
        time.sleep(0.05)
    with open(ready) as f:
        addresses = json.load(f)["addresses"]
    tcp_address = next((a for a in addresses if not a.startswith("unix:")), None)
    return WorkerProcess(process, addresses[0], socket_path, tcp_address, token, log_path)


def stop_worker(worker: WorkerProcess) -> int:
    if worker.process.poll() is None:
        worker.process.terminate()
        try:
            return worker.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.process.kill()
            worker.process.wait()
            raise
    return worker.process.returncode


RSS_STEADY_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
"""For workers whose RSS a test measures: glibc raises its mmap threshold after a large free
and then keeps freed large buffers in per-thread arenas (~150 MiB here, varying run to run);
a fixed threshold makes RSS follow what is alive, which is what such tests are about."""


def rss_mib(pid: int) -> float:
    """Resident set size of process ``pid`` in MiB (``VmRSS``)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")
