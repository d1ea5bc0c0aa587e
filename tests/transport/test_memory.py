"""Note [Regions are memory] (transport/_memory.py): a region the memory cannot hold is
refused before anything is created, instead of waking the OOM killer.

The figures are read from files; the tests that must not really exhaust memory point the
module at files they write (``MEMINFO``, ``CGROUP_OF_SELF``, ``CGROUP_ROOT``), so that a
broken check fails the test by creating a small region, never by filling the machine.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from support.memory import meminfo, pretend_machine

from torch_jax_interop._errors import SharedMemoryFullError
from torch_jax_interop.transport import SHM_PREFIX, SharedMemoryRegion, _memory
from torch_jax_interop.transport._memfd import sealing_supported
from torch_jax_interop.transport._shm_pool import (
    LARGE_REGION_STEP,
    POWER_OF_TWO_UP_TO,
    _SharedMemoryKind,
)

MiB = 1 << 20
GiB = 1 << 30


@pytest.fixture
def machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """2 GiB, 100 MiB available, no swap, no cgroup limit (``support.memory``)."""
    return pretend_machine(tmp_path, monkeypatch)


def _cgroup(root: Path, path: str, files: dict[str, str]) -> None:
    directory = root / path.strip("/")
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(text)


def _our_regions() -> list[str]:
    mine = f"{SHM_PREFIX}{os.getpid()}-"
    names = [n for n in os.listdir("/dev/shm") if n.startswith(mine)]
    fds = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(f"/memfd:{mine}"):
            fds.append(target)
    return names + fds


def test_this_machine_has_a_room_below_its_memory() -> None:
    room = _memory.memory_room()
    assert room is not None  # Linux: /proc/meminfo is there
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert 0 < room.reserve <= 256 * MiB
    assert 0 < room.allowed < room.available
    assert room.allowed < total + 64 * GiB  # plus swap, which this machine may have


@pytest.mark.parametrize("sealed", [True, False])
def test_a_region_over_the_available_memory_is_refused_and_leaves_nothing(
        machine: Path, sealed: bool) -> None:
    if sealed and not sealing_supported():
        pytest.skip("no sealed memfds here")
    before = _our_regions()
    with pytest.raises(SharedMemoryFullError) as info:
        SharedMemoryRegion.create(200 * MiB, sealed=sealed)
    assert info.value.errno == errno.ENOMEM
    message = str(info.value)
    assert "200.0 MiB" in message and "100.0 MiB" in message and "/proc/meminfo" in message
    assert "OOM killer" in message and "mem_limit" in message and "--memory" in message
    assert _our_regions() == before
    # what fits (less the reserve: 1/32 of 2 GiB) is created as before
    with SharedMemoryRegion.create(8 * MiB, sealed=sealed) as region:
        region.buffer[-1] = 1


def test_free_swap_counts_and_the_reserve_is_kept(machine: Path) -> None:
    (machine / "meminfo").write_text(meminfo(100 * 1024, swap_free_kib=300 * 1024))
    room = _memory.memory_room()
    assert room is not None
    assert room.available == 400 * MiB
    assert room.reserve == (2 * GiB + 300 * MiB) // 32
    assert room.allowed == 400 * MiB - room.reserve


@pytest.mark.parametrize("version", [1, 2])
def test_a_cgroup_limit_tighter_than_the_machine_decides(machine: Path, version: int) -> None:
    (machine / "meminfo").write_text(meminfo(6 << 20))  # 6 GiB available on the machine
    sys_root = machine / "sys"
    # the limit sits on an ancestor of this process's cgroup; inactive page cache is
    # reclaimable, so it does not count as used
    if version == 2:
        (machine / "cgroup").write_text("0::/box/job\n")
        _cgroup(sys_root, "box", {"memory.max": f"{1 * GiB}\n",
                                  "memory.current": f"{700 * MiB}\n",
                                  "memory.stat": f"anon 1\ninactive_file {200 * MiB}\n"})
        _cgroup(sys_root, "box/job", {"memory.max": "max\n", "memory.current": "5\n"})
    else:
        (machine / "cgroup").write_text("4:memory:/box/job\n1:cpu:/box\n")
        _cgroup(sys_root / "memory", "box", {
            "memory.limit_in_bytes": f"{1 * GiB}\n", "memory.usage_in_bytes": f"{700 * MiB}\n",
            "memory.stat": f"cache 1\ntotal_inactive_file {200 * MiB}\n"})
        _cgroup(sys_root / "memory", "box/job", {
            "memory.limit_in_bytes": "9223372036854771712\n",
            "memory.usage_in_bytes": "5\n"})
    room = _memory.memory_room()
    assert room is not None
    assert room.available == 1 * GiB - 500 * MiB
    assert room.reserve == GiB // 32
    assert "/box" in room.source
    with pytest.raises(SharedMemoryFullError, match="cgroup /box"):
        SharedMemoryRegion.create(600 * MiB, sealed=sealing_supported())


def test_unreadable_figures_leave_the_decision_to_the_kernel(machine: Path) -> None:
    (machine / "meminfo").write_text("garbage\n")
    (machine / "cgroup").write_text("0::/nowhere\n")
    assert _memory.memory_room() is None


def test_large_regions_are_not_rounded_up_to_a_power_of_two() -> None:
    kind = _SharedMemoryKind(None, True, None, sealing_supported())
    assert kind.preferred_size(100_000) == 131_072
    assert kind.preferred_size(POWER_OF_TWO_UP_TO) == POWER_OF_TWO_UP_TO
    assert kind.preferred_size(POWER_OF_TWO_UP_TO + 1) == POWER_OF_TWO_UP_TO + LARGE_REGION_STEP
    nine = 9 * GiB + 1
    assert kind.preferred_size(nine) == 9 * GiB + LARGE_REGION_STEP  # not 16 GiB
