"""Group `distributed`: data-parallel training under ``torchrun`` with a JAX worker per rank.

Starts two workers (``WorkerGroup``, what ``torch-jax-interop worker --ranks 2`` runs) on
unix sockets in a short temporary directory, then runs ``_distributed_rank.py`` under
``torchrun`` with 1 and with 2 ranks (gloo, CPU). Records, per rank count, the seconds per
training step of the demo model with DDP and with DDP minus its all-reduce, and one
all-reduce of all gradients alone; the facts (steps/s, the all-reduce's share of a step)
go to ``latest.json`` and the Markdown. No target: on two cores, two ranks and two workers
share the CPUs that one rank and one worker had.

The multi-host sketch (docs/scaling.md, "Ranks on one host, workers on another") is one
more row, on loopback: one training step of the same model in this process, through one
worker reached two ways, taking turns: its unix socket with shared memory (co-located),
and TCP with TLS and the token, tensors as inline bytes in the gRPC messages (what a rank
on another host gets). The certificates are made with ``openssl`` as the tests make them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ._processes import REPO_ROOT, shm_segments
from ._suite import ERROR, Record, Suite
from ._timing import summarize

GROUP = "distributed"
STEP = "demo MLP train step under DDP, global batch 256"
ALONE = "all-reduce of all gradients, alone"
DDP = "DDP"
NO_ALL_REDUCE = "DDP, no all-reduce"
RANK_COUNTS = (1, 2)
GLOBAL_BATCH = 256
FUNCTION = "mlp=torch_jax_interop.examples.mlp:apply"
REMOTE_STEP = "demo MLP train step, one rank, batch 256 (multi-host sketch, loopback)"
CO_LOCATED = "unix socket + shared memory"
ACROSS_HOSTS = "TCP + TLS + token, inline bytes"
_TOKEN_ENV = "TJI_BENCH_TOKEN"


def tasks(suite: Suite) -> list[tuple[str, Callable[[], None]]]:
    try:
        import torch  # noqa: F401

        from torch_jax_interop._launch import WorkerGroup  # noqa: F401
        from torch_jax_interop.client import connect  # noqa: F401
    except ImportError as error:
        reason = f"skipped: torch and the service client are needed ({error})"
        return [("distributed: skipped", lambda: suite.skip(GROUP, STEP, reason))]
    state: dict[str, Any] = {}
    work: list[tuple[str, Callable[[], None]]] = [
        ("distributed: start workers", lambda: start(suite, state))]
    for ranks in RANK_COUNTS:
        work.append((f"distributed: {ranks} rank(s)",
                     lambda ranks=ranks: run_ranks(suite, state, ranks)))
    work.append(("distributed: stop workers", lambda: stop(suite, state)))
    work.append(("distributed: TCP + TLS vs unix + shm", lambda: across_hosts(suite)))
    return work


def across_hosts(suite: Suite) -> None:
    """One rank's step through one worker: co-located (unix socket, shared memory) against
    what a rank on another host gets (TCP, TLS, token, inline bytes), on loopback."""
    import secrets

    import torch

    from torch_jax_interop._launch import WorkerGroup
    from torch_jax_interop.client import TlsConfig, connect
    from torch_jax_interop.demo import build_model, synthetic_batch
    from torch_jax_interop.demo.ddp import train_step

    directory = Path(tempfile.mkdtemp(prefix="tjit-", dir="/tmp"))
    suite.resources.callback(shutil.rmtree, directory, True)
    try:
        sys.path.insert(0, str(REPO_ROOT / "tests"))
        from support.certs import make_certificates  # the tests' openssl recipe

        certs = make_certificates(str(directory))
    except (ImportError, FileNotFoundError, subprocess.CalledProcessError) as error:
        suite.skip(GROUP, REMOTE_STEP, f"skipped: no test certificates ({error})")
        return
    finally:
        sys.path.remove(str(REPO_ROOT / "tests"))
    token = secrets.token_hex(16)
    log = (directory / "worker.log").open("wb")
    suite.resources.callback(log.close)
    group = WorkerGroup([f"unix://{directory}/w.sock", "127.0.0.1:0"], 1,
                        ["--function", FUNCTION, "--grace", "5", "--token-env", _TOKEN_ENV,
                         "--tls-cert", certs.server_cert, "--tls-key", certs.server_key],
                        env={**os.environ, _TOKEN_ENV: token}, stdout=log, stop_timeout=20)
    suite.resources.callback(group.stop)
    group.start()
    unix, tcp = group.bound[0]
    batches = [[synthetic_batch(step, GLOBAL_BATCH)] for step in range(8)]
    steps: dict[str, Callable[[], Any]] = {}
    workers = {
        CO_LOCATED: connect(unix, timeout=60.0, transport="shm"),
        ACROSS_HOSTS: connect(tcp, timeout=60.0, transport="inline", token=token,
                              tls=TlsConfig(ca_file=certs.ca)),
    }
    for variant, worker in workers.items():
        suite.resources.callback(worker.close)
        model = build_model(worker.function("mlp"), 0)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
        counter = iter(range(1 << 62))
        steps[variant] = (lambda m=model, o=optimizer, c=counter:
                          train_step(m, o, batches[next(c) % len(batches)]))
    # One torch thread, as the ranks run (OMP_NUM_THREADS=1): with two, torch's spinning
    # threads and the worker fight over the two cores (170 ms a step instead of 18 here).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        suite.measure(GROUP, REMOTE_STEP, GLOBAL_BATCH * 8 * 4, steps,
                      references=(CO_LOCATED,))
    finally:
        torch.set_num_threads(threads)
    suite.compare(GROUP, REMOTE_STEP, GLOBAL_BATCH * 8 * 4, ACROSS_HOSTS, CO_LOCATED)
    facts = suite.extra.setdefault(GROUP, {"ranks": {}})
    facts["across_hosts"] = {variant: {"transport": worker.transport,
                                       "moved": str(worker.stats)}
                             for variant, worker in workers.items()}
    for worker in workers.values():
        worker.close()
    group.stop()


def start(suite: Suite, state: dict[str, Any]) -> None:
    from torch_jax_interop._launch import WorkerGroup

    directory = Path(tempfile.mkdtemp(prefix="tjid-", dir="/tmp"))  # socket paths <= 107 B
    state["directory"] = directory
    state["shm_before"] = shm_segments()
    suite.resources.callback(shutil.rmtree, directory, True)
    state["template"] = f"unix://{directory}/worker-{{local_rank}}.sock"
    log = (directory / "workers.log").open("wb")
    suite.resources.callback(log.close)
    group = WorkerGroup(state["template"], max(RANK_COUNTS), ["--function", FUNCTION,
                        "--grace", "5"], stdout=log, stop_timeout=20)
    suite.resources.callback(group.stop)  # a failed task still stops the workers
    group.start()
    state["group"] = group


def run_ranks(suite: Suite, state: dict[str, Any], ranks: int) -> None:
    variant = f"{ranks} rank" + ("s" if ranks > 1 else "")
    if "group" not in state:
        suite.add(Record(GROUP, STEP, variant, 0, status=ERROR, note="the workers did not start"))
        return
    out = state["directory"] / f"ranks-{ranks}.json"
    rounds, warmup, loops = (3, 2, 2) if suite.quick else (15, 10, 5)
    argv = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
            "--nnodes=1", "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0",
            f"--rdzv-id={uuid.uuid4().hex}", "--max-restarts=0",
            "-m", "benchmarks._distributed_rank", "--address", state["template"],
            "--out", str(out), "--global-batch", str(GLOBAL_BATCH), "--rounds", str(rounds),
            "--warmup", str(warmup), "--loops", str(loops)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    try:
        result = subprocess.run(argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                                timeout=600, stdin=subprocess.DEVNULL, check=False,
                                start_new_session=True)
    except subprocess.TimeoutExpired:
        suite.add(Record(GROUP, STEP, variant, 0, status=ERROR, note="torchrun ran over 600 s"))
        return
    if result.returncode != 0 or not out.exists():
        note = f"torchrun exited with {result.returncode}: {(result.stdout + result.stderr)[-300:]}"
        suite.add(Record(GROUP, STEP, variant, 0, status=ERROR, note=note))
        return
    document = json.loads(out.read_text())
    samples, loops_done = document["samples"], document["loops"]
    batch_bytes = GLOBAL_BATCH * 8 * 4  # the demo model's input: 8 float32 features
    stats = {name: summarize(values, loops_done) for name, values in samples.items()}
    for name, label in ((DDP, variant), (NO_ALL_REDUCE, f"{variant}, no all-reduce")):
        suite.add(Record(GROUP, STEP, label, batch_bytes, stats=stats[name]))
    suite.add(Record(GROUP, ALONE, variant, document["gradient_bytes"],
                     stats=stats["all-reduce alone"]))
    step, without = stats[DDP].median_s, stats[NO_ALL_REDUCE].median_s
    facts = suite.extra.setdefault(GROUP, {"ranks": {}})
    facts["ranks"][str(ranks)] = {
        "steps_per_s": 1.0 / step,
        "samples_per_s": GLOBAL_BATCH / step,
        "step_s": step,
        "step_without_all_reduce_s": without,
        "all_reduce_share_of_step": (step - without) / step,
        "all_reduce_alone_s": stats["all-reduce alone"].median_s,
        "gradient_bytes": document["gradient_bytes"],
        "transport": document["transport"],
    }
    if ranks > 1:
        suite.compare(GROUP, STEP, batch_bytes, variant, "1 rank")
        suite.compare(GROUP, STEP, batch_bytes, f"{variant}, no all-reduce", variant)


def stop(suite: Suite, state: dict[str, Any]) -> None:
    group = state.get("group")
    if group is None:
        return
    facts = suite.extra.setdefault(GROUP, {"ranks": {}})
    facts["worker_exit_codes"] = group.stop()
    left = sorted(shm_segments() - state["shm_before"])
    facts["shm_segments_left"] = left  # other runs on this machine may add some
    if left:
        print(f"warning: /dev/shm segments left after the distributed group: {left}")


def markdown_rows(facts: dict[str, Any]) -> list[list[str]]:
    """Rows of the README's scaling table: one per rank count."""
    rows = []
    for ranks, fact in sorted(facts.get("ranks", {}).items()):
        rows.append([
            ranks,
            f"{fact['steps_per_s']:.1f}",
            f"{fact['step_s'] * 1e3:.2f} ms",
            f"{fact['step_without_all_reduce_s'] * 1e3:.2f} ms",
            f"{fact['all_reduce_share_of_step'] * 100:.0f} %",
            f"{fact['all_reduce_alone_s'] * 1e6:.0f} µs ({fact['gradient_bytes'] // 1024} KiB)",
        ])
    return rows


MARKDOWN_HEADER = ["ranks", "steps/s", "step (DDP)", "step without its all-reduce",
                   "all-reduce share of a step", "one all-reduce alone"]
