"""One client-side pool, generic over the kind of buffer it carves into aligned slices.

Two kinds exist: shared-memory regions (``SharedMemoryPool`` and ``RegionSlice`` in
``_shm_pool.py``) and exported device allocations (``CudaIpcPool`` and ``DeviceSlice``
in ``cuda/_client.py``). Both are :class:`Pool` with a :class:`BufferKind`: the free lists,
growing under a lock, the ``max_total_bytes`` limit, registration with the worker, retiring
and closing, and the release scheme of Note [Releasing from finalizers] exist once, here.

Buffers are created once, registered with the worker once and reused for every call
(creating a fresh 64 MiB segment per call measured ~16x slower than copying into a warm
one). Ownership follows Note [Shared memory ownership] in ``_shm.py`` and Note [CUDA IPC
ownership] in ``cuda/__init__.py``.

Note [Releasing from finalizers]
================================

Slices are often released by a ``weakref.finalize`` (``release_when_collected``: the last
array or tensor viewing a slice died). A finalizer runs wherever the garbage collector
happens to run: in any thread, in the middle of any bytecode, including inside the pool's
own critical section (an allocation in ``FreeList.take`` can trigger a collection).
Two schemes existed; this pool keeps the one that never waits:

* ``release()`` appends the slice to a queue (``collections.deque.append`` is atomic) and
  then only TRIES to take the lock (``acquire(blocking=False)``). If it gets it, it applies
  the queue; otherwise whoever holds the lock applies it when its critical section ends.
* Every critical section (``_locked``) applies the queue on entry and on exit, and once
  more after it has dropped the lock: a release queued after the holder's last drain saw a
  held lock, so the holder, which drops the lock after that release was queued, sees it.
  No release is left waiting for an unrelated later allocation.

The other scheme (a reentrant lock, the holder's thread id, and a *blocking* acquire when
another thread holds the lock) is wrong for finalizers: a finalizer interrupts a thread
that may hold any other lock (logging's, a gRPC channel's, the CUDA handle cache's), and
blocking there on the pool lock can deadlock as soon as the pool's holder needs one of
those locks — which the holder can, since its own allocations may run other finalizers.
The queue scheme takes no lock it could wait for, re-enters nothing (a plain Lock: a
nested try from the holding thread fails and queues), and so cannot deadlock.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import mmap
import operator
import os
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any, Generic, Protocol, TypeVar

from .._errors import PoolExhaustedError, SharedMemoryFullError, TransportError
from .._layout import ALIGNMENT, round_up
from ._freelist import FreeList


class _Sized(Protocol):
    @property
    def size(self) -> int: ...


BufferT = TypeVar("BufferT", bound=_Sized)


class BufferKind(Generic[BufferT]):
    """What a :class:`Pool` needs to know about one kind of buffer.

    Subclasses set the class attributes and implement :meth:`create` and :meth:`close`.
    """

    name: str = ""
    """The descriptor a slice of this kind fills: ``"shm"`` or ``"cuda_ipc"``."""
    label: str = ""
    """How messages name the pool: ``"shared-memory"`` or ``"CUDA IPC"``."""
    alignment: int = ALIGNMENT
    """Every slice starts at a multiple of this many bytes."""
    granularity: int = mmap.PAGESIZE
    """Buffers are sized in multiples of this many bytes (``min_region_bytes`` too)."""

    def preferred_size(self, block: int) -> int:
        """Bytes of a new buffer for a ``block`` that fits nowhere (``min_region_bytes`` aside)."""
        return round_up(block, self.granularity)

    def create(self, size: int) -> BufferT:
        """A new buffer of ``size`` bytes, owned by this process."""
        raise NotImplementedError

    def registered(self, buffer: BufferT) -> None:
        """Called once the worker has accepted ``buffer``."""

    def close(self, buffer: BufferT) -> None:
        """Drop ``buffer``: views still alive keep its memory until they die."""


RegisterFn = Callable[[Any], int]
"""Registers a new buffer with the worker and returns the ``region_id`` it assigned."""


class _Entry(FreeList, Generic[BufferT]):
    """One registered buffer of a pool and its free list."""

    __slots__ = ("buffer", "region_id", "retired")

    def __init__(self, buffer: BufferT, region_id: int) -> None:
        super().__init__(buffer.size)
        self.buffer = buffer
        self.region_id = region_id
        self.retired = False  # released or closed: slices of it no longer return bytes


class _PoolState:
    """What the exit/GC finalizer needs; it must not reference the pool itself."""

    __slots__ = ("regions", "closed")

    def __init__(self) -> None:
        self.regions: dict[int, _Entry[Any]] = {}
        self.closed = False


def _close_state(state: _PoolState, kind: BufferKind[Any], creator_pid: int) -> None:
    if os.getpid() != creator_pid:
        return  # a forked child inherited the object, not the ownership
    state.closed = True
    entries = list(state.regions.values())
    state.regions.clear()
    for entry in entries:
        entry.retired = True
        kind.close(entry.buffer)


def fill_descriptor(message: Any, region_id: int, offset: int, nbytes: int) -> None:
    """Write a slice into a descriptor message (``SharedMemorySlice`` / ``CudaIpcSlice``):
    the one place that spells the descriptor's fields."""
    message.region_id = region_id
    message.offset = offset
    message.nbytes = nbytes


class PoolSlice(Generic[BufferT]):
    """An aligned slice of one of a pool's buffers: what a wire descriptor names.

    Give it back with :meth:`release` (or the context manager) once neither side needs the
    bytes: the pool then hands the same bytes to the next allocation, so views still in
    use would see them change. Subclasses add the views of their buffer kind.
    """

    __slots__ = ("_pool", "_entry", "_offset", "_nbytes", "_block", "_released", "__weakref__")

    def __init__(self, pool: Pool[BufferT, Any], entry: _Entry[BufferT], offset: int, nbytes: int,
                 block: int) -> None:
        self._pool = pool
        self._entry = entry
        self._offset = offset
        self._nbytes = nbytes
        self._block = block
        self._released = False

    @property
    def kind(self) -> str:
        """The descriptor this slice fills: ``"shm"`` or ``"cuda_ipc"``."""
        return self._pool.kind.name

    @property
    def region_id(self) -> int:
        """The id the worker gave the buffer at registration."""
        return self._entry.region_id

    @property
    def offset(self) -> int:
        """Bytes from the start of the buffer; a multiple of the kind's alignment."""
        return self._offset

    @property
    def nbytes(self) -> int:
        """Bytes asked for (the pool may have reserved up to one alignment block more)."""
        return self._nbytes

    @property
    def released(self) -> bool:
        """True once the bytes went back to the pool."""
        return self._released

    def fill(self, message: Any) -> None:
        """Write this slice into a descriptor message (``SharedMemorySlice`` /
        ``CudaIpcSlice``): the one place that spells the descriptor's fields."""
        fill_descriptor(message, self._entry.region_id, self._offset, self._nbytes)

    def _check_live(self) -> None:
        if self._released:
            raise TransportError(
                f"slice at offset {self._offset} of region {self.region_id} was released; "
                "its bytes may already belong to another allocation"
            )

    def release(self) -> None:
        """Give the bytes back to the pool (idempotent, thread-safe, never blocks; see
        Note [Releasing from finalizers])."""
        if not self._released:
            self._pool._release(self)

    def __enter__(self) -> PoolSlice[BufferT]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def _describe(self) -> str:
        return f"region_id={self.region_id}, offset={self._offset}, nbytes={self._nbytes}"

    def __repr__(self) -> str:
        state = ", released" if self._released else ""
        return f"{type(self).__name__}({self._describe()}{state})"


SliceT = TypeVar("SliceT", bound=PoolSlice[Any])


class Pool(Generic[BufferT, SliceT]):
    """Client-side pool of registered buffers of one :class:`BufferKind`, thread-safe.

    ``register(buffer)`` is called (outside the pool's lock, one new buffer at a time) for
    every buffer the pool creates; it must make the worker map the buffer and return the
    ``region_id`` the worker assigned. When it raises, the pool closes the
    buffer and re-raises.

    New buffers hold ``max(min_region_bytes, kind.preferred_size(block))`` bytes; the pool
    never grows past ``max_total_bytes`` (None: no limit): near it, a buffer just big enough
    for the request is made instead; with ``unregister`` (``unregister(region_id)`` makes the
    worker unmap a buffer), buffers no slice uses are dropped first to make room. ``limit_name``
    is how its error names that limit (where the user sets it).
    """

    slice_type: type[SliceT]

    def __init__(
        self,
        kind: BufferKind[BufferT],
        register: RegisterFn,
        *,
        min_region_bytes: int,
        max_total_bytes: int | None = None,
        limit_name: str = "`max_total_bytes`",
        unregister: Callable[[int], None] | None = None,
    ) -> None:
        min_region_bytes = operator.index(min_region_bytes)
        if min_region_bytes <= 0:
            raise ValueError(f"`min_region_bytes` must be positive, got {min_region_bytes}")
        if max_total_bytes is not None:
            max_total_bytes = operator.index(max_total_bytes)
            if max_total_bytes <= 0:
                raise ValueError(f"`max_total_bytes` must be positive, got {max_total_bytes}")
        self.kind = kind
        self._register = register
        self._min_region_bytes = round_up(min_region_bytes, kind.granularity)
        self._max_total_bytes = max_total_bytes
        self._limit_name = limit_name  # how errors name the limit: where the user sets it
        self._unregister = unregister
        # Note [Releasing from finalizers]: a plain Lock, only ever tried by releases.
        self._lock = threading.Lock()
        self._grow_lock = threading.Lock()  # one buffer creation (and RPC) at a time
        self._pending: collections.deque[PoolSlice[BufferT]] = collections.deque()
        self._state = _PoolState()
        self._reserved = 0  # bytes of a buffer being created and registered right now
        self._finalizer = weakref.finalize(self, _close_state, self._state, kind, os.getpid())

    # -- locking (Note [Releasing from finalizers]) ----------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            with self._lock:
                self._drain()
                try:
                    yield
                finally:
                    self._drain()
        finally:
            self._drain_if_free()

    def _drain(self) -> None:
        """Apply queued releases; only under the lock."""
        while self._pending:
            piece = self._pending.popleft()
            if piece._released:
                continue
            piece._released = True
            entry = piece._entry
            if not entry.retired:
                entry.give_back(piece._offset, piece._block)

    def _drain_if_free(self) -> None:
        while self._pending and self._lock.acquire(blocking=False):
            try:
                self._drain()
            finally:
                self._lock.release()

    def _release(self, piece: PoolSlice[BufferT]) -> None:
        self._pending.append(piece)
        self._drain_if_free()

    # -- allocation ----------------------------------------------------------------------

    def _first_fit(self, block: int, nbytes: int) -> SliceT | None:
        for entry in self._state.regions.values():
            offset = entry.take(block)
            if offset is not None:
                return self.slice_type(self, entry, offset, nbytes, block)
        return None

    def _check_open(self) -> None:
        if self._state.closed:
            raise TransportError(f"the {self.kind.label} pool is closed; create a new one")

    def _new_region_size(self, block: int, nbytes: int) -> int:
        size = max(self._min_region_bytes, self.kind.preferred_size(block))
        limit = self._max_total_bytes
        if limit is None:
            return size
        room = limit - self._total_bytes() - self._reserved
        if size <= room:
            return size
        size = min(round_up(block, self.kind.granularity), room)
        if size >= block:
            return size
        raise PoolExhaustedError(
            f"cannot allocate {nbytes} bytes: the {self.kind.label} pool would grow past its "
            f"{self._limit_name} limit of {limit} bytes ({self._total_bytes()} bytes in "
            f"{len(self._state.regions)} regions, {self._used_bytes()} in use). Release "
            f"slices that are no longer needed ({self.slice_type.__name__}.release(), or let "
            f"the arrays and tensors viewing them be collected), or raise {self._limit_name}."
        )

    def allocate(self, nbytes: int) -> SliceT:
        """A slice of at least ``nbytes`` bytes (0 allowed) at an aligned offset.

        First fit among the existing buffers; otherwise a new buffer is created and
        registered (see the class docstring). The bytes are NOT zeroed: a reused slice holds
        whatever was written there before. Raises :class:`PoolExhaustedError` at the
        ``max_total_bytes`` limit.
        """
        nbytes = operator.index(nbytes)
        if nbytes < 0:
            raise ValueError(f"`nbytes` must be >= 0, got {nbytes}")
        alignment = self.kind.alignment
        # A zero-byte slice still takes one aligned block, so it has its own valid offset.
        block = max(alignment, round_up(nbytes, alignment))
        with self._locked():
            self._check_open()
            piece = self._first_fit(block, nbytes)
            if piece is not None:
                return piece
        with self._grow_lock:
            with self._locked():
                self._check_open()
                piece = self._first_fit(block, nbytes)  # another thread may have grown it
                if piece is not None:
                    return piece
                idle = self._retire_idle_for(block)
                try:
                    size = self._new_region_size(block, nbytes)
                except PoolExhaustedError:
                    for entry in idle:  # not reached (they made room), but never lose one
                        entry.retired = False
                        self._state.regions[entry.region_id] = entry
                    raise
                self._reserved += size
            try:
                self._drop_retired(idle)
                region_id, buffer = self._create_fitting(size, block)
            finally:
                with self._locked():
                    self._reserved -= size
            with self._locked():
                if self._state.closed or region_id in self._state.regions:
                    self.kind.close(buffer)
                    self._check_open()
                    raise TransportError(
                        f"the worker registered a new {self.kind.label} region under id "
                        f"{region_id}, which this pool already uses: region ids must be "
                        "unique within a session"
                    )
                entry = _Entry(buffer, region_id)
                self._state.regions[region_id] = entry
                offset = entry.take(block)
                assert offset is not None
                return self.slice_type(self, entry, offset, nbytes, block)

    def _retire_idle_for(self, block: int) -> list[_Entry[BufferT]]:
        """At the ``max_total_bytes`` limit, take out of the pool buffers that no slice uses
        (largest first) when that makes room for ``block``; nothing otherwise, or without
        ``unregister``. Under the lock; :meth:`_drop_retired` closes them after it."""
        limit = self._max_total_bytes
        if limit is None or self._unregister is None:
            return []
        deficit = round_up(block, self.kind.granularity) - (
            limit - self._total_bytes() - self._reserved)
        if deficit <= 0:
            return []
        idle = sorted((e for e in self._state.regions.values() if e.used == 0),
                      key=lambda e: e.buffer.size, reverse=True)
        chosen: list[_Entry[BufferT]] = []
        for entry in idle:
            if deficit <= 0:
                break
            chosen.append(entry)
            deficit -= entry.buffer.size
        if deficit > 0:
            return []  # not enough idle room: the limit's error says so
        for entry in chosen:
            del self._state.regions[entry.region_id]
            entry.retired = True
        return chosen

    def _drop_retired(self, entries: list[_Entry[BufferT]]) -> None:
        """Close buffers :meth:`_retire_idle_for` took out, and tell the worker."""
        for entry in entries:
            self.kind.close(entry.buffer)
        for entry in entries:
            assert self._unregister is not None
            self._unregister(entry.region_id)

    def _create_fitting(self, size: int, block: int) -> tuple[int, BufferT]:
        """A new registered buffer of ``size`` bytes or, where the memory has no room for
        that (Note [Regions are memory] in ``_memory.py``), of the fewest bytes ``block``
        fits in: rounding up must not turn a request that fits into an error. (A directory
        too small keeps its error: a session then learns at once that it cannot use it.)"""
        try:
            return self._create_and_register(size)
        except SharedMemoryFullError as error:
            smallest = max(round_up(block, self.kind.granularity), self._min_region_bytes)
            if error.errno != errno.ENOMEM or smallest >= size:
                raise
            return self._create_and_register(smallest)

    def _create_and_register(self, size: int) -> tuple[int, BufferT]:
        buffer = self.kind.create(size)
        try:
            region_id = operator.index(self._register(buffer))
        except BaseException:
            self.kind.close(buffer)
            raise
        self.kind.registered(buffer)
        return region_id, buffer

    # -- giving back ---------------------------------------------------------------------

    def release_region(self, region_id: int) -> None:
        """Drop one buffer: stop allocating from it and close it here.

        Slices still alive in it become inert (their :meth:`PoolSlice.release` is a no-op),
        and their views keep its memory alive until they die. Telling the worker
        (ReleaseRegion) is the caller's job. Raises KeyError for an unknown id.
        """
        with self._locked():
            entry = self._state.regions.pop(region_id, None)
            if entry is None:
                raise KeyError(f"the pool holds no region with id {region_id}")
            entry.retired = True
        self.kind.close(entry.buffer)

    def close(self) -> None:
        """Close every buffer (idempotent). Also runs at GC and at exit."""
        with self._locked():
            self._state.closed = True
            self._finalizer()

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran."""
        return self._state.closed

    def __enter__(self) -> Pool[BufferT, SliceT]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- statistics ----------------------------------------------------------------------

    def _total_bytes(self) -> int:
        return sum(entry.buffer.size for entry in self._state.regions.values())

    def _used_bytes(self) -> int:
        return sum(entry.used for entry in self._state.regions.values())

    @property
    def total_bytes(self) -> int:
        """Bytes of the buffers the pool holds."""
        with self._locked():
            return self._total_bytes()

    @property
    def used_bytes(self) -> int:
        """Bytes handed out in live slices, counted in whole alignment blocks."""
        with self._locked():
            return self._used_bytes()

    @property
    def num_regions(self) -> int:
        """Number of buffers the pool holds."""
        with self._locked():
            return len(self._state.regions)

    @property
    def region_ids(self) -> list[int]:
        """Ids of the buffers the pool holds."""
        with self._locked():
            return list(self._state.regions)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_regions={len(self._state.regions)}, "
            f"total_bytes={self._total_bytes()}, closed={self._state.closed})"
        )
