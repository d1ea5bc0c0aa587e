"""A client's session on the worker: its mapped regions and its vjp residuals.

See Note [Shared memory ownership] in ``transport/_shm.py``: the worker only *maps* regions
the client created and registered in this session; it never unlinks a live client's region
and never owns one. When the session ends (the client's ``OpenSession`` stream ends, whether
the client closed it or died), the worker drops the residuals and its mappings.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .._errors import InvalidArgumentError, ResourceExhaustedError
from ..transport import SharedMemoryRegion

log = logging.getLogger("torch_jax_interop.server")


@dataclass
class Residual:
    function: Any  # CompiledFunction
    vjp_fn: Any  # its VjpResiduals: no request message (their inline bytes) kept alive


class ResidualStore:
    """vjp residuals under ids; the oldest are dropped past ``cap`` (with a log line)."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._items: OrderedDict[int, Residual] = OrderedDict()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.evicted = 0

    def put(self, residual: Residual) -> int:
        with self._lock:
            residual_id = next(self._ids)
            self._items[residual_id] = residual
            while len(self._items) > self.cap:
                old_id, _ = self._items.popitem(last=False)
                self.evicted += 1
                log.warning(
                    "residual cap %d reached: dropped residual %d (backward on it will fail; "
                    "raise --max-residuals or release graphs sooner)", self.cap, old_id
                )
            return residual_id

    def get(self, residual_id: int, *, pop: bool) -> Residual:
        with self._lock:
            residual = self._items.pop(residual_id, None) if pop else self._items.get(residual_id)
        if residual is None:
            raise InvalidArgumentError(
                f"no residuals under id {residual_id} in this session: backward ran already "
                "(use retain_graph=True to run it twice), the graph was released, or the "
                f"residual cap ({self.cap}) dropped it"
            )
        return residual

    def release(self, ids: list[int]) -> int:
        with self._lock:
            return sum(self._items.pop(i, None) is not None for i in ids)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


@dataclass
class MappedRegion:
    region: Any  # SharedMemoryRegion, or a CudaIpcMapping
    generation: int
    kind: str = "shm"


SHM = "shm"
CUDA_IPC = "cuda_ipc"


class Session:
    """State the worker keeps for one connected client."""

    def __init__(self, session_id: str, client: str, *, max_residuals: int, max_regions: int):
        self.id = session_id
        self.client = client
        self.residuals = ResidualStore(max_residuals)
        self.max_regions = max_regions
        # Shared-memory regions and CUDA IPC mappings (transport/_cuda_ipc.py), one id space.
        self._regions: dict[int, MappedRegion] = {}
        self._region_ids = itertools.count(1)
        self._lock = threading.Lock()
        self.closed = False
        self.transport_logged = False

    def _add(self, region: Any, kind: str) -> tuple[int, int]:
        with self._lock:
            if len(self._regions) >= self.max_regions:
                region.close()
                raise ResourceExhaustedError(
                    f"this session already maps {self.max_regions} regions (--max-regions); "
                    "release regions you no longer use"
                )
            region_id = next(self._region_ids)
            # The generation is unique per (session, id): a stale slice never matches.
            self._regions[region_id] = MappedRegion(region, region_id, kind)
            return region_id, region_id

    def add_region(self, region: SharedMemoryRegion) -> tuple[int, int]:
        return self._add(region, SHM)

    def add_cuda_region(self, mapping: Any) -> tuple[int, int]:
        """Keep a ``CudaIpcMapping`` for this session; same cap and ids as ``add_region``."""
        return self._add(mapping, CUDA_IPC)

    def _lookup(self, region_id: int, generation: int, kind: str) -> Any:
        mapped = self._regions.get(region_id)
        if mapped is None or mapped.kind != kind:
            what = "CUDA IPC region" if kind == CUDA_IPC else "region"
            raise InvalidArgumentError(
                f"{what} {region_id} is not registered in this session; register it first "
                "(RegisterRegion) — a session can only use its own regions"
            )
        if mapped.generation != generation:
            raise InvalidArgumentError(
                f"stale generation {generation} for region {region_id} (current "
                f"{mapped.generation}): the region was released and re-registered"
            )
        return mapped.region

    def region(self, region_id: int, generation: int) -> SharedMemoryRegion:
        return self._lookup(region_id, generation, SHM)  # type: ignore[no-any-return]

    def cuda_region(self, region_id: int, generation: int) -> Any:
        """The ``CudaIpcMapping`` of a CUDA IPC region of this session."""
        return self._lookup(region_id, generation, CUDA_IPC)

    @contextlib.contextmanager
    def writing(self, region_id: int, generation: int,
                kind: str = SHM) -> Iterator[Any]:
        """The region, held for one output write. Generation fencing: a region released (or
        a session ended) before the write is refused, and ``release_region`` waits for a
        write in progress, so nothing is written into a region after it was given back."""
        with self._lock:
            mapped = self._regions.get(region_id)
            if mapped is None or mapped.generation != generation or mapped.kind != kind:
                raise InvalidArgumentError(
                    f"output region {region_id} was released while the call ran; nothing was "
                    "written to it. Keep a region registered until its calls have returned"
                )
            yield mapped.region

    def cuda_writing(self, region_id: int, generation: int) -> Any:
        """``writing`` for a CUDA IPC output region."""
        return self.writing(region_id, generation, CUDA_IPC)

    def release_region(self, region_id: int) -> None:
        with self._lock:
            mapped = self._regions.pop(region_id, None)
        if mapped is None:
            raise InvalidArgumentError(f"region {region_id} is not registered in this session")
        _close_quietly(mapped.region)

    def close(self) -> None:
        """Drop residuals first (they may alias region memory), then the mappings."""
        self.closed = True
        self.residuals.clear()
        with self._lock:
            regions = list(self._regions.values())
            self._regions.clear()
        for mapped in regions:
            _close_quietly(mapped.region)

    @property
    def num_regions(self) -> int:
        return len(self._regions)


def _close_quietly(region: SharedMemoryRegion) -> None:
    try:
        region.close()
    except BufferError:
        # A JAX array still views the mapping (e.g. an output being sent); the mapping goes
        # away with the last view.
        pass
