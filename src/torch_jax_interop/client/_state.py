"""What a connection keeps between calls: its session, transfer counts, residual handles."""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from ..transport import SharedMemoryPool
from ._codec import Encoder, arena_bytes

INLINE_THRESHOLD = 64 << 10  # smaller tensors travel inline: one RPC, no pool bookkeeping


@dataclass
class TransferStats:
    """Bytes this connection sent to the worker, by how they travelled."""

    calls: int = 0
    shared_memory_bytes: int = 0
    inline_bytes: int = 0
    cuda_ipc_bytes: int = 0
    zero_copy_bytes: int = 0
    """Input bytes that already lay in the session's pool (``Worker.empty``): not copied."""

    def add(self, encoder: Encoder) -> None:
        self.calls += 1
        self.zero_copy_bytes += encoder.zero_copy_bytes
        self.shared_memory_bytes += encoder.shm_bytes
        self.inline_bytes += encoder.inline_bytes
        self.cuda_ipc_bytes += encoder.cuda_ipc_bytes

    def __str__(self) -> str:
        cuda = (f", {self.cuda_ipc_bytes / 1e6:.1f} MB through CUDA IPC"
                if self.cuda_ipc_bytes else "")
        return (f"{self.calls} calls, {self.shared_memory_bytes / 1e6:.1f} MB through shared "
                f"memory, {self.inline_bytes / 1e6:.1f} MB inline{cuda}")


@dataclass
class _Session:
    id: str
    stream: Any
    pool: SharedMemoryPool | None
    max_inline_bytes: int
    alive: threading.Event
    transport: str
    cuda: Any = None  # a CudaIpcChannel for transport "auto" / "cuda_ipc"
    # Arena slices of calls that ran past their deadline: Note [Arena slices after a deadline]
    # (a deque: threads append and drain it at once, each slice released once)
    quarantined: deque[Any] = field(default_factory=deque)
    # The same-host DataPlaneConnection (client/_data_plane.py), or None: calls use gRPC, for
    # the reason in data_plane_reason (Note [Same-host data plane] in transport/).
    data_plane: Any = None
    data_plane_reason: str = ""
    # The worker's offer and pid, kept to connect again after a deadline closed the data
    # plane; then the Reconnect (client/_data_plane.py) that says when.
    data_plane_offer: Any = None
    data_plane_retry: Any = None


@dataclass(frozen=True)
class TransportInfo:
    """How a connection's calls travel (``Worker.transport_info``)."""

    calls: str
    """``"unix socket"`` (the same-host data plane) or ``"grpc"``."""
    tensors: str
    """``"shared memory"`` or ``"inline"``: where tensor bytes go (CUDA IPC per GPU aside)."""
    reason: str
    """Why calls take that path (empty on the data plane)."""


class ResidualHandle:
    """Residuals the worker keeps for one forward; owns the input slices they may alias.

    Keeps what backward needs to shape the gradients (the structures sent, each input's
    dtype and device), never the input tensors themselves."""

    def __init__(self, session: _Session, residual_id: int, leases: list[Any],
                 out_spec: Any, in_specs: tuple[Any, Any], inputs: list[torch.Tensor]) -> None:
        self.session = session
        self.residual_id = residual_id
        self.leases = leases
        self.out_spec = out_spec
        self.in_specs = in_specs
        self.layout = [(t.dtype, t.device, t.shape) for t in inputs]
        self.grad_bytes = arena_bytes(inputs, INLINE_THRESHOLD)
        self.done = False

    def check_inputs_unchanged(self) -> None:
        """Raise if an input the worker read in place was modified since the forward."""
        for lease in self.leases:
            check = getattr(lease, "check_unchanged", None)
            if check is not None:
                check()

    def drop_leases(self) -> None:
        for lease in self.leases:
            lease.release()
        self.leases = []
