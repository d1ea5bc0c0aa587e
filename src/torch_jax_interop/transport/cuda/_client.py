"""Client side of CUDA IPC: exported device buffers, their pool, the session's channel.

:class:`CudaIpcPool` is the generic pool of ``transport/_pool.py`` over a device buffer
kind (:class:`DeviceBuffer`); see Note [CUDA IPC ownership] in ``transport/cuda/__init__.py``.
cupy and torch are imported on first use; tensors from :meth:`DeviceSlice.torch_bytes`
SHARE memory with the buffer, and so with the worker.
"""

from __future__ import annotations

import logging
import operator
import threading
import weakref
from collections.abc import Callable
from typing import Any

from ..._errors import RemoteError, TransportError
from .._pool import BufferKind, Pool, PoolSlice
from ._driver import cuda_ipc_support, device_uuid, import_cupy
from ._policy import (
    CUDA_ALIGNMENT,
    choose_transport,
    expandable_segments_enabled,
    parse_gpu_uuid,
    shared_namespaces,
)

log = logging.getLogger("torch_jax_interop.transport")

REGION_GRANULARITY = 2 << 20
"""Device buffers are allocated in multiples of 2 MiB (the driver's large-page size)."""


class DeviceBuffer:
    """One exported cudaMalloc allocation of the client (Note [CUDA IPC ownership])."""

    __slots__ = ("ptr", "size", "device_index", "device_uuid", "handle", "_finalizer",
                 "__weakref__")

    def __init__(self, size: int, device_index: int, uuid: str) -> None:
        cp = import_cupy()
        with cp.cuda.Device(device_index):
            ptr = int(cp.cuda.runtime.malloc(size))
            try:
                handle = bytes(cp.cuda.runtime.ipcGetMemHandle(ptr))
            except BaseException:
                cp.cuda.runtime.free(ptr)
                raise
        self.ptr = ptr
        self.size = size
        self.device_index = device_index
        self.device_uuid = uuid
        self.handle = handle
        self._finalizer = weakref.finalize(self, _free_buffer, ptr, device_index)
        self._finalizer.atexit = False  # the process's exit frees device memory itself

    def __repr__(self) -> str:
        return f"DeviceBuffer(size={self.size}, device={self.device_index}, ptr={self.ptr:#x})"


def _free_buffer(ptr: int, device_index: int) -> None:
    try:
        cp = import_cupy()
        with cp.cuda.Device(device_index):
            cp.cuda.runtime.free(ptr)
    except Exception as error:
        log.debug("cudaFree(%#x) failed: %s", ptr, error)


class _DeviceKind(BufferKind[DeviceBuffer]):
    """Exported cudaMalloc buffers on one GPU, 256-byte aligned slices, 2 MiB multiples."""

    name = "cuda_ipc"
    label = "CUDA IPC"
    alignment = CUDA_ALIGNMENT
    granularity = REGION_GRANULARITY

    def __init__(self, device_index: int, uuid: str) -> None:
        self.device_index = device_index
        self.uuid = uuid

    def create(self, size: int) -> DeviceBuffer:
        return DeviceBuffer(size, self.device_index, self.uuid)

    # close(): nothing to do now. A buffer is freed by its own finalizer once neither the
    # pool nor a slice nor a tensor viewing it refers to it (Note [CUDA IPC ownership]).


class _CudaBytes:
    """A ``__cuda_array_interface__`` of raw device bytes that keeps its memory alive.

    ``torch.as_tensor`` keeps this object referenced from the tensor's storage, so the
    slice (and its buffer) outlive every view of it.
    """

    __slots__ = ("__cuda_array_interface__", "_keep", "__weakref__")

    def __init__(self, ptr: int, nbytes: int, keep: object) -> None:
        self._keep = keep
        self.__cuda_array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (ptr, False),
            "strides": None,
            "version": 3,  # no "stream" key: the producer has synchronised already
        }


class _SliceKeeper:
    """Holds a device buffer alive for tensors viewing one slice of it."""

    __slots__ = ("buffer", "__weakref__")

    def __init__(self, buffer: DeviceBuffer) -> None:
        self.buffer = buffer


class DeviceSlice(PoolSlice[DeviceBuffer]):
    """A 256-byte aligned slice of a pooled device buffer: what a ``CudaIpcSlice`` names.

    :meth:`torch_bytes` SHARES memory with the buffer (and with the worker). Give it back
    with :meth:`release`, or let :meth:`torch_bytes` with ``release_when_collected=True``
    give it back when the last tensor viewing it dies.
    """

    __slots__ = ()

    @property
    def device_uuid(self) -> str:
        """The GPU the buffer lives on."""
        return self._entry.buffer.device_uuid

    @property
    def device_index(self) -> int:
        """This process's CUDA device index of that GPU."""
        return self._entry.buffer.device_index

    @property
    def ptr(self) -> int:
        """Device address of the slice in this process."""
        return self._entry.buffer.ptr + self._offset

    def torch_bytes(self, *, release_when_collected: bool = False) -> Any:
        """A ``torch.uint8`` CUDA tensor over exactly the slice's bytes; no copy.

        With ``release_when_collected`` the slice goes back to the pool once that tensor
        and every view of its storage are gone (Note [Releasing from finalizers] in
        ``transport/_pool.py``).
        """
        import torch

        self._check_live()
        keeper = _SliceKeeper(self._entry.buffer)
        if release_when_collected:
            weakref.finalize(keeper, self.release)
        carrier = _CudaBytes(self.ptr, self._nbytes, keeper)
        return torch.as_tensor(carrier, device=torch.device("cuda", self.device_index))

    def _describe(self) -> str:
        return f"{super()._describe()}, device={self.device_uuid}"


RegisterCudaFn = Callable[[DeviceBuffer], int]
"""Registers a new buffer with the worker and returns the ``region_id`` it assigned."""


class CudaIpcPool(Pool[DeviceBuffer, DeviceSlice]):
    """Client-side pool of exported device buffers on one GPU, thread-safe.

    Buffers hold ``max(min_region_bytes, request rounded up to 2 MiB)`` bytes, are
    registered with ``register`` once and reused; the pool never grows past
    ``max_total_bytes`` (None: no limit). Releases follow Note [Releasing from
    finalizers] in ``transport/_pool.py``.
    """

    slice_type = DeviceSlice

    def __init__(
        self,
        register: RegisterCudaFn,
        device_index: int,
        *,
        uuid: str | None = None,
        min_region_bytes: int = 64 << 20,
        max_total_bytes: int | None = None,
    ) -> None:
        device_index = operator.index(device_index)
        uuid = parse_gpu_uuid(uuid) if uuid is not None else device_uuid(device_index)
        super().__init__(_DeviceKind(device_index, uuid), register,
                         min_region_bytes=min_region_bytes, max_total_bytes=max_total_bytes)
        self.device_index = device_index
        self.device_uuid = uuid

    def __repr__(self) -> str:
        # Without the lock: a repr may be asked for inside a critical section.
        return (f"CudaIpcPool(device={self.device_uuid}, "
                f"num_regions={len(self._state.regions)}, closed={self._state.closed})")


def client_cuda_ipc_problem() -> str | None:
    """None when this process can allocate and export CUDA IPC buffers, else why not."""
    support = cuda_ipc_support()
    return None if support.available else support.reason


class CudaIpcChannel:
    """The client's CUDA IPC state for one session: one decision and one pool per GPU.

    The first CUDA tensor on a GPU decides (:func:`choose_transport`, then a probe: the
    first buffer is registered, and a worker that cannot open it says why). A fallback is
    logged once per GPU with its reason; ``transport="cuda_ipc"`` raises instead.
    """

    def __init__(
        self,
        requested: str,
        *,
        register: RegisterCudaFn,
        release: Callable[[int], None],
        same_host: bool,
        worker_pid: int,
    ) -> None:
        self.requested = requested
        self._register = register
        self._release_region = release
        self.same_host = same_host
        self.worker_pid = worker_pid
        self._pools: dict[int, CudaIpcPool | None] = {}
        self.reasons: dict[int, str] = {}
        self._lock = threading.Lock()

    def pool_for(self, device_index: int) -> CudaIpcPool | None:
        """The pool for tensors on ``cuda:device_index``, or None: use the host path."""
        try:
            return self._pools[device_index]
        except KeyError:
            pass
        with self._lock:
            if device_index not in self._pools:
                self._pools[device_index] = self._decide(device_index)
            return self._pools[device_index]

    def _decide(self, device_index: int) -> CudaIpcPool | None:
        problem = client_cuda_ipc_problem()
        uuid = None
        if problem is None:
            try:
                uuid = device_uuid(device_index)
            except TransportError as error:
                problem = str(error)
        transport, reason = choose_transport(
            self.requested, tensor_is_cuda=True, same_host=self.same_host, client_uuid=uuid,
            expandable_segments=expandable_segments_enabled(),
            shared_namespaces=shared_namespaces(self.worker_pid), client_cuda_ipc=problem,
        )
        if transport == "cuda_ipc":
            pool = CudaIpcPool(self._register, device_index, uuid=uuid)
            try:
                pool.allocate(1).release()  # registers a first buffer: the worker's verdict
            except (RemoteError, TransportError, RuntimeError) as error:
                pool.close()
                reason = f"CUDA IPC could not be set up with the worker ({error})"
                if self.requested == "cuda_ipc":
                    raise TransportError(f"transport='cuda_ipc' is not possible: {reason}") \
                        from None
            else:
                log.info("CUDA tensors on cuda:%d (%s) travel by CUDA IPC", device_index, uuid)
                return pool
        self.reasons[device_index] = reason
        log.warning("CUDA tensors on cuda:%d fall back to the host path (through host "
                    "memory): %s", device_index, reason)
        return None

    def close(self, *, release_regions: bool) -> None:
        """Close the pools; with ``release_regions`` first ask the worker to unmap them
        (best effort), so no buffer is freed while the worker still maps it."""
        with self._lock:
            pools = [p for p in self._pools.values() if p is not None]
            self._pools.clear()
        for pool in pools:
            if release_regions:
                for region_id in pool.region_ids:
                    try:
                        self._release_region(region_id)
                    except Exception as error:  # the worker is gone: nothing maps it
                        log.debug("releasing CUDA IPC region %d failed: %s", region_id, error)
                        break
            pool.close()
