"""The CUDA driver and runtime, loaded on first use: libcuda through :mod:`ctypes`, cupy.

Nothing here runs at import time; without cupy or a GPU, :func:`cuda_ipc_support` says why
not, and everything else raises :class:`TransportError` with the fix.
"""

from __future__ import annotations

import ctypes
import os
import threading
from dataclasses import dataclass
from typing import Any

from ..._errors import TransportError
from ._policy import format_gpu_uuid

IPC_HANDLE_BYTES = 64
"""Size of a ``cudaIpcMemHandle_t``."""


def import_cupy() -> Any:
    """The cupy module; TransportError (with the install command) where it is missing."""
    try:
        import cupy
    except ImportError as error:
        raise TransportError(
            f"CUDA IPC needs cupy, which is not importable here ({error}); install the wheel "
            "matching the CUDA driver (pip install cupy-cuda12x or cupy-cuda13x)"
        ) from None
    return cupy


_libcuda_lock = threading.Lock()
_libcuda: Any = None


def libcuda() -> Any:
    """libcuda through ctypes, initialised once. Raises TransportError without a driver."""
    global _libcuda
    with _libcuda_lock:
        if _libcuda is None:
            try:
                lib = ctypes.CDLL("libcuda.so.1")
            except OSError as error:
                raise TransportError(f"no CUDA driver (libcuda.so.1: {error})") from None
            _check(lib, lib.cuInit(0), "cuInit")
            _libcuda = lib
        return _libcuda


def _check(lib: Any, status: int, what: str) -> None:
    if status != 0:
        text = ctypes.c_char_p()
        name = f"CUDA error {status}"
        try:
            if lib.cuGetErrorString(status, ctypes.byref(text)) == 0 and text.value:
                name = f"{name}: {text.value.decode(errors='replace')}"
        except AttributeError:
            pass
        raise TransportError(f"{what} failed ({name})")


def device_uuid(index: int) -> str:
    """The UUID of this process's CUDA device ``index`` (``GPU-...``), from the driver."""
    lib = libcuda()
    device = ctypes.c_int()
    _check(lib, lib.cuDeviceGet(ctypes.byref(device), ctypes.c_int(index)), "cuDeviceGet")
    raw = (ctypes.c_ubyte * 16)()
    get_uuid = getattr(lib, "cuDeviceGetUuid_v2", None) or lib.cuDeviceGetUuid
    _check(lib, get_uuid(raw, device), "cuDeviceGetUuid")
    return format_gpu_uuid(bytes(raw))


def visible_gpu_uuids() -> list[str]:
    """UUIDs of the GPUs this process sees, indexed like its CUDA devices."""
    lib = libcuda()
    count = ctypes.c_int()
    _check(lib, lib.cuDeviceGetCount(ctypes.byref(count)), "cuDeviceGetCount")
    return [device_uuid(i) for i in range(count.value)]


def allocation_size(ptr: int) -> int | None:
    """Size of the allocation ``ptr`` starts, or None when the driver cannot tell here."""
    lib = libcuda()
    base, size = ctypes.c_uint64(), ctypes.c_size_t()
    get_range = getattr(lib, "cuMemGetAddressRange_v2", None) or lib.cuMemGetAddressRange
    status = get_range(ctypes.byref(base), ctypes.byref(size), ctypes.c_uint64(ptr))
    if status != 0 or base.value != ptr:
        return None
    return int(size.value)


@dataclass(frozen=True)
class CudaIpcSupport:
    """Whether this process can use CUDA IPC: ``reason`` says why not."""

    available: bool
    reason: str
    visible_uuids: tuple[str, ...] = ()


_support_lock = threading.Lock()
_support: CudaIpcSupport | None = None


def cuda_ipc_support() -> CudaIpcSupport:
    """Whether cupy and a CUDA GPU are usable in this process (computed once)."""
    global _support
    with _support_lock:
        if _support is None:
            _support = _probe_support()
        return _support


def _probe_support() -> CudaIpcSupport:
    try:
        import_cupy()
        uuids = tuple(visible_gpu_uuids())
    except TransportError as error:
        return CudaIpcSupport(False, str(error))
    except Exception as error:  # a broken cupy install, a driver/runtime mismatch
        return CudaIpcSupport(False, f"cupy or the CUDA driver failed: {error}")
    if not uuids:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        note = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
        return CudaIpcSupport(False, f"no GPU is visible to this process{note}")
    return CudaIpcSupport(True, "", uuids)


def no_support_message(support: CudaIpcSupport) -> str:
    """What a worker without CUDA IPC answers (INVALID_ARGUMENT)."""
    return (
        f"this worker has no CUDA IPC support ({support.reason}); the client should send "
        "CUDA tensors through shared memory (transport='auto' falls back by itself, or "
        "use transport='shm')"
    )
