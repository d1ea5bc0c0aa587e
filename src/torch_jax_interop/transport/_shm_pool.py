"""The shared-memory kind of the one pool: :class:`SharedMemoryPool` and :class:`RegionSlice`.

The pool itself (free lists, growth, limits, Note [Releasing from finalizers]) is
``_pool.py``; who creates, maps and unlinks a region is Note [Shared memory ownership] in
``_shm.py``.
"""

from __future__ import annotations

import ctypes
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .._layout import round_up
from ._pool import BufferKind, Pool, PoolSlice, _Entry
from ._shm import SharedMemoryRegion
from ._slices import numpy_view

POWER_OF_TWO_UP_TO = 256 << 20
"""New regions up to this size hold the next power of two of the request (room to reuse);"""
LARGE_REGION_STEP = 64 << 20
"""larger ones the request rounded up to a multiple of this (at most 64 MiB unused)."""


class _SharedMemoryKind(BufferKind[SharedMemoryRegion]):
    """Shared-memory regions (Note [Shared memory ownership] in ``_shm.py``)."""

    name = "shm"
    label = "shared-memory"

    def __init__(self, directory: str | None, unlink_after_register: bool,
                 tag: str | None, sealed: bool) -> None:
        self.directory = directory
        self.unlink_after_register = unlink_after_register
        self.tag = tag
        self.sealed = sealed

    def preferred_size(self, block: int) -> int:
        if block <= POWER_OF_TWO_UP_TO:
            return 1 << (block - 1).bit_length()  # the next power of two: room to reuse
        # a region is RAM for as long as it lives (Note [Regions are memory] in
        # _memory.py): a 9 GiB tensor must not take a 16 GiB region
        return round_up(block, LARGE_REGION_STEP)

    def create(self, size: int) -> SharedMemoryRegion:
        return SharedMemoryRegion.create(size, directory=self.directory, tag=self.tag,
                                         sealed=self.sealed)

    def registered(self, buffer: SharedMemoryRegion) -> None:
        if self.unlink_after_register:
            buffer.unlink()  # the worker has its mapping: nothing can leak the name now

    def close(self, buffer: SharedMemoryRegion) -> None:
        if buffer.owner:
            buffer.unlink()
        buffer.close()


class _SliceMemory:
    """The base object of every numpy array :meth:`RegionSlice.numpy` hands out.

    numpy collapses view chains onto the first base that is not an ndarray, so a plain
    ``np.frombuffer`` array can die while views of it (``a[2:]``, and the tensors
    ``torch.from_numpy`` made from those views) still use its memory. Every array derived
    from a slice's arrays keeps this object alive instead; it is weak-referenceable, which
    a memoryview is not, so :meth:`RegionSlice.release_when_collected` watches it.
    """

    __slots__ = ("__array_interface__", "_keep", "__weakref__")

    def __init__(self, raw: np.ndarray) -> None:
        self._keep = raw  # holds the memoryview, hence the mapping, alive
        self.__array_interface__ = {
            "shape": raw.shape,
            "typestr": "|u1",
            "data": (raw.ctypes.data, False),
            "version": 3,
        }


class RegionSlice(PoolSlice[SharedMemoryRegion]):
    """A 64-byte aligned slice of a pooled region: what a ``SharedMemorySlice`` describes.

    :meth:`memoryview` and :meth:`numpy` SHARE memory with the region, and so with the
    worker. Give the slice back with :meth:`release` (or the context manager, or
    :meth:`release_when_collected`) once neither side needs the bytes.
    """

    __slots__ = ("_memory",)

    def __init__(self, pool: Pool[SharedMemoryRegion, Any], entry: _Entry[SharedMemoryRegion],
                 offset: int, nbytes: int, block: int) -> None:
        super().__init__(pool, entry, offset, nbytes, block)
        self._memory: weakref.ref[_SliceMemory] | None = None

    @property
    def region(self) -> SharedMemoryRegion:
        """The region the slice lies in."""
        return self._entry.buffer

    def memoryview(self) -> memoryview:
        """Writable memoryview of exactly the slice's bytes; SHARES memory, no copy."""
        self._check_live()
        return self._entry.buffer.buffer[self._offset : self._offset + self._nbytes]

    def numpy(self, dtype: Any, shape: Sequence[int]) -> np.ndarray:
        """A C-order numpy array over the slice; SHARES memory, no copy.

        Every array from this method, and every numpy view or ``torch.from_numpy`` tensor
        derived from one, keeps one common base object alive; see
        :meth:`release_when_collected`. Raises :class:`SliceOutOfBoundsError` when
        ``dtype`` x ``shape`` needs more than :attr:`nbytes` bytes.
        """
        # Validates dtype and shape against the slice and gives the layout.
        template = numpy_view(self.memoryview(), 0, dtype, shape)
        needed = template.nbytes
        del template
        memory = self._memory() if self._memory is not None else None
        if memory is None:
            raw = np.frombuffer(
                self._entry.buffer.buffer, dtype=np.uint8, count=self._nbytes,
                offset=self._offset,
            )
            memory = _SliceMemory(raw)
            self._memory = weakref.ref(memory)
        flat: np.ndarray = np.asarray(memory)
        return flat[:needed].view(np.dtype(dtype)).reshape(tuple(shape))

    def release_when_collected(self, obj: object) -> weakref.finalize:
        """Release the slice once ``obj``, and everything sharing its memory, is collected.

        For an array from :meth:`numpy` (or any numpy view of one) the slice is released
        when the LAST array from :meth:`numpy` or derived from one dies: numpy views
        (``a[1:]``, ``a.view(...)``) and tensors made by ``torch.from_numpy`` from any of
        them all keep it alive. For any other object (a memoryview, a tensor made some other
        way) only that object's own lifetime counts. Returns the finalizer (``.detach()``
        cancels it). The release follows Note [Releasing from finalizers].
        """
        target = obj
        while isinstance(target, np.ndarray) and target.base is not None:
            target = target.base
        memory = self._memory() if self._memory is not None else None
        if memory is not None and target is memory:
            obj = memory
        return weakref.finalize(obj, self.release)


class SharedMemoryPool(Pool[SharedMemoryRegion, RegionSlice]):
    """Client-side pool of shared-memory regions, carved into 64-byte aligned slices.

    ``register(region)`` must make the worker attach the region and return the
    ``region_id`` it assigned. When it returns, the pool unlinks the region's
    name (``unlink_after_register``), so no crash of either process can leave the region in
    ``/dev/shm`` (Note [Shared memory ownership] in ``_shm.py``). When it raises, the pool
    unlinks and unmaps the region and re-raises. Regions are unmapped on :meth:`close`, on
    garbage collection or at interpreter exit.

    New regions hold ``max(min_region_bytes, next power of two >= request)`` bytes (above
    :data:`POWER_OF_TWO_UP_TO`, the request rounded up to :data:`LARGE_REGION_STEP`); the
    pool never grows past ``max_total_bytes`` (None: no limit). :meth:`allocate` raises
    :class:`SharedMemoryFullError` when ``/dev/shm`` is full. ``tag``: the
    :func:`~torch_jax_interop.transport.region_tag` of the session ``register`` registers
    in; the worker maps only regions named with its session's tag (Note [Regions belong to
    one session] in ``_shm.py``). ``sealed``: make sealed memfd regions, whose size nobody
    can change after creation (Note [Sealed regions] in ``_shm.py``).
    """

    slice_type = RegionSlice

    def __init__(
        self,
        register: Callable[[SharedMemoryRegion], int],
        *,
        directory: str | None = None,
        min_region_bytes: int = 8 << 20,
        max_total_bytes: int | None = None,
        unlink_after_register: bool = True,
        tag: str | None = None,
        sealed: bool = False,
        limit_name: str = "`max_total_bytes`",
        unregister: Callable[[int], None] | None = None,
    ) -> None:
        super().__init__(
            _SharedMemoryKind(directory, unlink_after_register, tag, sealed), register,
            min_region_bytes=min_region_bytes, max_total_bytes=max_total_bytes,
            limit_name=limit_name, unregister=unregister,
        )
        self._bases: dict[int, int] = {}  # region id -> address of its mapping here

    def locate(self, address: int, nbytes: int) -> tuple[int, int] | None:
        """``(region_id, offset)`` when the ``nbytes`` bytes at ``address`` (a pointer into
        this process's memory) lie inside one of the pool's open regions at an offset the
        wire accepts (64-byte aligned); else None. Memory in a region the pool has already
        dropped (a released region, a closed pool) is not found: the worker no longer maps
        it. The caller keeps the memory's owner alive while the worker may read it."""
        # No lock: list() of a dict is atomic under the GIL, and a region dropped meanwhile
        # is "retired" before it is closed (the caller pins the memory anyway).
        for region_id, entry in list(self._state.regions.items()):
            if entry.retired:
                continue
            region = entry.buffer
            base = self._bases.get(region_id)
            if base is None:
                probe = ctypes.c_char.from_buffer(region.buffer)  # no copy: the mapping
                base = ctypes.addressof(probe)
                del probe  # releases the export, so the region can still be unmapped
                self._bases[region_id] = base
            offset = address - base
            if 0 <= offset and nbytes <= region.size - offset:
                return (region_id, offset) if offset % self.kind.alignment == 0 else None
        return None
