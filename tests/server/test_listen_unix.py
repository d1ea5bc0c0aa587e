"""``--listen unix:///path`` removes only a stale socket (one that refuses connections);
a regular file or a live worker's socket there makes the worker exit 2 with "address in use",
leaving what was there untouched."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import torch
from support.workers import TESTS, WorkerProcess, start_worker, stop_worker

from torch_jax_interop.client import connect


def _worker_on(path: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (TESTS, env.get("PYTHONPATH")) if p)
    return subprocess.run(
        [sys.executable, "-m", "torch_jax_interop.server", "--listen", f"unix://{path}",
         "--function", "add_one=support.served:add_one"],
        capture_output=True, text=True, timeout=120, env=env)


def test_a_regular_file_at_the_socket_path_is_left_alone(short_tmp: str) -> None:
    path = os.path.join(short_tmp, "data.sock")
    with open(path, "w") as f:
        f.write("precious")
    result = _worker_on(path)
    assert result.returncode == 2, result.stderr
    assert "address in use" in result.stderr and "is not a socket" in result.stderr
    with open(path) as f:
        assert f.read() == "precious"


def test_a_live_workers_socket_is_not_taken_over(fresh_worker: WorkerProcess) -> None:
    assert fresh_worker.socket_path is not None
    inode = os.stat(fresh_worker.socket_path).st_ino
    result = _worker_on(fresh_worker.socket_path)
    assert result.returncode == 2, result.stderr
    assert "address in use" in result.stderr and "already listens" in result.stderr
    assert os.stat(fresh_worker.socket_path).st_ino == inode
    with connect(fresh_worker.address, timeout=30) as w:  # the first worker still answers
        assert torch.equal(w.function("add_one")(torch.zeros(2)), torch.ones(2))


def test_a_stale_socket_is_replaced(short_tmp: str) -> None:
    stale = os.path.join(short_tmp, "stale.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(stale)  # bound and closed without unlinking: what a killed worker leaves
    dead.close()
    worker = start_worker(short_tmp, extra=["--listen", f"unix://{stale}"])
    try:
        with connect(f"unix://{stale}", timeout=30) as w:
            assert torch.equal(w.function("add_one")(torch.zeros(2)), torch.ones(2))
    finally:
        assert stop_worker(worker) == 0
