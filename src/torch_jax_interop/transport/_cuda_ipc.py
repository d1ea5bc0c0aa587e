"""CUDA IPC: GPU tensors cross the process boundary without leaving the GPU.

Two halves live here, so that the server and the client only call into this module:

* Pure logic, no GPU needed (tested everywhere): :func:`validate_cuda_slice`,
  :func:`check_cuda_descriptor`, GPU UUID parsing (:func:`parse_gpu_uuid`,
  :func:`format_gpu_uuid`), :func:`route_device`, :func:`expandable_segments_enabled`,
  :func:`shared_namespaces` and :func:`choose_transport` (what ``transport="auto"`` does).
* GPU parts (need cupy and a CUDA GPU; tested by the ``gpu``-marked tests only):
  :class:`CudaIpcPool` and :class:`DeviceSlice` on the client, :class:`CudaIpcMapping` on
  the worker, :class:`CudaIpcChannel` (the client's per-session decision and pools).

Neither torch nor jax nor cupy is imported at module level: the worker must not import
torch, the client must not import jax, and CI has no cupy. cupy is imported on first use;
GPU UUIDs are read through the CUDA driver with :mod:`ctypes` (``cuDeviceGetUuid``), because
``cupy.cuda.runtime.getDeviceProperties()["uuid"]`` goes through a C ``char[16]`` that
Cython cuts at the first zero byte.

Note [CUDA IPC ownership]
=========================

Who allocates: the CLIENT (the torch process). :class:`CudaIpcPool` allocates dedicated
device buffers with plain ``cudaMalloc`` (``cupy.cuda.runtime.malloc``) in multiples of
2 MiB, never torch caching-allocator blocks: a handle exports its whole allocation (a
caching-allocator segment would expose unrelated tensors), and PyTorch's
``expandable_segments`` allocations cannot be exported with ``cudaIpcGetMemHandle`` at
all. Each buffer is exported once (``cudaIpcGetMemHandle``), registered with the worker
once (RegisterRegion, kind CUDA_IPC, with the GPU's UUID), and reused for many calls:
slices are carved at 256-byte aligned offsets and given back to the pool.

Who maps: the WORKER opens each handle once (``cudaIpcOpenMemHandle``) on the device whose
UUID the client named (:func:`route_device`: indices differ between processes when
CUDA_VISIBLE_DEVICES does), checks that the allocation is at least as large as the size
the client registered, and caches the mapping for the session (and process-wide, keyed by
the handle bytes: the driver maps a handle only once per process and context). Inputs
become JAX arrays zero-copy (DLPack of a cupy view of the mapping); outputs are written
into client-provided slots with a device-to-device copy.

Who unmaps, and when: the worker, on ReleaseRegion or at the end of the session. JAX
arrays made from a mapping keep it open (the DLPack deleter holds the cupy view, whose
memory holds the mapping), so ``cudaIpcCloseMemHandle`` runs when the last of them dies,
never under a live array.

Who frees: the client, when its pool is closed (session end, ``Worker.close()``), after it
has asked the worker to release its regions. Buffers that output tensors still view are
freed when the last such tensor dies (the tensor's storage keeps the buffer alive).

Stream ordering: the client copies a tensor into its slice on torch's current stream and
synchronises that stream before the request leaves (so the worker reads finished bytes,
and no kernel still reads an output slot the worker may now overwrite). The worker calls
``block_until_ready`` on its outputs, copies them on its own stream and synchronises it
before it replies, so the client sees finished outputs.
"""

from __future__ import annotations

import ctypes
import logging
import math
import operator
import os
import re
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._errors import PoolExhaustedError, SliceOutOfBoundsError, TransportError
from ._freelist import FreeList
from ._shm import check_slice

log = logging.getLogger("torch_jax_interop.transport")

CUDA_ALIGNMENT = 256
"""Byte alignment of every CUDA IPC slice (cudaMalloc's own alignment)."""

REGION_GRANULARITY = 2 << 20
"""Device buffers are allocated in multiples of 2 MiB (the driver's large-page size)."""

IPC_HANDLE_BYTES = 64
"""Size of a ``cudaIpcMemHandle_t``."""

OUTPUT_ALIGNMENT = 64
"""Outputs inside an output arena start at 64-byte aligned offsets (as in shared memory)."""

TRANSPORTS = ("auto", "cuda_ipc", "shm", "inline")

_UUID_RE = re.compile(
    r"(?:(GPU|MIG)-)?([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})",
    re.IGNORECASE,
)

# -- pure logic: descriptors ---------------------------------------------------------------


def validate_cuda_slice(
    region_size: int, offset: int, nbytes: int, alignment: int = CUDA_ALIGNMENT
) -> None:
    """Raise :class:`SliceOutOfBoundsError` unless ``[offset, offset + nbytes)`` lies in the
    region and ``offset`` is a multiple of ``alignment`` (256 for CUDA IPC slices).

    Bounds are checked by :func:`~torch_jax_interop.transport.check_slice` (negative values,
    non-ints, and sums that would wrap around 2**64 in fixed-width arithmetic included).
    """
    check_slice(region_size, offset, nbytes, alignment=1)
    alignment = operator.index(alignment)
    if alignment <= 0:
        raise ValueError(f"`alignment` must be positive, got {alignment}")
    if offset % alignment:
        raise SliceOutOfBoundsError(
            f"CUDA IPC slice offset={offset} is not a multiple of {alignment}: every slice of "
            f"a device buffer must start at a {alignment}-byte aligned offset (what "
            "cudaMalloc guarantees and what DLPack consumers expect)"
        )


def check_cuda_descriptor(
    *,
    region_size: int,
    offset: int,
    nbytes: int,
    expected_nbytes: int | None,
    alignment: int = CUDA_ALIGNMENT,
) -> None:
    """Validate a ``CudaIpcSlice`` against the region it names (worker side). The slice's
    GPU is its region's: the region was registered with its device UUID.

    ``expected_nbytes``: what dtype x shape needs (None for an output arena, which may be
    larger than any one tensor). Raises :class:`SliceOutOfBoundsError` (a ValueError) with a
    message saying what is wrong.
    """
    if expected_nbytes is not None and nbytes != expected_nbytes:
        raise SliceOutOfBoundsError(
            f"CUDA IPC slice holds {nbytes} bytes but the tensor's shape and dtype need "
            f"{expected_nbytes}"
        )
    validate_cuda_slice(region_size, offset, nbytes, alignment)


# -- pure logic: GPU identity ---------------------------------------------------------------


def parse_gpu_uuid(text: object) -> str:
    """The canonical spelling of a GPU UUID: ``GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx``.

    Accepts what ``nvidia-smi -L`` prints (``GPU-...`` or ``MIG-...``), any letter case, and
    the bare 36-character form ``str(torch.cuda.get_device_properties(i).uuid)`` gives
    (which becomes ``GPU-...``). Raises ValueError for anything else.
    """
    if not isinstance(text, str):
        raise ValueError(f"a GPU UUID must be a str, got {type(text).__name__}")
    match = _UUID_RE.fullmatch(text.strip())
    if match is None:
        shown = repr(text) if len(text) <= 80 else repr(text[:77] + "...")
        raise ValueError(
            f"malformed GPU UUID {shown}: expected `GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` "
            "(hex digits, as `nvidia-smi -L` prints it)"
        )
    prefix = (match.group(1) or "GPU").upper()
    return f"{prefix}-{match.group(2).lower()}"


def format_gpu_uuid(raw: bytes, prefix: str = "GPU") -> str:
    """``GPU-xxxxxxxx-...`` from the 16 raw bytes ``cuDeviceGetUuid`` returns."""
    raw = bytes(raw)
    if len(raw) != 16:
        raise ValueError(f"a GPU UUID has 16 bytes, got {len(raw)}")
    h = raw.hex()
    return f"{prefix}-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def route_device(uuid: str, visible_uuids: Sequence[str]) -> int:
    """The local CUDA device index (in this process) of the GPU ``uuid``.

    Devices are routed by UUID, never by index: ``cuda:0`` in the client and ``cuda:0`` in
    the worker are different GPUs whenever their CUDA_VISIBLE_DEVICES differ. Raises
    :class:`TransportError` when this process cannot see that GPU.
    """
    wanted = parse_gpu_uuid(uuid)
    normalised = [parse_gpu_uuid(u) for u in visible_uuids]
    for index, candidate in enumerate(normalised):
        if candidate == wanted:
            return index
    seen = ", ".join(f"{i}: {u}" for i, u in enumerate(normalised)) or "none"
    visible_env = os.environ.get("CUDA_VISIBLE_DEVICES")
    env_note = (f" (CUDA_VISIBLE_DEVICES={visible_env!r})" if visible_env is not None else "")
    raise TransportError(
        f"GPU `{wanted}` is not visible to the worker{env_note}; it sees {seen}. Run the "
        "worker where it can see the client's GPU (same host; include that GPU in its "
        "CUDA_VISIBLE_DEVICES / container device list), or let the client use shared "
        "memory (transport='auto' or 'shm')"
    )


# -- pure logic: environment ---------------------------------------------------------------


def expandable_segments_enabled(alloc_conf: str | None = None) -> bool:
    """Whether PyTorch's caching allocator runs with ``expandable_segments:True``.

    ``alloc_conf`` defaults to ``$PYTORCH_CUDA_ALLOC_CONF`` (or the newer
    ``$PYTORCH_ALLOC_CONF``): comma-separated ``key:value`` pairs.
    """
    if alloc_conf is None:
        alloc_conf = ",".join(
            os.environ.get(name, "") for name in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")
        )
    enabled = False
    for item in alloc_conf.split(","):
        key, _, value = item.partition(":")
        if key.strip() == "expandable_segments":
            enabled = value.strip().lower() in ("true", "1")  # the last setting wins
    return enabled


def _ns(pid: int | str, kind: str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/{kind}")
    except OSError:
        return None


def shared_namespaces(worker_pid: int) -> bool | None:
    """Whether this process shares the IPC and PID namespaces with ``worker_pid``.

    CUDA IPC needs both (in containers: ``ipc: host``/``pid: host`` or ``service:`` on both).
    False when the pid the worker reported does not exist here (another PID namespace) or
    its namespaces differ from ours; None when it cannot be told (no ``/proc``, no
    permission): then opening a handle decides.
    """
    if worker_pid <= 0 or not os.path.isdir("/proc/self/ns"):
        return None
    if not os.path.exists(f"/proc/{worker_pid}"):
        return False
    unknown = False
    for kind in ("ipc", "pid"):
        mine, theirs = _ns("self", kind), _ns(worker_pid, kind)
        if mine is None or theirs is None:
            unknown = True
        elif mine != theirs:
            return False
    return None if unknown else True


def choose_transport(
    requested: str,
    *,
    tensor_is_cuda: bool,
    same_host: bool,
    client_uuid: str | None = None,
    worker_visible_uuids: Sequence[str] | None = None,
    expandable_segments: bool = False,
    exports_torch_memory: bool = False,
    shared_namespaces: bool | None = None,
    client_cuda_ipc: str | None = None,
) -> tuple[str, str]:
    """How one tensor travels: ``(transport, reason)``.

    ``transport`` is ``"cuda_ipc"``, ``"shm"`` (the host path: shared memory on one host)
    or ``"inline"`` (bytes in the message, another host). ``reason`` says why, and is what
    the client logs when a CUDA tensor falls back to the host path.

    * ``requested``: ``"auto"``, ``"cuda_ipc"``, ``"shm"`` or ``"inline"``. ``"cuda_ipc"``
      raises :class:`TransportError` (with the reason) when CUDA IPC is impossible for a
      CUDA tensor; CPU tensors then take the host path.
    * ``same_host``: the worker's boot id equals ours.
    * ``client_uuid`` / ``worker_visible_uuids``: the tensor's GPU, and the GPUs the worker
      sees (None: not known here; the worker refuses a handle it cannot open).
    * ``expandable_segments`` with ``exports_torch_memory``: exporting PyTorch
      caching-allocator memory does not work with ``expandable_segments:True``. The pool
      of this module exports its own cudaMalloc buffers, so by default (False) the setting
      does not matter; it is an input for exporters of torch's own blocks.
    * ``shared_namespaces``: from :func:`shared_namespaces` (None: unknown).
    * ``client_cuda_ipc``: None when this process can export handles, else why not (e.g.
      cupy is missing).
    """
    if requested not in TRANSPORTS:
        raise ValueError(f"transport must be one of {', '.join(map(repr, TRANSPORTS))}, "
                         f"got {requested!r}")
    host = "shm" if same_host else "inline"
    if requested == "inline":
        return "inline", "transport='inline' was asked for"
    if requested == "shm":
        return host, "transport='shm' was asked for"
    if not tensor_is_cuda:
        return host, "the tensor is in host memory; CUDA IPC is for CUDA tensors"
    reason: str | None = None
    if not same_host:
        reason = ("the worker runs on another host (different boot id): CUDA IPC handles "
                  "open only on the host that made them")
    elif shared_namespaces is False:
        reason = ("the worker does not share this process's IPC and PID namespaces (e.g. "
                  "containers without `ipc: host`/`pid: host`): CUDA IPC needs both")
    elif expandable_segments and exports_torch_memory:
        reason = ("PYTORCH_CUDA_ALLOC_CONF has expandable_segments:True, and memory from "
                  "expandable segments cannot be exported with cudaIpcGetMemHandle")
    elif client_cuda_ipc is not None:
        reason = f"this process cannot export CUDA IPC handles: {client_cuda_ipc}"
    elif worker_visible_uuids is not None:
        if client_uuid is None:
            reason = "the tensor's GPU UUID is unknown, so the worker's GPU cannot be matched"
        else:
            try:
                route_device(client_uuid, worker_visible_uuids)
            except TransportError:
                seen = ", ".join(worker_visible_uuids) or "no GPU"
                reason = (f"the worker cannot see GPU `{parse_gpu_uuid(client_uuid)}` "
                          f"(it sees {seen})")
    if reason is None:
        where = f" on `{parse_gpu_uuid(client_uuid)}`" if client_uuid else ""
        return "cuda_ipc", f"same host, the worker can open this process's handles{where}"
    if requested == "cuda_ipc":
        raise TransportError(f"transport='cuda_ipc' is not possible: {reason}")
    return host, reason


# -- GPU plumbing (lazy) -------------------------------------------------------------------

_CUDA_MEMCPY_HOST_TO_DEVICE = 1
_CUDA_MEMCPY_DEFAULT = 4  # direction inferred from the pointers (unified addressing)


def _cupy() -> Any:
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


def _driver() -> Any:
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
    lib = _driver()
    device = ctypes.c_int()
    _check(lib, lib.cuDeviceGet(ctypes.byref(device), ctypes.c_int(index)), "cuDeviceGet")
    raw = (ctypes.c_ubyte * 16)()
    get_uuid = getattr(lib, "cuDeviceGetUuid_v2", None) or lib.cuDeviceGetUuid
    _check(lib, get_uuid(raw, device), "cuDeviceGetUuid")
    return format_gpu_uuid(bytes(raw))


def visible_gpu_uuids() -> list[str]:
    """UUIDs of the GPUs this process sees, indexed like its CUDA devices."""
    lib = _driver()
    count = ctypes.c_int()
    _check(lib, lib.cuDeviceGetCount(ctypes.byref(count)), "cuDeviceGetCount")
    return [device_uuid(i) for i in range(count.value)]


def _allocation_size(ptr: int) -> int | None:
    """Size of the allocation ``ptr`` starts, or None when the driver cannot tell here."""
    lib = _driver()
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
        _cupy()
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


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# -- worker side ---------------------------------------------------------------------------


class _OpenedHandle:
    """One ``cudaIpcOpenMemHandle`` mapping; closed when the last reference dies."""

    __slots__ = ("ptr", "device_index", "key", "__weakref__")

    def __init__(self, ptr: int, device_index: int, key: tuple[int, bytes]) -> None:
        self.ptr = ptr
        self.device_index = device_index
        self.key = key
        finalizer = weakref.finalize(self, _close_handle, ptr, device_index, key)
        finalizer.atexit = False  # at exit the driver unmaps everything itself


# Reentrant: a handle's finalizer may run (garbage collection) while this thread opens one.
_opened_lock = threading.RLock()
_opened: dict[tuple[int, bytes], weakref.ref[_OpenedHandle]] = {}
open_count = 0
"""How many times this process called cudaIpcOpenMemHandle (a statistic for tests)."""


def _close_handle(ptr: int, device_index: int, key: tuple[int, bytes]) -> None:
    with _opened_lock:
        ref = _opened.get(key)
        if ref is not None and ref() is None:
            del _opened[key]
    try:
        cp = _cupy()
        with cp.cuda.Device(device_index):
            cp.cuda.runtime.ipcCloseMemHandle(ptr)
        log.info("closed a CUDA IPC handle on device %d at %#x", device_index, ptr)
    except Exception as error:  # the context may be gone already; nothing else to do
        log.debug("cudaIpcCloseMemHandle(%#x) failed: %s", ptr, error)


def _open_handle(handle: bytes, device_index: int) -> _OpenedHandle:
    global open_count
    key = (device_index, bytes(handle))
    with _opened_lock:
        ref = _opened.get(key)
        opened = ref() if ref is not None else None
        if opened is not None:
            return opened
        cp = _cupy()
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
        opened = _OpenedHandle(int(ptr), device_index, key)
        _opened[key] = weakref.ref(opened)
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
        cp = _cupy()
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
        with _cupy().cuda.Device(self.device_index):
            return np.asarray(view.get()).view(dtype)

    def write(self, offset: int, array: Any) -> None:
        """Copy ``array`` (a JAX array or numpy array, C-contiguous) to ``offset``; returns
        once the copy has finished (the client may read it as soon as the reply arrives)."""
        nbytes = int(array.nbytes)
        if nbytes == 0:
            return
        validate_cuda_slice(self.size, offset, nbytes, alignment=1)
        cp = _cupy()
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
    cp = _cupy()
    with cp.cuda.Device(index):
        # Explicitly: cupy skips the call when the device looks current, and the driver
        # call below needs the primary context current in this (gRPC) thread.
        cp.cuda.runtime.setDevice(index)
        actual = _allocation_size(opened.ptr)
    if actual is not None and size > actual:
        raise TransportError(
            f"CUDA IPC region registered with {size} bytes, but its allocation holds only "
            f"{actual}; register the size the buffer was allocated with"
        )
    if actual is None:
        log.warning("could not query the size of an opened CUDA IPC allocation; trusting "
                    "the registered size %d", size)
    return CudaIpcMapping(opened, size, uuid)


# -- client side ---------------------------------------------------------------------------


class DeviceBuffer:
    """One exported cudaMalloc allocation of the client (Note [CUDA IPC ownership])."""

    __slots__ = ("ptr", "size", "device_index", "device_uuid", "handle", "_finalizer",
                 "__weakref__")

    def __init__(self, size: int, device_index: int, uuid: str) -> None:
        cp = _cupy()
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
        cp = _cupy()
        with cp.cuda.Device(device_index):
            cp.cuda.runtime.free(ptr)
    except Exception as error:
        log.debug("cudaFree(%#x) failed: %s", ptr, error)


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


class _PoolEntry(FreeList):
    """A registered buffer and its free list (sorted, coalesced ``[offset, size]``)."""

    __slots__ = ("buffer", "region_id", "retired")

    def __init__(self, buffer: DeviceBuffer, region_id: int) -> None:
        super().__init__(buffer.size)
        self.buffer = buffer
        self.region_id = region_id
        self.retired = False


class DeviceSlice:
    """A 256-byte aligned slice of a pooled device buffer: what a ``CudaIpcSlice`` names.

    :meth:`torch_bytes` SHARES memory with the buffer (and with the worker). Give it back
    with :meth:`release`, or let :meth:`torch_bytes` with ``release_when_collected=True``
    give it back when the last tensor viewing it dies.
    """

    kind = "cuda_ipc"

    __slots__ = ("_pool", "_entry", "offset", "nbytes", "_block", "released", "__weakref__")

    def __init__(self, pool: CudaIpcPool, entry: _PoolEntry, offset: int, nbytes: int,
                 block: int) -> None:
        self._pool = pool
        self._entry = entry
        self.offset = offset
        self.nbytes = nbytes
        self._block = block
        self.released = False

    @property
    def region_id(self) -> int:
        return self._entry.region_id

    @property
    def device_uuid(self) -> str:
        return self._entry.buffer.device_uuid

    @property
    def device_index(self) -> int:
        return self._entry.buffer.device_index

    @property
    def ptr(self) -> int:
        """Device address of the slice in this process."""
        return self._entry.buffer.ptr + self.offset

    def fill(self, message: Any) -> None:
        """Write this slice into a ``CudaIpcSlice`` message."""
        message.region_id = self.region_id
        message.offset = self.offset
        message.nbytes = self.nbytes

    def torch_bytes(self, *, release_when_collected: bool = False) -> Any:
        """A ``torch.uint8`` CUDA tensor over exactly the slice's bytes; no copy.

        With ``release_when_collected`` the slice goes back to the pool once that tensor
        and every view of its storage are gone.
        """
        import torch

        if self.released:
            raise TransportError(f"{self!r} was released; its bytes may belong to another "
                                 "allocation")
        keeper = _SliceKeeper(self._entry.buffer)
        if release_when_collected:
            weakref.finalize(keeper, self.release)
        carrier = _CudaBytes(self.ptr, self.nbytes, keeper)
        return torch.as_tensor(carrier, device=torch.device("cuda", self.device_index))

    def release(self) -> None:
        """Give the bytes back to the pool (idempotent; safe from finalizers)."""
        if not self.released:
            self._pool._release(self)

    def __repr__(self) -> str:
        state = ", released" if self.released else ""
        return (f"DeviceSlice(region_id={self.region_id}, offset={self.offset}, "
                f"nbytes={self.nbytes}, device={self.device_uuid}{state})")


class _SliceKeeper:
    """Holds a device buffer alive for tensors viewing one slice of it."""

    __slots__ = ("buffer", "__weakref__")

    def __init__(self, buffer: DeviceBuffer) -> None:
        self.buffer = buffer


RegisterCudaFn = Callable[[DeviceBuffer], int]
"""Registers a new buffer with the worker and returns the ``region_id`` it assigned."""


class CudaIpcPool:
    """Client-side pool of exported device buffers on one GPU, thread-safe.

    Buffers hold ``max(min_region_bytes, request rounded up to 2 MiB)`` bytes, are
    registered with ``register`` once and reused; the pool never grows past
    ``max_total_bytes`` (None: no limit). Releases from finalizers are queued and applied
    at the next allocation, so they never wait for the lock.
    """

    def __init__(
        self,
        register: RegisterCudaFn,
        device_index: int,
        *,
        uuid: str | None = None,
        min_region_bytes: int = 64 << 20,
        max_total_bytes: int | None = None,
    ) -> None:
        min_region_bytes = operator.index(min_region_bytes)
        if min_region_bytes <= 0:
            raise ValueError(f"`min_region_bytes` must be positive, got {min_region_bytes}")
        self._register = register
        self.device_index = operator.index(device_index)
        self.device_uuid = (parse_gpu_uuid(uuid) if uuid is not None
                            else device_uuid(self.device_index))
        self._min_region_bytes = _round_up(min_region_bytes, REGION_GRANULARITY)
        self._max_total_bytes = max_total_bytes
        self._lock = threading.Lock()
        self._grow_lock = threading.Lock()
        self._pending: deque[DeviceSlice] = deque()
        self._entries: dict[int, _PoolEntry] = {}
        self._closed = False

    # -- bookkeeping (under self._lock) ---------------------------------------------------

    def _drain(self) -> None:
        while self._pending:
            piece = self._pending.popleft()
            if piece.released:
                continue
            piece.released = True
            entry = piece._entry
            if not entry.retired:
                entry.give_back(piece.offset, piece._block)

    def _release(self, piece: DeviceSlice) -> None:
        self._pending.append(piece)
        if self._lock.acquire(blocking=False):
            try:
                self._drain()
            finally:
                self._lock.release()

    def _first_fit(self, block: int, nbytes: int) -> DeviceSlice | None:
        for entry in self._entries.values():
            offset = entry.take(block)
            if offset is not None:
                return DeviceSlice(self, entry, offset, nbytes, block)
        return None

    def _check_open(self) -> None:
        if self._closed:
            raise TransportError("the CUDA IPC pool is closed; create a new one")

    # -- API ------------------------------------------------------------------------------

    def allocate(self, nbytes: int) -> DeviceSlice:
        """A slice of at least ``nbytes`` bytes at a 256-byte aligned offset (not zeroed)."""
        nbytes = operator.index(nbytes)
        if nbytes < 0:
            raise ValueError(f"`nbytes` must be >= 0, got {nbytes}")
        block = max(CUDA_ALIGNMENT, _round_up(nbytes, CUDA_ALIGNMENT))
        with self._lock:
            self._check_open()
            self._drain()
            piece = self._first_fit(block, nbytes)
            if piece is not None:
                return piece
        with self._grow_lock:
            with self._lock:
                self._check_open()
                self._drain()
                piece = self._first_fit(block, nbytes)
                if piece is not None:
                    return piece
                size = max(self._min_region_bytes, _round_up(block, REGION_GRANULARITY))
                total = sum(e.buffer.size for e in self._entries.values())
                limit = self._max_total_bytes
                if limit is not None and total + size > limit:
                    size = _round_up(block, REGION_GRANULARITY)
                    if total + size > limit:
                        raise PoolExhaustedError(
                            f"cannot allocate {nbytes} bytes: the CUDA IPC pool would grow "
                            f"past its `max_total_bytes` limit of {limit} bytes ({total} "
                            "bytes held). Drop tensors returned by earlier calls, or raise "
                            "`max_total_bytes`."
                        )
            buffer = DeviceBuffer(size, self.device_index, self.device_uuid)
            try:
                region_id = operator.index(self._register(buffer))
            except BaseException:
                del buffer  # freed by its finalizer: nothing else refers to it
                raise
            with self._lock:
                if self._closed or region_id in self._entries:
                    self._check_open()
                    raise TransportError(
                        f"the worker registered a new CUDA IPC region under id {region_id}, "
                        "which this pool already uses: region ids must be unique"
                    )
                entry = _PoolEntry(buffer, region_id)
                self._entries[region_id] = entry
                offset = entry.take(block)
                assert offset is not None
                return DeviceSlice(self, entry, offset, nbytes, block)

    @property
    def region_ids(self) -> list[int]:
        with self._lock:
            return list(self._entries)

    @property
    def total_bytes(self) -> int:
        with self._lock:
            return sum(e.buffer.size for e in self._entries.values())

    def close(self) -> None:
        """Stop allocating and drop the pool's buffers (idempotent). Buffers that tensors
        still view are freed when the last of those tensors dies."""
        with self._lock:
            self._closed = True
            entries = list(self._entries.values())
            self._entries.clear()
        for entry in entries:
            entry.retired = True

    @property
    def closed(self) -> bool:
        return self._closed

    def __repr__(self) -> str:
        return (f"CudaIpcPool(device={self.device_uuid}, regions={len(self._entries)}, "
                f"closed={self._closed})")


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
        from .._errors import RemoteError

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


def devices_of(tensors: Iterable[Any]) -> list[int]:
    """Distinct CUDA device indices of ``tensors`` (torch tensors), in first-seen order."""
    seen: list[int] = []
    for t in tensors:
        if getattr(t, "is_cuda", False) and t.device.index not in seen:
            seen.append(t.device.index)
    return seen
