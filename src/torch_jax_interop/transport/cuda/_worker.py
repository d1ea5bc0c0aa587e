"""Worker side of CUDA IPC: open a client's exported buffer once and view it from JAX.

See Note [CUDA IPC ownership] in ``transport/cuda/__init__.py``. cupy and jax are imported
on first use; arrays from :meth:`CudaIpcMapping.jax_array` SHARE memory with the client.
"""

from __future__ import annotations

import logging
import math
import operator
import threading
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..._errors import TransportError
from ._driver import (
    IPC_HANDLE_BYTES,
    allocation_size,
    cuda_ipc_support,
    import_cupy,
    no_support_message,
)
from ._policy import parse_gpu_uuid, route_device, validate_cuda_slice

log = logging.getLogger("torch_jax_interop.transport")

_CUDA_MEMCPY_HOST_TO_DEVICE = 1
_CUDA_MEMCPY_DEFAULT = 4  # direction inferred from the pointers (unified addressing)


class _OpenedHandle:
    """One ``cudaIpcOpenMemHandle`` mapping; closed when the last reference dies."""

    __slots__ = ("ptr", "device_index", "__weakref__")

    def __init__(self, ptr: int, device_index: int) -> None:
        self.ptr = ptr
        self.device_index = device_index
        finalizer = weakref.finalize(self, _close_handle, ptr, device_index)
        finalizer.atexit = False  # at exit the driver unmaps everything itself


# Handles opened in this process, by (device, handle bytes): the driver maps a handle once
# per process and context. A WeakValueDictionary drops a dead entry by itself, so the
# finalizer that closes a handle takes no lock (see Note [Releasing from finalizers] in
# transport/_pool.py for why finalizers must not wait for locks).
_opened_lock = threading.Lock()
_opened: weakref.WeakValueDictionary[tuple[int, bytes], _OpenedHandle] = (
    weakref.WeakValueDictionary()
)
open_count = 0
"""How many times this process called cudaIpcOpenMemHandle (a statistic for tests)."""


def _close_handle(ptr: int, device_index: int) -> None:
    try:
        cp = import_cupy()
        with cp.cuda.Device(device_index):
            cp.cuda.runtime.ipcCloseMemHandle(ptr)
        log.info("closed a CUDA IPC handle on device %d at %#x", device_index, ptr)
    except Exception as error:  # the context may be gone already; nothing else to do
        log.debug("cudaIpcCloseMemHandle(%#x) failed: %s", ptr, error)


def _open_handle(handle: bytes, device_index: int) -> _OpenedHandle:
    global open_count
    key = (device_index, bytes(handle))
    with _opened_lock:
        opened = _opened.get(key)
        if opened is not None:
            return opened
        cp = import_cupy()
        try:
            with cp.cuda.Device(device_index):
                ptr = cp.cuda.runtime.ipcOpenMemHandle(bytes(handle))
        except cp.cuda.runtime.CUDARuntimeError as error:
            raise TransportError(
                f"cudaIpcOpenMemHandle failed on device {device_index} ({error}). The client "
                "and the worker must run on the same host and share its IPC and PID "
                "namespaces (docker: `ipc: host` and `pid: host`, or `service:` for both), "
                "and the handle must come from a live cudaMalloc buffer of the client"
            ) from None
        open_count += 1
        log.info("opened a CUDA IPC handle on device %d at %#x", device_index, int(ptr))
        opened = _OpenedHandle(int(ptr), device_index)
        _opened[key] = opened
        return opened


_CUPY_NATIVE = frozenset(
    np.dtype(name) for name in (
        "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
        "float16", "float32", "float64", "complex64", "complex128",
    )
)

_thread_streams = threading.local()


def _copy_stream(cp: Any, device_index: int) -> Any:
    """A non-blocking cupy stream of this thread on ``device_index`` (made once)."""
    streams = getattr(_thread_streams, "streams", None)
    if streams is None:
        streams = _thread_streams.streams = {}
    stream = streams.get(device_index)
    if stream is None:
        with cp.cuda.Device(device_index):
            stream = streams[device_index] = cp.cuda.Stream(non_blocking=True)
    return stream


class CudaIpcMapping:
    """A client's device buffer opened in the worker (see Note [CUDA IPC ownership]).

    Made by :func:`open_region`; arrays from :meth:`jax_array` SHARE memory with the
    client's buffer.
    """

    def __init__(self, opened: _OpenedHandle, size: int, uuid: str) -> None:
        self._opened: _OpenedHandle | None = opened
        self.ptr = opened.ptr
        self.device_index = opened.device_index
        self.size = size
        self.uuid = uuid

    @property
    def closed(self) -> bool:
        return self._opened is None

    def _handle(self) -> _OpenedHandle:
        if self._opened is None:
            raise TransportError(f"CUDA IPC region on `{self.uuid}` was released")
        return self._opened

    def _cupy_view(self, offset: int, dtype: np.dtype, shape: tuple[int, ...]) -> Any:
        cp = import_cupy()
        opened = self._handle()
        nbytes = math.prod(shape) * dtype.itemsize
        validate_cuda_slice(self.size, offset, nbytes, alignment=1)
        # The UnownedMemory keeps `opened` alive: the handle stays open under every view.
        memory = cp.cuda.UnownedMemory(self.ptr, self.size, opened, self.device_index)
        with cp.cuda.Device(self.device_index):
            return cp.ndarray(shape, dtype=dtype, memptr=cp.cuda.MemoryPointer(memory, offset))

    def jax_array(self, offset: int, dtype: Any, shape: Sequence[int]) -> Any:
        """A JAX array over ``[offset, offset + nbytes)`` with ``dtype`` and C-order
        ``shape``: zero-copy for the dtypes cupy knows (DLPack); bfloat16 and float8 are
        imported as same-width unsigned ints and bitcast on the device (one device copy).
        """
        import jax

        dtype = np.dtype(dtype)
        shape = tuple(int(d) for d in shape)
        if 0 in shape:
            device = _jax_device(self.device_index)
            return jax.device_put(np.zeros(shape, dtype), device)
        if dtype in _CUPY_NATIVE:
            return jax.dlpack.from_dlpack(self._cupy_view(offset, dtype, shape))
        carrier = np.dtype(f"uint{dtype.itemsize * 8}")
        raw = jax.dlpack.from_dlpack(self._cupy_view(offset, carrier, shape))
        return jax.lax.bitcast_convert_type(raw, dtype)

    def host_copy(self, offset: int, dtype: Any, shape: Sequence[int]) -> np.ndarray:
        """A host numpy copy of a slice (for the x64-off narrowing policy)."""
        dtype = np.dtype(dtype)
        shape = tuple(int(d) for d in shape)
        if 0 in shape:
            return np.zeros(shape, dtype)
        carrier = np.dtype(f"uint{dtype.itemsize * 8}")
        view = self._cupy_view(offset, carrier, shape)
        with import_cupy().cuda.Device(self.device_index):
            return np.asarray(view.get()).view(dtype)

    def write(self, offset: int, array: Any) -> None:
        """Copy ``array`` (a JAX array or numpy array, C-contiguous) to ``offset``; returns
        once the copy has finished (the client may read it as soon as the reply arrives)."""
        nbytes = int(array.nbytes)
        if nbytes == 0:
            return
        validate_cuda_slice(self.size, offset, nbytes, alignment=1)
        cp = import_cupy()
        opened = self._handle()
        source: Any = array
        kind = _CUDA_MEMCPY_DEFAULT
        devices = getattr(array, "devices", None)
        on_gpu = False
        if devices is not None:
            placed = devices()
            on_gpu = len(placed) == 1 and next(iter(placed)).platform != "cpu"
        if on_gpu:
            array.block_until_ready()
            src = int(array.unsafe_buffer_pointer())
        else:
            source = np.ascontiguousarray(np.asarray(array))
            src = source.ctypes.data
            kind = _CUDA_MEMCPY_HOST_TO_DEVICE
        with cp.cuda.Device(self.device_index):
            stream = _copy_stream(cp, self.device_index)
            cp.cuda.runtime.memcpyAsync(opened.ptr + offset, src, nbytes, kind, stream.ptr)
            stream.synchronize()
        del source

    def close(self) -> None:
        """Drop this mapping's reference: the handle is closed once no array views it."""
        self._opened = None

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return (f"CudaIpcMapping(uuid={self.uuid!r}, device={self.device_index}, "
                f"size={self.size}, {state})")


def _jax_device(index: int) -> Any:
    import jax

    for device in jax.devices():
        if device.platform != "cpu" and device.local_hardware_id == index:
            return device
    raise TransportError(f"JAX has no GPU with local hardware id {index}")


def open_region(handle: bytes, size: int, device_uuid: str) -> CudaIpcMapping:
    """Worker side of RegisterRegion(kind=CUDA_IPC): route, open (cached), check the size.

    Raises :class:`TransportError` (INVALID_ARGUMENT on the wire) when this worker has no
    CUDA IPC support, the GPU is not visible here, or the handle cannot be opened.
    """
    support = cuda_ipc_support()
    if not support.available:
        raise TransportError(no_support_message(support))
    try:
        uuid = parse_gpu_uuid(device_uuid)
    except ValueError as error:
        raise TransportError(f"RegisterRegion(CUDA_IPC): {error}") from None
    if len(handle) != IPC_HANDLE_BYTES:
        raise TransportError(
            f"a CUDA IPC handle has {IPC_HANDLE_BYTES} bytes, got {len(handle)}; send the "
            "bytes cudaIpcGetMemHandle returned"
        )
    size = operator.index(size)
    if size <= 0:
        raise TransportError(f"CUDA IPC region size must be positive, got {size}")
    index = route_device(uuid, support.visible_uuids)
    opened = _open_handle(handle, index)
    cp = import_cupy()
    with cp.cuda.Device(index):
        # Explicitly: cupy skips the call when the device looks current, and the driver
        # call below needs the primary context current in this (gRPC) thread.
        cp.cuda.runtime.setDevice(index)
        actual = allocation_size(opened.ptr)
    if actual is not None and size > actual:
        raise TransportError(
            f"CUDA IPC region registered with {size} bytes, but its allocation holds only "
            f"{actual}; register the size the buffer was allocated with"
        )
    if actual is None:
        log.warning("could not query the size of an opened CUDA IPC allocation; trusting "
                    "the registered size %d", size)
    return CudaIpcMapping(opened, size, uuid)
