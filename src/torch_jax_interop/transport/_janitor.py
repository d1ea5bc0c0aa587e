"""The janitor: removes shared-memory files whose creating process died (Note [Shared memory
ownership] in ``_shm.py``)."""

from __future__ import annotations

import os
import stat
import time

from ._shm import NAME_PATTERN, default_shm_dir


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, belongs to someone else
    except OverflowError:
        return False  # larger than any pid
    return True


def cleanup_orphans(directory: str | None = None, *, min_age: float = 0.0) -> list[str]:
    """Unlink regions whose owner process is dead; return the names removed.

    Only entries that match :data:`NAME_PATTERN`, are regular files (not links) and belong
    to this uid are considered; an entry is removed when its embedded pid is not alive and
    its last modification is at least ``min_age`` seconds old.

    Pids are only meaningful inside one PID namespace. When processes in different PID
    namespaces (containers that share only the IPC namespace) use one shm directory, run the
    janitor with ``min_age`` of a minute or so: a live client unlinks its names right after
    registering them, so an entry that old is an orphan whatever its pid says.
    """
    directory = directory if directory is not None else default_shm_dir()
    removed: list[str] = []
    now = time.time()
    uid = os.getuid()
    me = os.getpid()
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return removed
    for entry in entries:
        match = NAME_PATTERN.fullmatch(entry.name)
        if match is None:
            continue
        pid = int(match.group(1))
        if pid == me:
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(st.st_mode) or st.st_uid != uid:
            continue
        if now - st.st_mtime < min_age or _pid_alive(pid):
            continue
        try:
            os.unlink(entry.path)
        except FileNotFoundError:
            continue  # another janitor was faster
        removed.append(entry.name)
    return removed
