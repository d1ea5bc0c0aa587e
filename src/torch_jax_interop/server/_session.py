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
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .._errors import InvalidArgumentError, ResourceExhaustedError
from ..transport import SharedMemoryRegion

log = logging.getLogger("torch_jax_interop.server")


@dataclass
class Residual:
    function: Any  # CompiledFunction
    vjp_fn: Any
    args_spec: Any
    kwargs_spec: Any
    created: float = field(default_factory=time.monotonic)


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
    region: SharedMemoryRegion
    generation: int


class Session:
    """State the worker keeps for one connected client."""

    def __init__(self, session_id: str, client: str, *, max_residuals: int, max_regions: int):
        self.id = session_id
        self.client = client
        self.residuals = ResidualStore(max_residuals)
        self.max_regions = max_regions
        self._regions: dict[int, MappedRegion] = {}
        # CUDA IPC mappings (transport/_cuda_ipc.py); ids share one counter with _regions.
        self._cuda_regions: dict[int, MappedRegion] = {}
        self._region_ids = itertools.count(1)
        self._lock = threading.Lock()
        self.closed = False
        self.transport_logged = False

    def add_region(self, region: SharedMemoryRegion) -> tuple[int, int]:
        with self._lock:
            if len(self._regions) + len(self._cuda_regions) >= self.max_regions:
                region.close()
                raise ResourceExhaustedError(
                    f"this session already maps {self.max_regions} regions (--max-regions); "
                    "release regions you no longer use"
                )
            region_id = next(self._region_ids)
            # The generation is unique per (session, id): a stale slice never matches.
            generation = region_id
            self._regions[region_id] = MappedRegion(region, generation)
            return region_id, generation

    def region(self, region_id: int, generation: int) -> SharedMemoryRegion:
        mapped = self._regions.get(region_id)
        if mapped is None:
            raise InvalidArgumentError(
                f"region {region_id} is not registered in this session; register it first "
                "(RegisterRegion) — a session can only use its own regions"
            )
        if mapped.generation != generation:
            raise InvalidArgumentError(
                f"stale generation {generation} for region {region_id} (current "
                f"{mapped.generation}): the region was released and re-registered"
            )
        return mapped.region

    @contextlib.contextmanager
    def writing(self, region_id: int, generation: int) -> Iterator[SharedMemoryRegion]:
        """The region, held for one output write. Generation fencing: a region released (or
        a session ended) before the write is refused, and ``release_region`` waits for a
        write in progress, so nothing is written into a region after it was given back."""
        with self._lock:
            mapped = self._regions.get(region_id)
            if mapped is None or mapped.generation != generation:
                raise InvalidArgumentError(
                    f"output region {region_id} was released while the call ran; nothing was "
                    "written to it. Keep a region registered until its calls have returned"
                )
            yield mapped.region

    def add_cuda_region(self, mapping: Any) -> tuple[int, int]:
        """Keep a ``CudaIpcMapping`` for this session; same cap and ids as ``add_region``."""
        with self._lock:
            if len(self._regions) + len(self._cuda_regions) >= self.max_regions:
                mapping.close()
                raise ResourceExhaustedError(
                    f"this session already maps {self.max_regions} regions (--max-regions); "
                    "release regions you no longer use"
                )
            region_id = next(self._region_ids)
            self._cuda_regions[region_id] = MappedRegion(mapping, region_id)
            return region_id, region_id

    def cuda_region(self, region_id: int, generation: int) -> Any:
        """The ``CudaIpcMapping`` of a CUDA IPC region of this session (checked like
        ``region``)."""
        mapped = self._cuda_regions.get(region_id)
        if mapped is None:
            raise InvalidArgumentError(
                f"CUDA IPC region {region_id} is not registered in this session; register it "
                "first (RegisterRegion, kind CUDA_IPC) — a session can only use its own regions"
            )
        if mapped.generation != generation:
            raise InvalidArgumentError(
                f"stale generation {generation} for CUDA IPC region {region_id} (current "
                f"{mapped.generation}): the region was released and re-registered"
            )
        return mapped.region

    @contextlib.contextmanager
    def cuda_writing(self, region_id: int, generation: int) -> Iterator[Any]:
        """``writing`` for a CUDA IPC output region."""
        with self._lock:
            mapped = self._cuda_regions.get(region_id)
            if mapped is None or mapped.generation != generation:
                raise InvalidArgumentError(
                    f"output region {region_id} was released while the call ran; nothing was "
                    "written to it. Keep a region registered until its calls have returned"
                )
            yield mapped.region

    def release_region(self, region_id: int) -> None:
        with self._lock:
            mapped = self._regions.pop(region_id, None)
            if mapped is None:
                mapped = self._cuda_regions.pop(region_id, None)
        if mapped is None:
            raise InvalidArgumentError(f"region {region_id} is not registered in this session")
        _close_quietly(mapped.region)

    def close(self) -> None:
        """Drop residuals first (they may alias region memory), then the mappings."""
        self.closed = True
        self.residuals.clear()
        with self._lock:
            regions = list(self._regions.values()) + list(self._cuda_regions.values())
            self._regions.clear()
            self._cuda_regions.clear()
        for mapped in regions:
            _close_quietly(mapped.region)

    @property
    def num_regions(self) -> int:
        return len(self._regions) + len(self._cuda_regions)


def _close_quietly(region: SharedMemoryRegion) -> None:
    try:
        region.close()
    except BufferError:
        # A JAX array still views the mapping (e.g. an output being sent); the mapping goes
        # away with the last view.
        pass
