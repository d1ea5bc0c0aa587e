"""POSIX shared-memory regions shared by the torch client and the JAX worker.

Pure Python plus numpy: neither torch nor jax is imported here, because both ends use this
module. Slices are aligned to :data:`~torch_jax_interop._layout.ALIGNMENT` (64 bytes: JAX on
CPU imports aligned buffers without a copy), the one definition of that fact.

Regions are files in a tmpfs directory (``/dev/shm`` unless ``TORCH_JAX_INTEROP_SHM_DIR``
says otherwise), opened with :func:`os.open` and mapped with :mod:`mmap`.
:mod:`multiprocessing.shared_memory` is deliberately not used: on Python < 3.13 every
process that merely opens a segment registers it with its resource tracker, which unlinks
the segment when that process exits (cpython gh-82300).

Note [Shared memory ownership]
==============================

Who creates: the CLIENT (the torch process). :meth:`SharedMemoryRegion.create` makes
``<dir>/tji-<client pid>-<16 hex>`` with ``O_CREAT | O_EXCL | O_NOFOLLOW``, mode 0600,
sizes it with ``posix_fallocate`` (so a full ``/dev/shm`` fails at creation with ENOSPC,
turned into :class:`SharedMemoryFullError`, instead of a SIGBUS on first touch) and
pre-faults its pages once. The client reuses the region for many calls (see
``SharedMemoryPool``); creating a fresh segment per call is ~16x slower.

Who maps: both sides. The client maps the region at creation. It then registers the name
with the worker, which maps it with :meth:`SharedMemoryRegion.attach`. ``attach`` never
takes ownership: it cannot unlink, it registers nothing with any resource tracker, and it
refuses anything that is not a regular file of this uid with mode 0600-or-stricter whose
name matches :data:`NAME_PATTERN`.

Who unlinks, and when: the CLIENT, as soon as the worker's RegisterRegion call has returned
(the worker has its mapping by then). From that moment the file has no name; each side
keeps its own mapping, and the kernel frees the memory when the last mapping goes away
(a process exiting, or being SIGKILLed, drops its mappings). So after registration no
crash of either side can leave an entry behind in ``/dev/shm``. Only the window between
create and unlink can leak a name; three things cover it:

* the owner's :class:`SharedMemoryRegion` unlinks its name when it is closed by the pool,
  garbage-collected, or at normal interpreter exit (a ``weakref.finalize``);
* if registration fails, the pool unlinks and closes the region before re-raising;
* after a SIGKILL inside the window, :func:`cleanup_orphans` (the janitor) removes entries
  whose embedded owner pid is no longer alive.

Sealed regions (the default where the kernel has memfds, see Note [Sealed regions]) have no
name in any directory at all: the client's open descriptor stands in for the name until
registration, and "unlink" closes it.

Who unmaps: each side unmaps its own mapping (:meth:`SharedMemoryRegion.close`), the worker
when the client releases the region or its session ends. Unmapping while numpy views of the
mapping still exist would leave those views dangling, so ``close`` never does that: it
drops the region's own references and the mapping is unmapped when the last view dies.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import mmap
import operator
import os
import re
import secrets
import stat
import sys
import weakref
from types import TracebackType

import numpy as np

from .._errors import (
    RegionRejectedError,
    SharedMemoryFullError,
    TransportError,
)
from ._memfd import _SEAL_SHRINK, _SEALS, _find_memfd, sealing_supported
from ._memory import memory_room

SHM_PREFIX = "tji-"
"""Prefix of every region name this project creates."""

SHM_DIR_ENV = "TORCH_JAX_INTEROP_SHM_DIR"
"""Environment variable naming the directory file regions live in (default ``/dev/shm``);
sealed regions are memfds and live in no directory (Note [Sealed regions])."""

# pid: 1 to 10 digits, no leading zero (pid 0 must never reach os.kill: it means "my process
# group"). Lower-case hex only, so there is exactly one spelling of each name.
NAME_PATTERN = re.compile(r"tji-([1-9][0-9]{0,9})-(?:([0-9a-f]{16})-)?([0-9a-f]{16})")
"""Region names: ``tji-<owner pid>-[<16 hex session tag>-]<16 lower-case hex>``
(group 1: the pid, group 2: the session tag, see :func:`region_tag`). Use
``NAME_PATTERN.fullmatch``."""


def region_tag(session_id: str) -> str:
    """The tag a region registered in session ``session_id`` carries in its name.

    Note [Regions belong to one session]
    ====================================

    Region names are visible to every local user (``ls /dev/shm``), and between creation and
    unlink (Note [Shared memory ownership]) anybody who can reach the worker could ask it to
    map a name they saw. The worker, which runs as the region's owner, would open it: another
    session (a TCP peer with the token, another local process) would then read and write the
    victim's tensors. So a region is bound to the session that created it: its name carries
    this tag, a one-way hash of the session id, and the worker maps a name only in the
    session whose tag it carries (``SharedMemoryWorkerRegion.attach``). The session id is a
    128-bit random secret known only to the worker and the client that opened the session;
    the tag, which anyone may read in ``/dev/shm``, does not reveal it.
    """
    digest = hashlib.sha256(b"torch-jax-interop region tag\0" + session_id.encode())
    return digest.hexdigest()[:16]

# Python 3.11's mmap module lacks the constant; the value is fixed by the Linux ABI (5.14+).
# Older kernels answer EINVAL and we fall back to touching every page.
_MADV_POPULATE_WRITE: int | None = getattr(
    mmap, "MADV_POPULATE_WRITE", 23 if sys.platform.startswith("linux") else None
)

_MAX_SIZE = 2**63 - 1  # off_t

def default_shm_dir() -> str:
    """The directory regions are created in: ``$TORCH_JAX_INTEROP_SHM_DIR`` or ``/dev/shm``."""
    return os.environ.get(SHM_DIR_ENV) or "/dev/shm"


def _format_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit} ({n} bytes)"
        value /= 1024
    raise AssertionError("unreachable")


def _show_name(name: object) -> str:
    """The caller's name, safe to put in a message: repr() escapes control characters."""
    text = repr(name)
    return text if len(text) <= 120 else text[:117] + "..."


def _check_size(size: object, what: str) -> int:
    try:
        # any object on purpose: operator.index is the check, its TypeError is caught
        value = operator.index(size)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"`{what}` must be an int, got {type(size).__name__}") from None
    if value <= 0 or value > _MAX_SIZE:
        raise ValueError(f"`{what}` must be between 1 and 2**63 - 1 bytes, got {value}")
    return value


def _full_error(directory: str, size: int, err: OSError) -> SharedMemoryFullError:
    try:
        st = os.statvfs(directory)
        free = _format_bytes(st.f_bavail * st.f_frsize)
        total = _format_bytes(st.f_blocks * st.f_frsize)
        room = f"{free} free of {total}"
    except OSError:
        room = "free space unknown"
    return SharedMemoryFullError(
        errno.ENOSPC,
        f"cannot create a shared-memory region of {_format_bytes(size)} in `{directory}` "
        f"({room}; {err.strerror or err}). The shared-memory filesystem is too small. "
        "Fix: give the container more shared memory (docker compose: `shm_size: 8gb` on the "
        "service; docker run: `--shm-size=8g`), free space there, or point "
        f"`{SHM_DIR_ENV}` at a larger tmpfs directory.",
    )


def _check_room(size: int, directory: str | None) -> None:
    """Refuse, before anything is created, a region the memory cannot hold (Note [Regions
    are memory] in ``_memory.py``). A file region too big for its directory (``directory``)
    is left to ``posix_fallocate``, whose ENOSPC names the directory's own fixes."""
    if directory is not None:
        try:
            st = os.statvfs(directory)
        except OSError:
            st = None  # a missing directory gets its own error when the file is created
        if st is not None and size > st.f_bavail * st.f_frsize:
            return
    room = memory_room()
    if room is not None and size > room.allowed:
        raise SharedMemoryFullError(
            errno.ENOMEM,
            f"cannot create a shared-memory region of {_format_bytes(size)}: this machine "
            f"does not have the memory ({_format_bytes(room.available)} available: "
            f"{room.source}; {_format_bytes(room.reserve)} of it kept for everything else). "
            "A region is memory for as long as it lives, and creating it anyway would wake "
            "the OOM killer. Fix: send smaller tensors (a smaller batch, or split the call), "
            "free memory, or raise the memory limit (docker compose: `mem_limit`; docker "
            "run: `--memory`).",
        )


def _file_size_limit_error(size: int, err: OSError) -> SharedMemoryFullError:
    """EFBIG: the process's file-size limit (RLIMIT_FSIZE), not the filesystem, is too small."""
    return SharedMemoryFullError(
        errno.EFBIG,
        f"cannot create a shared-memory region of {_format_bytes(size)}: it exceeds this "
        f"process's file-size limit (RLIMIT_FSIZE; {err.strerror or err}). Fix: raise the "
        "limit (`ulimit -f unlimited` in the shell that starts the process, or "
        "`LimitFSIZE=infinity` for a systemd service).",
    )


def _prefault(mm: mmap.mmap, size: int) -> None:
    """Map every page now, so the first call pays no page faults."""
    if _MADV_POPULATE_WRITE is not None:
        try:
            mm.madvise(_MADV_POPULATE_WRITE)
            return
        except OSError:
            pass  # kernel < 5.14: EINVAL
    # The file was just fallocated, so every page exists and is zero: writing zero is safe.
    pages = np.frombuffer(mm, dtype=np.uint8, count=size)
    pages[:: mmap.PAGESIZE] = 0
    del pages


def _allocate_and_map(fd: int, size: int, directory: str, *, seals: int = 0) -> mmap.mmap:
    """Give the file ``size`` bytes for real (a full filesystem is an error now, not a SIGBUS
    later), add ``seals``, map it shared and pre-fault it."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as err:
        if err.errno == errno.EFBIG:
            raise _file_size_limit_error(size, err) from None
        if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.ENOMEM):
            raise _full_error(directory, size, err) from None
        raise
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    try:
        _prefault(mapping, size)
    except BaseException:
        mapping.close()
        raise
    return mapping


def _unlink_if_same(path: str, dev: int, ino: int, creator_pid: int) -> None:
    """Unlink ``path`` if it is still the file we created, and only in the creating process.

    A forked child inherits the finalizer but not the ownership: it must not unlink.
    """
    if os.getpid() != creator_pid:
        return
    try:
        st = os.stat(path, follow_symlinks=False)
        if (st.st_dev, st.st_ino) == (dev, ino):
            os.unlink(path)
    except FileNotFoundError:
        pass


class SharedMemoryRegion:
    """A mapped POSIX shared-memory region (see Note [Shared memory ownership]).

    Make one with :meth:`create` (the client, which owns it) or :meth:`attach` (the worker,
    which never owns it). :attr:`buffer` is a writable memoryview of the whole mapping; it
    and every numpy view made from it SHARE memory with the other process.
    """

    __slots__ = ("_name", "_size", "_directory", "_mmap", "_view", "_owner", "_unlinker",
                 "_sealed", "__weakref__")

    def __init__(
        self,
        *,
        name: str,
        size: int,
        directory: str,
        mapping: mmap.mmap,
        owner: bool,
        unlinker: weakref.finalize | None,
    ) -> None:
        # Private: use create() or attach().
        self._name = name
        self._size = size
        self._directory = directory
        self._mmap: mmap.mmap | None = mapping
        self._view: memoryview | None = memoryview(mapping)
        self._owner = owner
        self._unlinker = unlinker
        self._sealed = False

    # -- construction --------------------------------------------------------------------

    @classmethod
    def create(cls, size: int, *, directory: str | None = None,
               tag: str | None = None, sealed: bool = False) -> SharedMemoryRegion:
        """Create, size, pre-fault and map a new region of ``size`` bytes; the caller owns it.

        The file is ``<directory>/tji-<pid>-<16 hex>``, mode 0600, made with ``O_EXCL``;
        with ``tag`` (:func:`region_tag` of the session that will register it, Note [Regions
        belong to one session]) it is ``tji-<pid>-<tag>-<16 hex>``. With ``sealed`` it is
        a memfd of that name instead, sealed against any size change (Note [Sealed regions]),
        with no entry in any directory; ``directory`` then only names where the worker would
        look for a file region.
        The memory is zero-filled and shared with every process that attaches it. Call
        :meth:`unlink` once the other side has attached (Note [Shared memory ownership]);
        otherwise the name is unlinked when this object is collected or at exit.

        Raises :class:`SharedMemoryFullError` (nothing is left behind) if the directory has
        no room for ``size`` bytes.
        """
        size = _check_size(size, "size")
        directory = directory if directory is not None else default_shm_dir()
        if tag is not None and re.fullmatch(r"[0-9a-f]{16}", tag) is None:
            raise ValueError(f"`tag` must be 16 lower-case hex digits (region_tag()), got {tag!r}")
        infix = f"{tag}-" if tag is not None else ""
        _check_room(size, None if sealed else directory)
        if sealed:
            return cls._create_sealed(size, f"{SHM_PREFIX}{os.getpid()}-{infix}"
                                      f"{secrets.token_hex(8)}", directory)
        flags = os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
        for _attempt in range(8):
            name = f"{SHM_PREFIX}{os.getpid()}-{infix}{secrets.token_hex(8)}"
            path = os.path.join(directory, name)
            try:
                fd = os.open(path, flags, 0o600)
                break
            except FileExistsError:
                continue  # 64 random bits collided; try another name
            except (FileNotFoundError, NotADirectoryError):
                raise TransportError(
                    f"shared-memory directory `{directory}` does not exist. Create it (a tmpfs "
                    f"mount), or set `{SHM_DIR_ENV}` to an existing tmpfs directory."
                ) from None
            except OSError as err:
                if err.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise _full_error(directory, size, err) from None
                raise
        else:  # pragma: no cover - needs 8 collisions of 64 random bits
            raise TransportError(f"could not find a free region name in `{directory}`")

        creator = os.getpid()
        try:
            st = os.fstat(fd)
            try:
                os.fchmod(fd, 0o600)  # the umask may have taken bits away; never adds any
                mapping = _allocate_and_map(fd, size, directory)
            except BaseException:
                _unlink_if_same(path, st.st_dev, st.st_ino, creator)  # no half-made file
                raise
        finally:
            os.close(fd)  # the mapping keeps the file alive

        region = cls(
            name=name, size=size, directory=directory, mapping=mapping, owner=True,
            unlinker=None,
        )
        # Unlinks at unlink(), when the region is collected, or at interpreter exit.
        region._unlinker = weakref.finalize(
            region, _unlink_if_same, path, st.st_dev, st.st_ino, creator
        )
        return region

    @classmethod
    def _create_sealed(cls, size: int, name: str, directory: str) -> SharedMemoryRegion:
        if not sealing_supported():
            raise TransportError("this platform has no sealed memfds (Linux 3.17+ needed); "
                                 "create the region with sealed=False")
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.fchmod(fd, 0o600)
            mapping = _allocate_and_map(fd, size, directory, seals=_SEALS)
        except BaseException:
            os.close(fd)
            raise
        region = cls(
            name=name, size=size, directory=directory, mapping=mapping, owner=True,
            unlinker=None,
        )
        region._sealed = True
        # The descriptor is the region's "name" until registration (Note [Sealed regions]).
        region._unlinker = weakref.finalize(region, os.close, fd)
        return region

    @classmethod
    def attach(cls, name: str, size: int, *, directory: str | None = None,
               allow_unsealed: bool = True) -> SharedMemoryRegion:
        """Map an existing region the other process created; never takes ownership.

        Checks, before mapping: ``name`` matches :data:`NAME_PATTERN` (so it cannot leave
        ``directory``), the file is opened without following a symbolic link, is a regular
        file owned by this uid with no group/other permission bits, and holds at least
        ``size`` (> 0) bytes. Only the first ``size`` bytes are mapped. The mapping SHARES
        memory with the creator. Raises :class:`RegionRejectedError` when a check fails.

        A sealed region (a memfd of that name among the creator's descriptors, Note [Sealed
        regions]) is preferred; it must carry ``F_SEAL_SHRINK``. Otherwise the file in
        ``directory`` is mapped only with ``allow_unsealed`` (the worker passes its
        ``--allow-unsealed-regions``): its creator could shrink it under the mapping.
        """
        directory = directory if directory is not None else default_shm_dir()
        shown = _show_name(name)
        if not isinstance(name, str) or NAME_PATTERN.fullmatch(name) is None:
            raise RegionRejectedError(
                f"refusing to attach shared-memory region {shown}: a region name must look "
                f"like `{SHM_PREFIX}<pid>-[<tag>-]<16 lower-case hex digits>` (a file name "
                f"inside `{directory}`, no path). Pass the name SharedMemoryRegion.create() gave."
            )
        try:
            size = operator.index(size)
        except TypeError:
            raise RegionRejectedError(
                f"refusing to attach {shown}: `size` must be an int, got {type(size).__name__}"
            ) from None
        if size <= 0 or size > _MAX_SIZE:
            raise RegionRejectedError(
                f"refusing to attach {shown}: `size` must be between 1 and 2**63 - 1 bytes, "
                f"got {size}. Register the size the region was created with."
            )
        creator = name.split("-")[1]  # NAME_PATTERN matched: "tji-<pid>-..."
        memfd = _find_memfd(int(creator), name)
        if memfd is not None:
            return cls._attach_sealed(memfd, name, size, directory, shown)
        if not allow_unsealed:
            raise RegionRejectedError(
                f"refusing to attach shared-memory region {shown}: it is not a sealed memfd "
                f"of its creator's (process {creator} has no such descriptor that this "
                "worker can see), and this worker maps no unsealed region: its creator could "
                "shrink it and kill the worker with SIGBUS (Note [Sealed regions] in "
                "transport/_shm.py). Fix: run the client and the worker in one PID namespace "
                "(docker compose: `pid: service:<worker>`) so that sealed regions work, or "
                "start the worker with --allow-unsealed-regions if every local process of its "
                "user is trusted"
            )
        path = os.path.join(directory, name)
        try:
            # O_NONBLOCK: opening a FIFO planted under that name must not hang.
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            raise RegionRejectedError(
                f"refusing to attach {shown}: no such region in `{directory}`. The client "
                "must register a region before unlinking it, and both processes must see "
                f"the same shared-memory directory (share the IPC namespace, e.g. docker "
                f"`ipc: shareable` / `ipc: service:...`, and the same `{SHM_DIR_ENV}`)."
            ) from None
        except OSError as err:
            if err.errno == errno.ELOOP:
                why = "it is a symbolic link; regions are never links"
            else:
                why = f"it cannot be opened for reading and writing ({err.strerror})"
            raise RegionRejectedError(f"refusing to attach {shown} in `{directory}`: {why}.") \
                from None
        try:
            st = os.fstat(fd)  # checks the file we opened, not whatever the name means now
            problem = None
            if not stat.S_ISREG(st.st_mode):
                problem = "it is not a regular file"
            elif st.st_uid != os.getuid():
                problem = (
                    f"it belongs to uid {st.st_uid}, not to this process's uid {os.getuid()}; "
                    "run the client and the worker as the same user"
                )
            elif st.st_mode & 0o077:
                problem = (
                    f"its mode is {stat.S_IMODE(st.st_mode):04o}; a region must not be "
                    "readable or writable by group or others (create it with mode 0600)"
                )
            elif st.st_size < size:
                problem = (
                    f"it holds {st.st_size} bytes but {size} were registered; register the "
                    "size the region was created with"
                )
            if problem is not None:
                raise RegionRejectedError(
                    f"refusing to attach shared-memory region {shown} in `{directory}`: "
                    f"{problem}."
                )
            mapping = mmap.mmap(
                fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE
            )
        finally:
            os.close(fd)
        return cls(
            name=name, size=size, directory=directory, mapping=mapping, owner=False,
            unlinker=None,
        )

    @classmethod
    def _attach_sealed(cls, fd: int, name: str, size: int, directory: str,
                       shown: str) -> SharedMemoryRegion:
        try:
            st = os.fstat(fd)
            problem = None
            try:
                seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            except OSError:
                seals = 0  # EINVAL: a file that cannot carry seals at all
            if not stat.S_ISREG(st.st_mode):
                problem = "it is not a regular file"
            elif st.st_uid != os.getuid():
                problem = (f"it belongs to uid {st.st_uid}, not to this process's uid "
                           f"{os.getuid()}; run the client and the worker as the same user")
            elif not seals & _SEAL_SHRINK:
                problem = ("it is not sealed against shrinking (F_SEAL_SHRINK); create it "
                           "with SharedMemoryRegion.create(..., sealed=True)")
            elif st.st_size < size:
                problem = (f"it holds {st.st_size} bytes but {size} were registered; register "
                           "the size the region was created with")
            if problem is not None:
                raise RegionRejectedError(
                    f"refusing to attach sealed shared-memory region {shown}: {problem}."
                )
            mapping = mmap.mmap(
                fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE
            )
        finally:
            os.close(fd)
        region = cls(
            name=name, size=size, directory=directory, mapping=mapping, owner=False,
            unlinker=None,
        )
        region._sealed = True
        return region

    # -- properties ----------------------------------------------------------------------

    @property
    def sealed(self) -> bool:
        """True for a sealed memfd region (Note [Sealed regions]): its size cannot change."""
        return self._sealed

    @property
    def name(self) -> str:
        """File name of the region inside :attr:`directory` (what the worker is told)."""
        return self._name

    @property
    def size(self) -> int:
        """Mapped size in bytes."""
        return self._size

    @property
    def directory(self) -> str:
        """The shared-memory directory the region lives in."""
        return self._directory

    @property
    def path(self) -> str:
        """``directory/name``. Once unlinked, nothing exists at this path any more."""
        return os.path.join(self._directory, self._name)

    @property
    def owner(self) -> bool:
        """True for the creating process (which unlinks), False for an attacher."""
        return self._owner

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._mmap is None

    @property
    def buffer(self) -> memoryview:
        """Writable memoryview of the whole mapping; SHARES memory with the other process."""
        if self._view is None:
            raise TransportError(f"shared-memory region `{self._name}` is closed")
        return self._view

    # -- lifetime ------------------------------------------------------------------------

    def unlink(self) -> None:
        """Remove the region's name from the directory (owner only; idempotent).

        Mappings stay valid: the memory is freed when the last process unmaps it. Only the
        file this object created is removed, never a different file now under the name.
        """
        if not self._owner:
            raise TransportError(
                f"region `{self._name}` was attached, not created, by this process: only its "
                "owner unlinks it (see Note [Shared memory ownership] in transport/_shm.py)"
            )
        if self._unlinker is not None:
            self._unlinker()

    def close(self) -> None:
        """Unmap the region from this process (idempotent). Does not unlink.

        If views made from :attr:`buffer` (memoryview slices, numpy arrays) are still alive,
        the mapping cannot be unmapped under them: the region drops its own references
        instead, and the mapping is unmapped when the last view is garbage-collected. Views
        never dangle.
        """
        view, mapping = self._view, self._mmap
        self._view = None
        self._mmap = None
        if view is not None:
            try:
                view.release()
            except BufferError:
                pass  # numpy arrays built on this very memoryview; they keep the mmap alive
        if mapping is not None:
            try:
                mapping.close()
            except BufferError:
                pass  # other views still export the mapping; it goes when they do

    def __enter__(self) -> SharedMemoryRegion:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._owner:
            self.unlink()
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        role = "owner" if self._owner else "attached"
        return f"SharedMemoryRegion(name={self._name!r}, size={self._size}, {role}, {state})"


# -- descriptors ---------------------------------------------------------------------------
