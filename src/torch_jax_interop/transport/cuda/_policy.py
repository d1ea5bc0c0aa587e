"""CUDA IPC policy: what ``transport="auto"`` does, GPU identity, descriptor checks.

Pure logic, no GPU, cupy, torch or jax needed: tested everywhere. See Note [CUDA IPC
ownership] in ``transport/cuda/__init__.py``.
"""

from __future__ import annotations

import operator
import os
import re
from collections.abc import Sequence

from ..._errors import SliceOutOfBoundsError, TransportError
from ..._names import TRANSPORTS as TRANSPORTS, check_transport
from .._slices import check_slice

CUDA_ALIGNMENT = 256
"""Byte alignment of every CUDA IPC slice (cudaMalloc's own alignment)."""

_UUID_RE = re.compile(
    r"(?:(GPU|MIG)-)?([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})",
    re.IGNORECASE,
)

# -- descriptors ---------------------------------------------------------------


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


# -- GPU identity ---------------------------------------------------------------


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


# -- environment ---------------------------------------------------------------


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
    check_transport(requested)
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

