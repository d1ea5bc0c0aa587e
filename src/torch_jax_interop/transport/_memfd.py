"""Sealed memfd regions: what Linux offers and how the worker finds a client's memfd."""

from __future__ import annotations

import fcntl
import os

# Note [Sealed regions]
# =====================
#
# A process that maps a file takes SIGBUS when it touches a page past the file's end. A
# region is a file both sides map, so a peer of the worker's uid that shrinks its registered
# region (``ftruncate``) would kill the worker, and every other session with it, on the next
# read of an input or write of an output there. The worker therefore never depends on a size
# the peer can change after registration:
#
# * Who creates: the client makes each region a memfd (``memfd_create`` with
#   ``MFD_ALLOW_SEALING``), named ``tji-<pid>-<tag>-<hex>`` like a file region, sizes it,
#   and seals it with ``F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL``: from then on nobody,
#   the client included, can change its size, and the seals cannot be removed. It keeps the
#   descriptor open until the worker has registered the region.
# * Who maps: the worker finds the memfd by its name among the client's open descriptors
#   (``/proc/<pid>/fd``: same uid and same PID namespace; the pid is in the name), opens it
#   through ``/proc``, checks on the descriptor it got that the memfd has that name, is this
#   uid's and carries ``F_SEAL_SHRINK``, and only then maps it. Binding to the session (Note
#   [Regions belong to one session]) works as for file regions: the name carries the tag.
# * Who frees: nothing lives in ``/dev/shm``. The client closes its descriptor after
#   registration (``unlink``; Python's ``mmap`` keeps a duplicate of it while the mapping
#   lives, so the region stays findable, by its own session only, until unmapped); the
#   memory goes when the last mapping does, so a crash of either side leaves nothing
#   behind, and no janitor is needed.
#
# Where the worker cannot see the client's descriptors (another PID namespace: containers
# that share only the IPC namespace; give the trainer ``pid: service:<worker>``) it would
# have to map an unsealed file from ``/dev/shm``: it refuses, unless its operator opts in with
# ``--allow-unsealed-regions`` (every local peer of its uid is then trusted not to truncate).
# The client tries a sealed region first and falls back to a file region, then to inline
# bytes, logging why.

# Linux only (3.17+); elsewhere sealing_supported() is False and nothing reads these.
_SEAL_SHRINK: int = getattr(fcntl, "F_SEAL_SHRINK", 0)
_SEALS: int = _SEAL_SHRINK | getattr(fcntl, "F_SEAL_GROW", 0) | getattr(fcntl, "F_SEAL_SEAL", 0)


def sealing_supported() -> bool:
    """True where this process can make sealed memfd regions (Linux 3.17+)."""
    return hasattr(os, "memfd_create") and hasattr(fcntl, "F_ADD_SEALS")


def _find_memfd(pid: int, name: str) -> int | None:
    """Open (O_RDWR) the memfd called ``name`` among process ``pid``'s descriptors, or None."""
    target = f"/memfd:{name} (deleted)"
    base = f"/proc/{pid}/fd"
    try:
        entries = os.listdir(base)
    except OSError:
        return None  # no such process here (another PID namespace), or not ours
    for entry in entries:
        try:
            if os.readlink(f"{base}/{entry}") != target:
                continue
            fd = os.open(f"{base}/{entry}", os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            continue  # closed meanwhile
        # What we opened, not what the entry meant a moment ago.
        if os.readlink(f"/proc/self/fd/{fd}") == target:
            return fd
        os.close(fd)
    return None
