"""Point this process's memory figures (Note [Regions are memory], transport/_memory.py) at
files a test writes: a check that failed would then create a small region, never fill the
machine."""

from __future__ import annotations

from pathlib import Path

import pytest

from torch_jax_interop.transport import _memory


def meminfo(available_kib: int, total_kib: int = 2 << 20, swap_free_kib: int = 0) -> str:
    """A ``/proc/meminfo`` with these figures (kB, as the kernel writes them)."""
    return (f"MemTotal:       {total_kib} kB\nMemFree:        {available_kib // 2} kB\n"
            f"MemAvailable:   {available_kib} kB\nSwapTotal:      {swap_free_kib} kB\n"
            f"SwapFree:       {swap_free_kib} kB\n")


def pretend_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                    available_kib: int = 100 * 1024) -> Path:
    """A machine with 2 GiB, ``available_kib`` available, no swap and no cgroup limit;
    returns the folder of its files (``meminfo``, ``cgroup``, ``sys/``)."""
    (tmp_path / "meminfo").write_text(meminfo(available_kib))
    (tmp_path / "cgroup").write_text("0::/\n")
    (tmp_path / "sys").mkdir(exist_ok=True)
    monkeypatch.setattr(_memory, "MEMINFO", str(tmp_path / "meminfo"))
    monkeypatch.setattr(_memory, "CGROUP_OF_SELF", str(tmp_path / "cgroup"))
    monkeypatch.setattr(_memory, "CGROUP_ROOT", str(tmp_path / "sys"))
    return tmp_path
