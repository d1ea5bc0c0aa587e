"""The demo (README, "The two commands"): worker process + remote training + in-process
check + cleanup."""

from __future__ import annotations

import subprocess
import sys


def test_demo_trains_remotely_matches_in_process_and_cleans_up() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "torch_jax_interop.demo", "--steps", "40"],
        capture_output=True, text=True, timeout=600,
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "transport: shared memory" in out
    assert "parameters match in-process training: True" in out
    assert "shared-memory segments left behind: 0" in out
    assert "worker stopped (exit code 0)" in out
    first, last = out.split("remote training:")[1].split("loss")[1].split("->")[:2]
    assert float(last.split()[0]) < float(first)
