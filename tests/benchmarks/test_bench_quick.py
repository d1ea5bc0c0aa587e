"""The benchmark suite runs end to end (``--quick``) and writes what it promises.

Never asserts a time: only that the JSON has its schema and finite positive medians, the
plot is a PNG, and the Markdown table has its rows. The `remote` group joins when the
service client is importable.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
RECORD_KEYS = {
    "group",
    "name",
    "variant",
    "bytes",
    "repetitions",
    "median_s",
    "p10_s",
    "p90_s",
    "status",
    "note",
    "reference",
}
MACHINE_KEYS = {"cpu", "cores", "gpu", "python", "versions", "date"}

pytestmark = pytest.mark.slow  # ~15-30 s: one quick run of the suite, shared by the tests


def _client_missing_reason() -> str | None:
    try:
        if importlib.util.find_spec("torch_jax_interop.client") is None:
            return "torch_jax_interop.client does not exist"
        from torch_jax_interop.client import connect  # noqa: F401
    except ImportError as error:
        return f"the service client cannot be imported: {error}"
    return None


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], str]:
    out = tmp_path_factory.mktemp("bench")
    groups = ["convert", "autograd", "torch_module"]
    if _client_missing_reason() is None:
        groups += ["remote", "pipeline"]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--quick",
            "--no-progress",
            "--only",
            ",".join(groups),
            "--out",
            str(out),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out, groups, result.stdout


def test_json_schema_and_medians(quick_run: tuple[Path, list[str], str]) -> None:
    out, groups, _ = quick_run
    document: dict[str, Any] = json.loads((out / "latest.json").read_text())
    assert document["quick"] is True
    assert MACHINE_KEYS <= set(document["machine"])
    assert {"torch", "jax", "grpcio", "protobuf"} <= set(document["machine"]["versions"])
    records = document["records"]
    assert {record["group"] for record in records} == set(groups)
    measured = [record for record in records if record["status"] == "ok"]
    assert measured
    for record in records:
        assert RECORD_KEYS <= set(record), record
    for record in measured:
        for key in ("median_s", "p10_s", "p90_s"):
            assert math.isfinite(record[key]) and record[key] > 0, record
        assert record["p10_s"] <= record["median_s"] <= record["p90_s"], record
        assert record["repetitions"] >= 1
    for record in records:
        if record["status"] != "ok":
            assert record["note"], record  # a skipped or failed case says why
    convert = {(r["name"], r["variant"], r["bytes"]) for r in measured if r["group"] == "convert"}
    for name, raw in (
        ("torch_to_jax float32", "raw jax.dlpack.from_dlpack"),
        ("jax_to_torch float32", "raw torch.from_dlpack"),
    ):
        for nbytes in (64, 64 * 2**20):
            assert (name, "ours", nbytes) in convert
            assert (name, raw, nbytes) in convert
    for comparison in document["comparisons"]:
        assert comparison["result"] in ("PASS", "MISS", "n/a")
        if comparison["ratio"] is not None:
            assert math.isfinite(comparison["ratio"]) and comparison["ratio"] > 0


def test_mlp_case_with_passive_openmp_runs_in_a_child_process(
    quick_run: tuple[Path, list[str], str],
) -> None:
    """The loss-in-JAX MLP case measured again in a child whose torch read
    OMP_WAIT_POLICY=PASSIVE: its variants join the run, next to the no-wrapper floor."""
    out, _, _ = quick_run
    document = json.loads((out / "latest.json").read_text())
    assert document["facts"]["autograd"]["passive_child_environment"] == {
        "OMP_WAIT_POLICY": "PASSIVE"}
    name = "MLP 784-256-10 train step, batch 256, loss in JAX, OMP_WAIT_POLICY=PASSIVE"
    variants = {r["variant"] for r in document["records"]
                if r["name"] == name and r["status"] == "ok"}
    assert {"ours", "pure JAX (jit, hand-written SGD)",
            "floor: jitted value_and_grad + torch SGD step (no wrapper)"} <= variants
    ratios = {(c["variant"], c["reference"]): c for c in document["comparisons"]
              if c["name"] == name}
    target = ratios[("ours", "pure JAX (jit, hand-written SGD)")]
    assert target["target"]["value"] == 1.3 and target["result"] in ("PASS", "MISS")


def test_remote_group_cleans_up(quick_run: tuple[Path, list[str], str]) -> None:
    out, groups, _ = quick_run
    if "remote" not in groups:
        pytest.skip(f"remote group not run: {_client_missing_reason()}")
    document = json.loads((out / "latest.json").read_text())
    facts = document["facts"]["remote"]
    assert facts["shm_segments_left"] == []
    assert facts["worker_exit_code"] == 0
    transports = {
        r["variant"]
        for r in document["records"]
        if r["group"] == "remote" and r["name"] == "identity round trip" and r["status"] == "ok"
    }
    assert {"memcpy (np.copyto)", "bare gRPC echo"} <= transports


def test_plot_is_a_png(quick_run: tuple[Path, list[str], str]) -> None:
    out, _, _ = quick_run
    data = (out / "throughput.png").read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000


def test_markdown_table_has_rows(quick_run: tuple[Path, list[str], str]) -> None:
    out, groups, stdout = quick_run
    table = (out / "latest.md").read_text()
    assert "#### Targets" in table and "| group | case |" in table
    for row in (
        "| convert | torch_to_jax float32 | 64 B |",
        "| convert | jax_to_torch float32 | 64 MiB |",
        "| convert | torch_to_jax, each of",
        "| autograd | WrappedJaxFunction fwd+bwd, tiny fn |",
        "| autograd | MLP 784-256-10 train step, batch 256, loss in torch |",
        "| autograd | MLP 784-256-10 train step, batch 256, loss in JAX |",
        "| torch_module | small CNN train step",
    ):
        assert row in table
    if "remote" in groups:
        assert "| remote | small call, 16 floats | 64 B |" in table
        assert "#### Remote identity round trip" in table
        assert "| pipeline | two-stage pipeline, torch stage + JAX worker stage |" in table
    assert table in stdout  # the run prints the table it wrote
