"""The `distributed` benchmark group runs end to end (``--quick``): two workers, ``torchrun``
with 1 and 2 ranks, facts and table written, workers stopped, no segment left; and the
multi-host sketch's row (one worker over unix + shared memory and over TCP + TLS + inline
bytes). Never asserts a time."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

REPO_ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow  # ~45 s on two cores: two workers, two torchrun jobs


def test_distributed_group_reports_steps_per_second_and_the_all_reduce_share(
    tmp_path: Path,
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--no-progress", "--only",
         "distributed", "--out", str(tmp_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    document = json.loads((tmp_path / "latest.json").read_text())
    records = [r for r in document["records"] if r["group"] == "distributed"]
    assert all(r["status"] == "ok" for r in records), records
    assert {r["variant"] for r in records} >= {"1 rank", "2 ranks", "2 ranks, no all-reduce"}
    facts = document["facts"]["distributed"]
    assert set(facts["ranks"]) == {"1", "2"}
    for fact in facts["ranks"].values():
        assert math.isfinite(fact["steps_per_s"]) and fact["steps_per_s"] > 0
        assert math.isfinite(fact["all_reduce_share_of_step"])
        assert fact["all_reduce_alone_s"] > 0
        assert fact["transport"] == "shared memory"
    assert facts["worker_exit_codes"] == [0, 0]
    # the multi-host sketch: one worker reached over its unix socket (shared memory) and
    # over TCP with TLS and the token (inline bytes)
    sketch = [r for r in records if r["name"].startswith("demo MLP train step, one rank")]
    assert {r["variant"] for r in sketch} == {"unix socket + shared memory",
                                              "TCP + TLS + token, inline bytes"}, sketch
    assert facts["across_hosts"]["unix socket + shared memory"]["transport"] == "shared memory"
    assert facts["across_hosts"]["TCP + TLS + token, inline bytes"]["transport"] == "inline"
    assert facts["shm_segments_left"] == []
    table = (tmp_path / "latest.md").read_text()
    assert "#### Data-parallel training, a worker per rank (no target)" in table
    assert "| 2 | " in table
