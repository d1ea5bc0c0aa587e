"""How much memory a new shared-memory region may take (Linux; elsewhere: unknown).

Note [Regions are memory]
=========================

A region's pages are RAM (or swap) for as long as the region lives: ``posix_fallocate``
gives a tmpfs file or a memfd real pages at once (Note [Shared memory ownership]). A
directory with a size limit (``/dev/shm``, a container's ``shm_size``) answers a region too
large for it with ENOSPC, a clear error. A memfd (Note [Sealed regions]) lives on the
kernel's internal tmpfs, which has no size limit: ``fallocate`` of more than the machine can
hold does not fail, it wakes the OOM killer, which kills the largest process on the machine
(this one, the worker, or somebody else's) or, in a container, this container's. Measured:
``worker.empty(8 << 30)`` (a 32 GiB region) on a machine with 24 GiB of RAM and no swap
killed the client with SIGKILL before anything could raise.

So a region is created only when the memory it needs is there, keeping a reserve for
everything else (:func:`memory_room`): what ``/proc/meminfo`` calls available, plus free
swap, and, where this process's cgroup (v1 or v2, or one of its ancestors) sets a memory
limit, that limit less the cgroup's use that cannot be reclaimed (its usage less its
inactive page cache, as ``docker stats`` counts). A bigger region is refused with
``SharedMemoryFullError`` (ENOMEM), which says how much there was.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

MEMINFO = "/proc/meminfo"
CGROUP_OF_SELF = "/proc/self/cgroup"
CGROUP_ROOT = "/sys/fs/cgroup"
"""Where the figures are read (module attributes, so that tests can point them elsewhere)."""

_UNLIMITED = 1 << 60  # cgroup v1 writes "no limit" as a page-aligned 2**63 - 1
_MAX_RESERVE = 256 << 20


@dataclass(frozen=True)
class MemoryRoom:
    """Bytes a new region may take (``available`` less ``reserve``), and whence."""

    available: int
    reserve: int
    source: str

    @property
    def allowed(self) -> int:
        return max(self.available - self.reserve, 0)


def reserve_for(total: int) -> int:
    """Memory left to everything else: 1/32 of ``total``, at most 256 MiB."""
    return min(total // 32, _MAX_RESERVE)


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except (OSError, ValueError):
        return None


def _meminfo(text: str) -> MemoryRoom | None:
    fields: dict[str, int] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            fields[name] = int(parts[0]) * 1024  # kB
    if "MemAvailable" not in fields or "MemTotal" not in fields:
        return None
    swap = fields.get("SwapFree", 0)
    return MemoryRoom(fields["MemAvailable"] + swap,
                      reserve_for(fields["MemTotal"] + fields.get("SwapTotal", 0)),
                      "available memory and free swap (/proc/meminfo)")


def _stat_value(text: str | None, *names: str) -> int:
    for line in (text or "").splitlines():
        key, _, value = line.partition(" ")
        if key in names and value.strip().isdigit():
            return int(value)
    return 0


def _cgroup_room(directory: str, limit_file: str, usage_file: str, inactive: tuple[str, ...],
                 label: str) -> MemoryRoom | None:
    limit_text = _read(os.path.join(directory, limit_file))
    usage_text = _read(os.path.join(directory, usage_file))
    if limit_text is None or usage_text is None:
        return None
    limit_text, usage_text = limit_text.strip(), usage_text.strip()
    if not limit_text.isdigit() or not usage_text.isdigit():
        return None  # "max": no limit here
    limit = int(limit_text)
    if limit >= _UNLIMITED:
        return None
    cache = _stat_value(_read(os.path.join(directory, "memory.stat")), *inactive)
    used = max(int(usage_text) - cache, 0)
    return MemoryRoom(max(limit - used, 0), reserve_for(limit),
                      f"the memory limit of cgroup {label} less its use")


_CgroupFiles = tuple[str, str, str, tuple[str, ...], str]


def _cgroup_dirs(cgroup_text: str, cgroup_root: str) -> list[_CgroupFiles]:
    """(directory, limit file, usage file, inactive-cache keys, label) of this process's
    cgroup and of each ancestor, for the memory controller of cgroup v2 and v1."""
    found: list[_CgroupFiles] = []
    for line in cgroup_text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            root, files = cgroup_root, ("memory.max", "memory.current", ("inactive_file",))
        elif "memory" in controllers.split(","):
            root, files = os.path.join(cgroup_root, "memory"), (
                "memory.limit_in_bytes", "memory.usage_in_bytes", ("total_inactive_file",))
        else:
            continue
        path = path.strip().strip("/")
        while True:
            # in a container the cgroup's own directory is usually the mount's root
            directory = os.path.join(root, path) if path else root
            found.append((directory, *files, "/" + path))
            if not path:
                break
            path = os.path.dirname(path)
    return found


def memory_room() -> MemoryRoom | None:
    """The tightest of the machine's and this process's cgroups' room (Note [Regions are
    memory]); None where none of them can be read (not Linux)."""
    rooms = []
    meminfo = _read(MEMINFO)
    if meminfo is not None:
        room = _meminfo(meminfo)
        if room is not None:
            rooms.append(room)
    cgroups = _read(CGROUP_OF_SELF)
    if cgroups is not None:
        for directory, limit, usage, inactive, label in _cgroup_dirs(cgroups, CGROUP_ROOT):
            room = _cgroup_room(directory, limit, usage, inactive, label)
            if room is not None:
                rooms.append(room)
    return min(rooms, key=lambda r: r.allowed) if rooms else None
