"""Client side of the wire codec: torch tensors -> descriptors, descriptors -> torch tensors.

Inputs larger than the inline threshold are copied once into a slice of the client's
shared-memory pool (the worker then reads them in place). Outputs the worker wrote into the
client's output arena come back as tensors that *share* that memory: the arena slice returns
to the pool when the last of those tensors is garbage-collected, so no copy is made.
"""

from __future__ import annotations

import bisect
import ctypes
from typing import Any

import numpy as np
import torch

from .. import _pytree, _wire
from .._dtypes import DTYPE_NAMES
from .._dtypes_torch import NAME_TO_TORCH as NAME_TO_TORCH, TORCH_TO_NAME as TORCH_TO_NAME
from .._errors import InvalidArgumentError, MalformedReplyError, ResourceExhaustedError
from ..transport import fill_descriptor

_MAX_OUTPUT_BYTES = 1 << 62
"""No output is refused for its size alone (the arena and inline limits bound it); only
shapes whose byte size cannot exist are."""


def wire_specs(call: Any, name: str) -> tuple[_pytree.TreeSpec, _pytree.TreeSpec]:
    """The ``args`` and ``kwargs`` structures of a call plan (``_call.Call``) as sent, with
    leaves in the order of the call's tensors (parameters first).

    Parameters that the wire cannot describe (registered nodes, dataclasses, constants such
    as an Equinox module's functions) travel as the flat list of their tensors: Note
    [Registered pytree nodes in service mode] in ``server/_compiled.py``.
    """
    inputs = call.inputs
    if inputs.constants:
        position, value = inputs.constants[0]
        raise TypeError(
            f"arguments of `{name}`: leaf {position} is a {type(value).__name__}; remote "
            "functions take pytrees of tensors (wrap numbers with torch.tensor(...))"
        )
    args_spec, kwargs_spec = inputs.spec.children
    params = call.params
    if params is None:
        return args_spec, kwargs_spec
    if params.constants or not _wire.describable(params.spec):
        params_spec = _pytree.TreeSpec(_pytree.LIST, (_pytree.LEAF_SPEC,) * params.num_slots,
                                       None, params.num_slots)
    else:
        params_spec = params.spec
    children = (params_spec, *args_spec.children)
    return (_pytree.TreeSpec(_pytree.TUPLE, children, None,
                             params_spec.num_leaves + args_spec.num_leaves), kwargs_spec)


def prepare(t: torch.Tensor, *, keep_device: bool = False) -> torch.Tensor:
    """A detached, dense, CPU (or, with ``keep_device``, same-device), C-contiguous tensor
    with no conj/neg bit, ready to ship."""
    if t.dtype not in TORCH_TO_NAME:
        raise TypeError(f"dtype `{t.dtype}` cannot be sent; supported: {', '.join(DTYPE_NAMES)}")
    if t.layout is not torch.strided:
        raise TypeError(f"cannot send a tensor with layout `{t.layout}`; call .to_dense()")
    if t.requires_grad:  # each step only where needed: the hot path is a plain tensor
        t = t.detach()
    if not t.is_cpu and not keep_device:
        t = t.cpu()  # the host path for CUDA tensors (no CUDA IPC with this worker)
    if t.is_conj() or t.is_neg():
        t = t.resolve_conj().resolve_neg()
    return t if t.is_contiguous() else t.contiguous()


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The bytes of a contiguous CPU tensor (one copy).

    Not through ``t.numpy()``: that marks the tensor's storage as not resizable for good,
    and FSDP2 (``fully_shard``) frees an unsharded parameter after forward by resizing its
    storage to 0, so a parameter sent inline once would make every later step fail.
    """
    if t.numel() == 0:
        return b""
    return ctypes.string_at(t.data_ptr(), t.numel() * t.element_size())


# Note [Tensors born in shared memory]
# ====================================
# ``Worker.empty`` hands out torch tensors whose storage is a slice of the session's
# shared-memory pool (Note [Shared memory ownership] in transport/_shm.py: this process
# creates and owns every region, the worker maps each one once at registration).
#
# * Who creates: ``Worker.empty`` allocates a slice and views it as a tensor; the slice is
#   released (back to the pool) by a finalizer when the last array or tensor over it dies
#   (``RegionSlice.release_when_collected``).
# * Who maps: the worker, already: the region is registered. ``Encoder._in_pool`` finds a
#   contiguous input lying in an open region of the pool at a 64-byte aligned offset and
#   sends that region, offset and length as the tensor's descriptor: no copy. Anything else
#   (an unaligned or strided view, memory of a region the pool has dropped) is copied as
#   before, so a wrong guess costs a copy, never a wrong result.
# * Who frees, and when: the worker holds the bytes only during the call, or in the
#   residuals of a forward until its backward or release. For that long the encoder (then
#   the ``ResidualHandle``) holds a ``PooledInput``, which keeps the tensor alive, and with
#   it the slice. The tensor's version counter is noted: a backward after an in-place
#   change raises instead of differentiating the changed values. At session end the pool
#   unmaps its regions here only once no tensor views them (``SharedMemoryRegion.close``).
# * Outputs: they land in the client's arena, slices of the same pool, so an output fed to
#   the next call is found by ``_in_pool`` too.


class PooledInput:
    """Note [Tensors born in shared memory]: an input the worker reads in place, where it
    lies in the session's pool. Held like a pool slice (an encoder lease, then the residual
    handle's) so that the tensor, and with it its slice, lives while the worker may read it;
    :meth:`check_unchanged` refuses a backward after the tensor was modified in place, since
    the worker's residuals may view its bytes."""

    __slots__ = ("tensor", "version")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor: torch.Tensor | None = tensor
        self.version = tensor._version

    def check_unchanged(self) -> None:
        if self.tensor is not None and self.tensor._version != self.version:
            raise InvalidArgumentError(
                "an input of this forward lives in the worker's shared memory (worker.empty) "
                "and was modified in place after the forward; the worker's saved values "
                "view its bytes, so the gradient would be wrong. Modify a copy, or run the "
                "forward again after the change")

    def release(self) -> None:
        self.tensor = None


class Encoder:
    """Fills ``Tree`` messages; large tensors go to pool slices kept in ``leases``."""

    def __init__(self, pool: Any, inline_threshold: int, max_inline_bytes: int, *,
                 cuda: Any = None) -> None:
        self.pool = pool
        self.inline_threshold = inline_threshold
        self.max_inline_bytes = max_inline_bytes
        self.leases: list[Any] = []
        self.inline_bytes = 0
        self.shm_bytes = 0
        self.zero_copy_bytes = 0  # inputs already in the pool, sent as they are
        # CUDA IPC (transport/cuda): the session's CudaIpcChannel, or None.
        self.cuda = cuda
        self.cuda_ipc_bytes = 0
        self.cuda_pool: Any = None  # pool of the first CUDA IPC input: the output arena's
        self.device: torch.device | None = None  # first CUDA input's device: outputs go there
        self._unsynced: list[torch.device] = []

    def tree(self, leaves: list[torch.Tensor], spec: _pytree.TreeSpec, out: Any) -> int:
        """Encode; returns the bytes placed in shared memory."""
        _wire.encode_tree_spec(spec, out)
        placed = sum(self.tensor(leaf, out.leaves.add()) for leaf in leaves)
        # Stream ordering (Note [CUDA IPC ownership]): copies done before the request leaves.
        for device in self._unsynced:
            torch.cuda.current_stream(device).synchronize()
        self._unsynced.clear()
        return placed

    def tensor(self, t: torch.Tensor, message: Any) -> int:
        if t.is_cuda:
            if self.device is None:
                self.device = t.device
            pool = self.cuda.pool_for(t.device.index) if self.cuda is not None else None
            if pool is not None:
                return self._cuda_tensor(t, pool, message)
        t = prepare(t)
        message.dtype = _wire.DTYPE_TO_ENUM[TORCH_TO_NAME[t.dtype]]
        message.shape.extend(t.shape)
        nbytes = t.numel() * t.element_size()
        if self.pool is not None and nbytes and self._in_pool(t, nbytes, message):
            return 0
        if self.pool is None or nbytes <= self.inline_threshold:
            if nbytes > self.max_inline_bytes:
                raise ResourceExhaustedError(
                    f"a tensor of {nbytes} bytes exceeds the inline limit of "
                    f"{self.max_inline_bytes} bytes; use transport='shm' (same host) or "
                    "raise the worker's --max-inline-bytes"
                )
            message.inline_data = tensor_bytes(t)
            self.inline_bytes += nbytes
            return 0
        lease = self.pool.allocate(nbytes)
        self.leases.append(lease)
        target = torch.from_numpy(lease.numpy(np.uint8, (nbytes,)))
        target.copy_(t.reshape(-1).view(torch.uint8))
        lease.fill(message.shm)
        self.shm_bytes += nbytes
        return nbytes

    def _in_pool(self, t: torch.Tensor, nbytes: int, message: Any) -> bool:
        """Note [Tensors born in shared memory]: a tensor already in one of the session's
        regions (``Worker.empty``, or an earlier call's output) travels as its descriptor:
        no copy. It stays pinned (alive, its version noted) while the worker may read it."""
        located = self.pool.locate(t.data_ptr(), nbytes)
        if located is None:
            return False
        fill_descriptor(message.shm, located[0], located[1], nbytes)
        self.leases.append(PooledInput(t))
        self.zero_copy_bytes += nbytes
        return True

    def _cuda_tensor(self, t: torch.Tensor, pool: Any, message: Any) -> int:
        """One device-to-device copy into an exported slice; the worker reads it in place."""
        t = prepare(t, keep_device=True)
        message.dtype = _wire.DTYPE_TO_ENUM[TORCH_TO_NAME[t.dtype]]
        message.shape.extend(t.shape)
        nbytes = t.numel() * t.element_size()
        if nbytes == 0:
            message.inline_data = b""
            return 0
        lease = pool.allocate(nbytes)
        self.leases.append(lease)
        lease.torch_bytes().copy_(t.reshape(-1).view(torch.uint8))
        lease.fill(message.cuda_ipc)
        if self.cuda_pool is None:
            self.cuda_pool = pool
        if t.device not in self._unsynced:
            self._unsynced.append(t.device)
        self.cuda_ipc_bytes += nbytes
        return 0

    def release(self) -> None:
        for lease in self.leases:
            lease.release()
        self.leases.clear()


class Decoder:
    """Reads ``Tree`` messages from the worker; arena tensors share the arena's memory.

    Every reply is checked before use: a reply that breaks the protocol (unknown dtype, bad
    shape, wrong size, a location outside the arena, two outputs on the same bytes) raises
    ``MalformedReplyError`` naming what was wrong, never a raw torch or Python error."""

    def __init__(self, arena: Any = None, device: torch.device | None = None) -> None:
        self.arena = arena
        self._base: torch.Tensor | None = None
        self._taken: list[tuple[int, int]] = []  # arena byte ranges of the outputs so far
        # Calls with CUDA inputs get their outputs on that device (a copy unless CUDA IPC).
        self.device = device if device is not None and device.type == "cuda" else None

    def _placed(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.device is None else t.to(self.device)

    def tree(self, message: Any) -> Any:
        if not message.nodes:
            return None
        spec, leaves = self.leaves(message)
        return spec.unflatten(leaves)

    def leaves(self, message: Any) -> tuple[_pytree.TreeSpec, list[torch.Tensor]]:
        """The structure and the tensors of a ``Tree`` message."""
        try:
            spec = _wire.decode_spec(message.nodes, len(message.leaves))
        except (InvalidArgumentError, ResourceExhaustedError) as error:
            raise MalformedReplyError(
                f"the worker sent a malformed output structure: {error}") from None
        return spec, [self.tensor(leaf, i) for i, leaf in enumerate(message.leaves)]

    def gradients(self, message: Any, sent: _pytree.TreeSpec) -> list[torch.Tensor | None]:
        """One gradient per leaf of ``sent`` (the structure of the inputs): the worker
        answers with that structure, ``None`` where an input has no gradient."""
        out: list[torch.Tensor | None] = []
        _leaves_like(sent, self.tree(message), out)
        return out

    def tensor(self, message: Any, index: int = 0) -> torch.Tensor:
        what = f"output {index}"
        try:
            name = _wire.dtype_name(message.dtype)
            dtype = NAME_TO_TORCH[name]
            shape = tuple(message.shape)
            nbytes = _wire.tensor_nbytes(name, shape, limit=_MAX_OUTPUT_BYTES)
        except (InvalidArgumentError, ResourceExhaustedError, KeyError) as error:
            raise MalformedReplyError(
                f"the worker sent a malformed {what} (dtype {message.dtype}, shape "
                f"{list(message.shape)[:8]}): {error}") from None
        location = message.WhichOneof("location")
        if nbytes == 0:
            if location == "inline_data" and message.inline_data:
                raise MalformedReplyError(
                    f"the worker sent {len(message.inline_data)} bytes for the empty {what}")
            return self._placed(torch.empty(shape, dtype=dtype))
        if location == "inline_data":
            if len(message.inline_data) != nbytes:
                raise MalformedReplyError(
                    f"the worker sent {len(message.inline_data)} inline bytes for {what} of "
                    f"shape {list(shape)} and dtype {name}, which needs {nbytes}")
            # nbytes is a whole number of elements (checked above): no byte view needed
            raw = torch.frombuffer(bytearray(message.inline_data), dtype=dtype)
            return self._placed(raw if len(shape) == 1 else raw.reshape(shape))
        arena = self.arena
        if arena is not None and location == arena.kind:
            # The worker wrote it into the output arena: the same descriptor as the arena's
            # (its region) with the output's own offset and size.
            where = getattr(message, location)
            expected = type(where)()
            arena.fill(expected)
            expected.offset, expected.nbytes = where.offset, nbytes
            start = where.offset - arena.offset
            if where != expected or start < 0 or start + nbytes > arena.nbytes:
                raise MalformedReplyError(
                    f"the worker pointed {what} outside the output arena (offset "
                    f"{where.offset}, {where.nbytes} bytes; arena: offset {arena.offset}, "
                    f"{arena.nbytes} bytes, {nbytes} bytes needed)")
            self._take(start, start + nbytes, what)
            return self._placed(
                self._arena_tensor()[start:start + nbytes].view(dtype).reshape(shape))
        raise MalformedReplyError(
            f"the worker sent {what} with location `{location}`; expected inline bytes"
            + (f" or `{arena.kind}` in the output arena" if arena is not None else
               " (this call gave it no output arena)"))

    def _take(self, start: int, end: int, what: str) -> None:
        """Refuse outputs on the same arena bytes: writing one would change the other."""
        at = bisect.bisect_left(self._taken, (start, end))
        if ((at > 0 and self._taken[at - 1][1] > start)
                or (at < len(self._taken) and self._taken[at][0] < end)):
            raise MalformedReplyError(
                f"the worker placed {what} on arena bytes [{start}, {end}) that another "
                "output of the same reply also uses; outputs must not overlap")
        self._taken.insert(at, (start, end))

    def _arena_tensor(self) -> torch.Tensor:
        if self._base is None and self.arena.kind == "cuda_ipc":
            # A CUDA view of the device slot; the slot is reused once the last output dies.
            self._base = self.arena.torch_bytes(release_when_collected=True)
        if self._base is None:
            array = self.arena.numpy(np.uint8, (self.arena.nbytes,))
            # Every output is a torch view of one storage, and that storage keeps `array`
            # alive: the slice goes back to the pool only once the last output is gone.
            # (Slicing `array` in numpy would not do: a numpy view's base skips to the
            # buffer's owner, so `array` could die while outputs still read the slice.)
            self.arena.release_when_collected(array)
            self._base = torch.from_numpy(array)
        return self._base

    def abandon(self) -> None:
        """The call failed: no output of it is returned, so the arena goes back now (a
        tensor decoded before the failure keeps its bytes alive until it is collected)."""
        self.finish()

    def finish(self) -> None:
        """Give the arena back now if no output landed in it."""
        if self.arena is not None and self._base is None:
            self.arena.release()
        self._base = None


def _leaves_like(spec: _pytree.TreeSpec, tree: Any, out: list[Any]) -> None:
    kind = spec.kind
    if kind == _pytree.LEAF:
        out.append(tree if isinstance(tree, torch.Tensor) else None)
    elif tree is None:
        out.extend([None] * spec.num_leaves)
    elif kind != _pytree.NONE:
        if kind == _pytree.DICT:
            if not isinstance(tree, dict):
                raise MalformedReplyError("the worker sent gradients of another structure "
                                          "than the inputs'")
            children = [tree.get(key) for key in spec.meta[0]]
        else:
            if not isinstance(tree, (list, tuple)):
                raise MalformedReplyError("the worker sent gradients of another structure "
                                          "than the inputs'")
            children = list(tree)
        if len(children) != len(spec.children):
            raise MalformedReplyError("the worker sent gradients of another structure than "
                                      "the inputs'")
        for child_spec, child in zip(spec.children, children, strict=True):
            _leaves_like(child_spec, child, out)


def align_grads(layout: list[tuple[torch.dtype, torch.device, torch.Size]],
                grads: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """Gradients in the inputs' dtypes and devices: a worker with x64 off computes 64-bit
    inputs in 32 bits, and autograd wants the input's dtype back. A gradient of another
    shape than its input is a malformed reply."""
    out: list[torch.Tensor | None] = []
    for i, ((dtype, device, shape), grad) in enumerate(zip(layout, grads, strict=True)):
        if grad is not None and grad.shape != shape:
            raise MalformedReplyError(
                f"the worker sent a gradient of shape {list(grad.shape)} for input {i} of "
                f"shape {list(shape)}")
        if grad is not None and (grad.dtype != dtype or grad.device != device):
            grad = grad.to(device=device, dtype=dtype)
        out.append(grad)
    return out


def arena_bytes(leaves: list[torch.Tensor], inline_threshold: int) -> int:
    """Arena bytes needed to receive tensors like ``leaves`` (gradients of the inputs)."""
    total = 0
    for t in leaves:
        nbytes = t.numel() * t.element_size()
        if nbytes > inline_threshold:
            total += _wire.align(nbytes)
    return total
