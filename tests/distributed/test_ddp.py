"""torchrun + DDP with a JAX worker per rank (README, Scaling out): one real ``torchrun`` job.

Two workers (``WorkerGroup``, what ``torch-jax-interop worker --ranks 2`` runs) and two
torch ranks under ``python -m torch.distributed.run --nproc_per_node=2`` (gloo on CPU); each
rank's model holds a ``WrappedJaxFunction`` served by its own worker. ``ddp_checks.py`` trains
with DDP, with ``no_sync()`` gradient accumulation and with FSDP2, and one plain model on
the whole global batch; this test compares what it saved. One job checks everything: its
start-up (two torch processes, two JAX workers) is most of its ~30 s on two cores.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from torch_jax_interop._launch import WorkerGroup

torch = pytest.importorskip("torch")

HERE = Path(__file__).resolve().parent
RANKS = 2
STEPS = 3
FUNCTION = "mlp=torch_jax_interop.examples.mlp:apply"
TOLERANCE = 1e-5  # float32, a few steps: the issue measured 6e-8

pytestmark = pytest.mark.slow


def torchrun(nproc: int) -> list[str]:
    """``torchrun`` on one host with a rendezvous on a free port of 127.0.0.1 (port 0: the
    agent binds one itself, so parallel test runs cannot collide)."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            "--nnodes=1", "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0",
            f"--rdzv-id={uuid.uuid4().hex}", "--max-restarts=0"]


def segments_of(pids: list[int]) -> list[str]:
    directory = os.environ.get("TORCH_JAX_INTEROP_SHM_DIR") or "/dev/shm"
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if any(n.startswith(f"tji-{pid}-") for pid in pids))


@pytest.fixture(scope="module")
def job() -> Iterator[dict[str, Any]]:
    """Start the workers, run the torchrun job once, stop the workers; what it left."""
    directory = Path(tempfile.mkdtemp(prefix="tji", dir="/tmp"))  # socket paths < 107 bytes
    template = f"unix://{directory}/worker-{{local_rank}}.sock"
    log = (directory / "workers.log").open("wb")
    group = WorkerGroup(template, RANKS, ["--function", FUNCTION, "--grace", "5"],
                        stdout=log, stop_timeout=20)
    try:
        group.start()
        out = directory / "out"
        out.mkdir()
        process = subprocess.Popen(
            [*torchrun(RANKS), str(HERE / "ddp_checks.py"), "--address", template,
             "--out", str(out), "--steps", str(STEPS)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        try:
            output, _ = process.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
            pytest.fail("the torchrun job ran for more than 300 s:\n"
                        + output.decode(errors="replace")[-4000:])
        text = output.decode(errors="replace")
        assert process.returncode == 0, (
            f"torchrun exited with {process.returncode}:\n{text[-6000:]}")
        metas = [json.loads((out / f"meta-rank{r}.json").read_text()) for r in range(RANKS)]
        states = {name: torch.load(out / f"{name}.pt") for name in ("init", "single")}
        for run in ("ddp", "accumulate", "small-buckets", "fsdp"):
            for r in range(RANKS):
                states[f"{run}-rank{r}"] = torch.load(out / f"{run}-rank{r}.pt")
        worker_pids = group.pids
        addresses = group.addresses
        codes = group.stop()
        yield {"metas": metas, "states": states, "worker_pids": worker_pids,
               "addresses": addresses, "worker_codes": codes, "output": text,
               "trainer_pids": [m["pid"] for m in metas]}
    finally:
        group.stop()
        log.close()
        shutil.rmtree(directory, ignore_errors=True)


def max_difference(a: dict[str, Any], b: dict[str, Any]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_each_rank_talks_to_its_own_worker(job: dict[str, Any]) -> None:
    metas = job["metas"]
    assert [m["rank"] for m in metas] == list(range(RANKS))
    assert all(m["world_size"] == RANKS for m in metas)
    assert [m["address"] for m in metas] == [a[0] for a in job["addresses"]]
    assert len({m["address"] for m in metas}) == RANKS
    assert len(set(job["worker_pids"])) == RANKS
    for m in metas:
        assert m["transport"] == "shared memory", m


def test_ddp_matches_one_process_on_the_global_batch(job: dict[str, Any]) -> None:
    states = job["states"]
    # Training moved the parameters, so agreeing after it means something.
    assert max_difference(states["single"], states["init"]) > 1e-3
    # DDP keeps the replicas identical: both ranks applied the same all-reduced gradients.
    assert max_difference(states["ddp-rank0"], states["ddp-rank1"]) == 0.0
    worst = max_difference(states["ddp-rank0"], states["single"])
    assert worst < TOLERANCE, f"DDP differs from one process by {worst:.2e}"
    assert any(k.startswith("1.params.") for k in states["single"])  # the JAX MLP's own


def test_ddp_with_many_buckets_matches_too(job: dict[str, Any]) -> None:
    states, metas = job["states"], job["metas"]
    for r in range(RANKS):
        worst = max_difference(states[f"small-buckets-rank{r}"], states["single"])
        assert worst < TOLERANCE, f"rank {r}: 64 KiB buckets differ by {worst:.2e}"
        # 198 KiB of gradients in 64 KiB buckets: several all-reduces per step (after the
        # first, from which DDP rebuilds its buckets in the order gradients arrived)
        assert metas[r]["small-buckets_all_reduces"] >= 1 + 3 * (STEPS - 1), metas[r]
        assert metas[r]["ddp_all_reduces"] == STEPS, metas[r]


def test_no_sync_accumulation_matches_one_big_batch(job: dict[str, Any]) -> None:
    states, metas = job["states"], job["metas"]
    for r in range(RANKS):
        worst = max_difference(states[f"accumulate-rank{r}"], states["single"])
        assert worst < TOLERANCE, f"rank {r}: accumulation differs by {worst:.2e}"
        # no_sync() skipped the first micro-batch's all-reduces: as many as one micro-batch
        # per step, and at least one per step.
        assert metas[r]["accumulate_all_reduces"] == metas[r]["ddp_all_reduces"] >= STEPS


def test_fsdp2_fully_shard_trains_like_one_process(job: dict[str, Any]) -> None:
    states, metas = job["states"], job["metas"]
    for r in range(RANKS):
        assert metas[r]["fsdp_parameter_types"] == ["DTensor"], "fully_shard did not shard"
        worst = max_difference(states[f"fsdp-rank{r}"], states["single"])
        assert worst < TOLERANCE, f"rank {r}: FSDP2 differs from one process by {worst:.2e}"


def test_fsdp2_in_library_mode_is_refused_at_wrap_time(job: dict[str, Any]) -> None:
    """In library mode JAX reads the parameters in place and FSDP2 frees their storage
    after forward (Note [Sharded parameters in library mode] in ``_wrapped.py``): the
    ``fully_shard`` call itself raises, saying why and what to use instead."""
    for meta in job["metas"]:
        outcome = meta["fsdp_library_mode"]
        assert outcome["stage"] == "wrap", outcome
        assert outcome["error"].startswith(
            "UnsupportedTensorError: cannot make the parameter "), outcome
        assert "Serve the function from a JAX worker" in outcome["error"], outcome


def test_nothing_is_left_behind(job: dict[str, Any]) -> None:
    assert job["worker_codes"] == [0] * RANKS, "a worker did not drain and exit 0 on SIGTERM"
    for address in job["addresses"]:
        assert not os.path.exists(address[0].removeprefix("unix://"))
    assert segments_of(job["worker_pids"] + job["trainer_pids"]) == []
