"""A client's session on the worker: its mapped regions and its vjp residuals.

See Note [Shared memory ownership] in ``transport/_shm.py``: the worker only *maps* regions
the client created and registered in this session; it never unlinks a live client's region
and never owns one. When the session ends (the client's ``OpenSession`` stream ends, whether
the client closed it or died), the worker drops the residuals and its mappings. Regions of
both kinds (shared memory, CUDA IPC) are one abstraction, :class:`WorkerRegion`: see Note
[Worker regions].
"""

from __future__ import annotations

import abc
import contextlib
import itertools
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._errors import InvalidArgumentError, RegionRejectedError, ResourceExhaustedError
from .._sharding import is_multi_device, write_sharded
from ..transport import (
    NAME_PATTERN,
    SharedMemoryRegion,
    check_slice,
    cuda,
    numpy_view,
    region_tag,
)

log = logging.getLogger("torch_jax_interop.server")


@dataclass
class Residual:
    function: Any  # CompiledFunction
    vjp_fn: Any  # its VjpResiduals: no request message (their inline bytes) kept alive
    nbytes: int = 0  # what the residual budget counts (``Residuals.nbytes``)


class ResidualStore:
    """vjp residuals under ids, budgeted by count (``cap``, --max-residuals) and by bytes
    (``max_bytes``, --max-residual-bytes): past either, the oldest are dropped (with a log
    line); a single residual larger than ``max_bytes`` is refused (RESOURCE_EXHAUSTED)."""

    def __init__(self, cap: int, max_bytes: int | None = None) -> None:
        self.cap = cap
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._items: OrderedDict[int, Residual] = OrderedDict()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.evicted = 0

    def put(self, residual: Residual) -> int:
        if self.max_bytes is not None and residual.nbytes > self.max_bytes:
            raise ResourceExhaustedError(
                f"this call's vjp residuals need {residual.nbytes} bytes, more than the "
                f"worker's residual budget of {self.max_bytes} bytes per session "
                "(--max-residual-bytes); raise it, or run the call without gradients "
                "(torch.no_grad()) or on smaller inputs"
            )
        with self._lock:
            residual_id = next(self._ids)
            self._items[residual_id] = residual
            self.nbytes += residual.nbytes
            while len(self._items) > self.cap or (
                    self.max_bytes is not None and self.nbytes > self.max_bytes):
                old_id, old = self._items.popitem(last=False)
                self.nbytes -= old.nbytes
                self.evicted += 1
                log.warning(
                    "residual budget reached (%d residuals, --max-residuals; %s bytes, "
                    "--max-residual-bytes): dropped residual %d (backward on it will fail; "
                    "raise the budget or release graphs sooner)", self.cap, self.max_bytes,
                    old_id,
                )
            return residual_id

    def get(self, residual_id: int, *, pop: bool,
            check: Callable[[Residual], None] | None = None) -> Residual:
        """The residual under ``residual_id``; ``check`` (which raises to refuse the
        request) runs first, so a refused request leaves the residual in place."""
        with self._lock:
            residual = self._items.get(residual_id)
            if residual is not None:
                if check is not None:
                    check(residual)
                if pop:
                    del self._items[residual_id]
                    self.nbytes -= residual.nbytes
        if residual is None:
            raise InvalidArgumentError(
                f"no residuals under id {residual_id} in this session: backward ran already "
                "(use retain_graph=True to run it twice), the graph was released, or the "
                f"residual budget (--max-residuals {self.cap}, --max-residual-bytes "
                f"{self.max_bytes}) dropped it"
            )
        return residual

    def peek(self, residual_id: int) -> Residual | None:
        """The residual under ``residual_id`` if held, without taking it (metrics)."""
        with self._lock:
            return self._items.get(residual_id)

    def release(self, ids: list[int]) -> int:
        with self._lock:
            released = [r for r in (self._items.pop(i, None) for i in ids) if r is not None]
            self.nbytes -= sum(r.nbytes for r in released)
            return len(released)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.nbytes = 0

    def __len__(self) -> int:
        return len(self._items)


# -- regions ------------------------------------------------------------------------------

SHM = "shm"
CUDA_IPC = "cuda_ipc"
"""Region kinds: the names of the descriptor fields (``Tensor.location`` and
``OutputArena.location``) that point into a region of that kind."""

_MIN_REGION_LIMIT = 64 << 20


def max_region_bytes(max_tensor_bytes: int) -> int:
    """The largest region a client may register: twice ``--max-tensor-bytes``, and at least
    64 MiB (a pool region holds many tensors and is at least 8 MiB: a small
    ``--max-tensor-bytes`` must not turn shared memory off for every client)."""
    return max(max_tensor_bytes * 2, _MIN_REGION_LIMIT)


def _check_region_size(size: int, max_tensor_bytes: int) -> None:
    largest = max_region_bytes(max_tensor_bytes)
    if size <= 0 or size > largest:
        raise ResourceExhaustedError(
            f"region size {size} is outside 1..{largest} bytes (twice "
            "--max-tensor-bytes, at least 64 MiB)"
        )


def require_cuda_ipc() -> None:
    """INVALID_ARGUMENT, saying to use shared memory, where this worker has no CUDA IPC."""
    support = cuda.cuda_ipc_support()
    if not support.available:
        raise InvalidArgumentError(cuda.no_support_message(support))


class WorkerRegion(abc.ABC):
    """A region a client registered in its session, of either kind.

    Note [Worker regions]
    =====================

    The worker reads inputs from, and writes outputs into, regions the client owns: shared
    memory (:class:`SharedMemoryWorkerRegion`) or an exported device buffer
    (:class:`CudaIpcWorkerRegion`). Both are one abstraction, so that the size check at
    registration, the bounds check of every descriptor, the views of input slices and the
    output writes each exist once:

    * registration checks the size once (:func:`max_region_bytes`), before mapping;
    * :meth:`check` validates a descriptor against the size checked at registration
      (never a size the peer could change later), offset + nbytes overflow included;
    * :meth:`view` gives a zero-copy view of a slice (numpy over shared memory, a JAX array
      over device memory), :meth:`host` a host array (the same view, or a copy from the
      device), :meth:`write` copies an output into a slice and returns once it is done.

    Who maps and unmaps is Note [Shared memory ownership] (``transport/_shm.py``) and Note
    [CUDA IPC ownership] (``transport/cuda/__init__.py``).
    """

    kind: str  # SHM or CUDA_IPC, set by each subclass

    def __init__(self, size: int) -> None:
        self.size = size

    def check(self, where: Any, what: str = "") -> None:
        """Validate a descriptor (``where.offset``, ``where.nbytes``) of this region;
        INVALID_ARGUMENT, prefixed with ``what``, when it is out of bounds or misaligned."""
        try:
            self._check(where)
        except ValueError as error:
            raise InvalidArgumentError(f"{what}{error}") from None

    @abc.abstractmethod
    def _check(self, where: Any) -> None: ...

    @abc.abstractmethod
    def view(self, offset: int, dtype: np.dtype, shape: tuple[int, ...]) -> Any:
        """A C-order array over a checked slice; SHARES memory with the client."""

    @abc.abstractmethod
    def host(self, offset: int, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        """A host numpy array of a checked slice (a view where the region is host memory)."""

    @abc.abstractmethod
    def write(self, offset: int, array: Any) -> None:
        """Copy ``array`` (numpy or JAX, C order) to ``offset``; done when it returns."""

    @abc.abstractmethod
    def close(self) -> None:
        """Drop this worker's mapping; arrays still viewing it keep it until they die."""


class SharedMemoryWorkerRegion(WorkerRegion):
    """A client's shared-memory region, attached (never owned) by the worker."""

    kind = SHM

    def __init__(self, region: SharedMemoryRegion) -> None:
        super().__init__(region.size)
        self.region = region

    @classmethod
    def attach(cls, name: str, size: int, *, directory: str, max_tensor_bytes: int,
               session_tag: str, allow_unsealed: bool = False) -> SharedMemoryWorkerRegion:
        """RegisterRegion for shared memory: size check, the name carries ``session_tag``
        (Note [Regions belong to one session] in ``transport/_shm.py``), then
        ``SharedMemoryRegion.attach`` (a sealed region, or with ``allow_unsealed`` a file the
        peer could shrink: Note [Sealed regions]). INVALID_ARGUMENT for another session's
        region or a refused one."""
        _check_region_size(size, max_tensor_bytes)
        match = NAME_PATTERN.fullmatch(name) if isinstance(name, str) else None
        if match is not None and match.group(2) != session_tag:
            raise RegionRejectedError(
                f"refusing to attach shared-memory region {name!r}: it was not created for "
                "this session (its name must carry this session's tag, "
                "`transport.region_tag(session_id)`: "
                f"`tji-<pid>-{session_tag}-<16 hex>`). A session can only register regions "
                "it created; create them with SharedMemoryRegion.create(size, tag=...)"
            )
        return cls(SharedMemoryRegion.attach(name, size, directory=directory,
                                             allow_unsealed=allow_unsealed))

    def _check(self, where: Any) -> None:
        check_slice(self.size, where.offset, where.nbytes)

    def view(self, offset: int, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        return numpy_view(self.region.buffer, offset, dtype, shape)

    host = view

    def write(self, offset: int, array: Any) -> None:
        if is_multi_device(array):  # Note [Sharded served functions]: shard by shard
            write_sharded(numpy_view(self.region.buffer, offset, np.dtype(array.dtype),
                                     array.shape), array)
            return
        source = np.asarray(array)
        target = numpy_view(self.region.buffer, offset, source.dtype, source.shape)
        np.copyto(target, source, casting="no")

    def close(self) -> None:
        try:
            self.region.close()
        except BufferError:
            # A JAX array still views the mapping (e.g. an output being sent); the mapping
            # goes away with the last view.
            pass


class CudaIpcWorkerRegion(WorkerRegion):
    """A client's exported device buffer, opened by the worker (``CudaIpcMapping``)."""

    kind = CUDA_IPC

    def __init__(self, mapping: cuda.CudaIpcMapping) -> None:
        super().__init__(mapping.size)
        self.mapping = mapping

    @classmethod
    def open(cls, handle: bytes, size: int, device_uuid: str, *,
             max_tensor_bytes: int) -> CudaIpcWorkerRegion:
        """RegisterRegion for CUDA IPC: support and size checks, then open the handle
        (TransportError, INVALID_ARGUMENT on the wire, where it cannot be opened)."""
        require_cuda_ipc()
        _check_region_size(size, max_tensor_bytes)
        return cls(cuda.open_region(handle, size, device_uuid))

    def _check(self, where: Any) -> None:
        cuda.check_cuda_descriptor(
            region_size=self.size, offset=where.offset, nbytes=where.nbytes,
            expected_nbytes=None,
        )

    def view(self, offset: int, dtype: np.dtype, shape: tuple[int, ...]) -> Any:
        return self.mapping.jax_array(offset, dtype, shape)

    def host(self, offset: int, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        return self.mapping.host_copy(offset, dtype, shape)

    def write(self, offset: int, array: Any) -> None:
        self.mapping.write(offset, array)

    def close(self) -> None:
        self.mapping.close()


class Session:
    """State the worker keeps for one connected client."""

    def __init__(self, session_id: str, client: str, *, max_residuals: int, max_regions: int,
                 max_residual_bytes: int | None = None):
        self.id = session_id
        self.region_tag = region_tag(session_id)
        self.client = client
        self.residuals = ResidualStore(max_residuals, max_residual_bytes)
        self.max_regions = max_regions
        # Regions of both kinds (Note [Worker regions]), one id space.
        self._regions: dict[int, WorkerRegion] = {}
        self._region_ids = itertools.count(1)
        self._lock = threading.Lock()
        self.closed = False
        self.transport_logged = False

    def add_region(self, region: WorkerRegion) -> int:
        """Keep ``region`` for this session; its ``region_id``. Closes it and raises
        RESOURCE_EXHAUSTED at ``--max-regions``."""
        with self._lock:
            if len(self._regions) >= self.max_regions:
                region.close()
                raise ResourceExhaustedError(
                    f"this session already maps {self.max_regions} regions (--max-regions); "
                    "release regions you no longer use"
                )
            # Ids are never reused within a session: a slice of a released region never
            # names another one.
            region_id = next(self._region_ids)
            self._regions[region_id] = region
            return region_id

    def region(self, kind: str, where: Any) -> WorkerRegion:
        """The region of ``kind`` a descriptor ``where`` (its ``region_id``) names;
        INVALID_ARGUMENT unless this session registered it and has not released it."""
        if kind == CUDA_IPC:
            require_cuda_ipc()
        region_id = where.region_id
        region = self._regions.get(region_id)
        if region is None or region.kind != kind:
            what = "CUDA IPC region" if kind == CUDA_IPC else "region"
            raise InvalidArgumentError(
                f"{what} {region_id} is not registered in this session; register it first "
                "(RegisterRegion) — a session can only use its own regions"
            )
        return region

    @contextlib.contextmanager
    def writing(self, region: WorkerRegion, where: Any) -> Iterator[WorkerRegion]:
        """``region`` (found by :meth:`region` for ``where``), held for one output write.

        Fencing: a region released (or a session ended) before the write is refused (ids
        are never reused), and ``release_region`` waits for a write in progress, so nothing is
        written into a region after it was given back."""
        with self._lock:
            if self._regions.get(where.region_id) is not region:
                raise InvalidArgumentError(
                    f"output region {where.region_id} was released while the call ran; "
                    "nothing was written to it. Keep a region registered until its calls "
                    "have returned"
                )
            yield region

    def release_region(self, region_id: int) -> None:
        with self._lock:
            region = self._regions.pop(region_id, None)
        if region is None:
            raise InvalidArgumentError(f"region {region_id} is not registered in this session")
        region.close()

    def close(self) -> None:
        """Drop residuals first (they may alias region memory), then the mappings."""
        self.closed = True
        self.residuals.clear()
        with self._lock:
            regions = list(self._regions.values())
            self._regions.clear()
        for region in regions:
            region.close()

    @property
    def num_regions(self) -> int:
        return len(self._regions)
