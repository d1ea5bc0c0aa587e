"""Soak: many remote training steps against one JAX worker; memory must stay flat.

    .venv/bin/python scripts/soak.py                 # 10,000 steps
    .venv/bin/python scripts/soak.py --steps 2000 --json .cache/soak.json

Starts a worker on a unix socket in a temporary directory, trains the demo model (torch
layers around ``WrappedJaxFunction(worker.function("mlp"), params)``, so every step runs a
forward with residuals and a backward in the worker) and reports the resident memory (RSS)
of the worker and of this client at the start (after a warm-up that compiles and sizes the
pools), every ``--report-every`` steps, and at the end, with the residual and region counts
that bound it: live residual handles and queued releases on the client, shared-memory regions
in the client's pool and mapped by the worker, and residual-cap evictions in the worker's log.
Exit code 1 when either process grew by more than ``--max-growth-mib`` after the warm-up, or
when a segment or the worker process is left behind. Not a test: it takes minutes.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch

from torch_jax_interop._names import TRANSPORTS
from torch_jax_interop._wrapped import WrappedJaxFunction
from torch_jax_interop.client import connect
from torch_jax_interop.client._connect import ResidualHandle
from torch_jax_interop.demo import HIDDEN, IN, MID, OUT, init_params_torch, synthetic_batch
from torch_jax_interop.transport import NAME_PATTERN


def rss_mib(pid: int) -> float:
    """Resident set size in MiB (psutil when installed, else /proc/PID/status VmRSS)."""
    try:
        import psutil

        return float(psutil.Process(pid).memory_info().rss) / (1 << 20)
    except ImportError:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def mapped_segments(pid: int) -> int:
    """Shared-memory segments of the project that ``pid`` maps (distinct files)."""
    with open(f"/proc/{pid}/maps") as f:
        # File regions (/dev/shm/tji-...) and sealed memfd regions (/memfd:tji-...).
        names = re.finditer(r"(?:/|/memfd:)(" + NAME_PATTERN.pattern + ")", f.read())
        return len({match.group(1) for match in names})


def start_worker(directory: str) -> tuple[subprocess.Popen[bytes], str, str]:
    socket_path = os.path.join(directory, "w.sock")
    ready = os.path.join(directory, "ready.json")
    log_path = os.path.join(directory, "worker.log")
    cmd = [sys.executable, "-m", "torch_jax_interop.server", "--listen",
           f"unix://{socket_path}", "--ready-file", ready,
           "--function", "mlp=torch_jax_interop.examples.mlp:apply"]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not os.path.exists(ready):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            with open(log_path) as f:
                raise RuntimeError(f"the worker did not start:\n{f.read()}")
        time.sleep(0.05)
    with open(ready) as f:
        return process, json.load(f)["addresses"][0], log_path


def snapshot(step: int, worker: Any, worker_pid: int, loss: float) -> dict[str, Any]:
    gc.collect()
    session = worker._session
    pool = session.pool if session is not None else None
    return {
        "step": step,
        "loss": round(loss, 5),
        "worker_rss_mib": round(rss_mib(worker_pid), 1),
        "client_rss_mib": round(rss_mib(os.getpid()), 1),
        "client_live_residual_handles": sum(
            1 for o in gc.get_objects() if type(o) is ResidualHandle and not o.done),
        "client_queued_releases": len(worker._pending_release),
        "client_pool_regions": pool.num_regions if pool is not None else 0,
        "client_pool_mib": round(pool.total_bytes / (1 << 20), 1) if pool is not None else 0,
        "worker_mapped_segments": mapped_segments(worker_pid),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--warmup", type=int, default=200,
                        help="steps before the 'start' measurement (compiles, pools, caches)")
    parser.add_argument("--report-every", type=int, default=1000)
    parser.add_argument("--transport", default="shm", choices=TRANSPORTS)
    parser.add_argument("--max-growth-mib", type=float, default=64.0)
    parser.add_argument("--json", default=None, help="also write the report here")
    args = parser.parse_args(argv)

    reports: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="tjisoak", dir="/tmp") as directory:
        process, address, log_path = start_worker(directory)
        started = time.monotonic()
        try:
            with connect(address, transport=args.transport, timeout=60) as worker:
                torch.manual_seed(0)
                remote = WrappedJaxFunction(worker.function("mlp"), init_params_torch(0))
                model = torch.nn.Sequential(torch.nn.Linear(IN, HIDDEN),
                                            remote, torch.nn.Tanh(), torch.nn.Linear(MID, OUT))
                optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
                reports.append(snapshot(0, worker, process.pid, float("nan")))
                loss_value = float("nan")
                for step in range(1, args.steps + 1):
                    x, y = synthetic_batch(step)
                    loss = torch.nn.functional.mse_loss(model(x), y)
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    loss_value = loss.item()
                    if step == min(args.warmup, args.steps) or step % args.report_every == 0 \
                            or step == args.steps:
                        reports.append(snapshot(step, worker, process.pid, loss_value))
                        print(json.dumps(reports[-1]), flush=True)
                transport = worker.transport
        finally:
            process.send_signal(signal.SIGTERM)
            exit_code = process.wait(timeout=60)
        elapsed = time.monotonic() - started
        with open(log_path) as f:
            log = f.read()
    left = [n for n in os.listdir("/dev/shm")
            if n.startswith((f"tji-{os.getpid()}-", f"tji-{process.pid}-"))]
    start = next(r for r in reports if r["step"] == min(args.warmup, args.steps))
    end = reports[-1]
    summary = {
        "steps": args.steps,
        "transport": transport,
        "seconds": round(elapsed, 1),
        "steps_per_second": round(args.steps / elapsed, 1),
        "start": start,
        "end": end,
        "worker_rss_growth_mib": round(end["worker_rss_mib"] - start["worker_rss_mib"], 1),
        "client_rss_growth_mib": round(end["client_rss_mib"] - start["client_rss_mib"], 1),
        "worker_residual_cap_evictions": log.count("residual budget reached"),
        "worker_exit_code": exit_code,
        "segments_left": left,
        "reports": reports,
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "reports"}, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    grew = max(summary["worker_rss_growth_mib"], summary["client_rss_growth_mib"])
    ok = grew <= args.max_growth_mib and not left and exit_code == 0
    ok = ok and summary["worker_residual_cap_evictions"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
