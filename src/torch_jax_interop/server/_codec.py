"""Worker side of the wire codec: descriptors -> JAX arrays, JAX arrays -> descriptors.

Inputs in shared memory are imported into JAX zero-copy (the slice is 64-byte aligned, so
DLPack import needs no copy); inline inputs are copied once. Outputs are written into the
client's output arena (one copy) or sent inline.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .. import _pytree, _wire
from .._compat._jax import import_numpy as import_numpy
from .._dtypes import BY_NAME, NARROW
from .._dtypes_jax import NAME_TO_NUMPY, NUMPY_TO_NAME, x64_enabled
from .._errors import InvalidArgumentError, ResourceExhaustedError
from .._names import DEFAULT_MAX_LEAVES
from ..proto.v1 import interop_pb2 as pb
from ._session import CUDA_IPC, SHM, Session, WorkerRegion

_NUMPY = NAME_TO_NUMPY
_NUMPY_TO_NAME = NUMPY_TO_NAME
_NARROW = NARROW
_x64 = x64_enabled
REGION_KINDS = (SHM, CUDA_IPC)


class Limits:
    """Per-request bounds of the worker (``WorkerConfig``; the CLI flags are named in the
    errors)."""

    def __init__(self, max_tensor_bytes: int, max_inline_bytes: int,
                 max_leaves: int = DEFAULT_MAX_LEAVES) -> None:
        self.max_tensor_bytes = max_tensor_bytes
        self.max_inline_bytes = max_inline_bytes
        self.max_leaves = max_leaves

    def check_leaves(self, count: int, what: str) -> None:
        """RESOURCE_EXHAUSTED when a request carries more than ``max_leaves`` tensors:
        checked before anything is decoded or compiled (each leaf costs tracing time and
        compiled-program memory)."""
        if count > self.max_leaves:
            raise ResourceExhaustedError(
                f"{what} carries {count} tensors, more than the worker's limit of "
                f"{self.max_leaves} per request (--max-leaves); pack small tensors into "
                "larger ones, or raise --max-leaves"
            )


class InlineBudget:
    """Inline bytes of one request, counted as its tensors are decoded: RESOURCE_EXHAUSTED
    past ``--max-inline-bytes`` (the sum over the request, not per tensor)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, nbytes: int) -> None:
        self.used += nbytes
        if self.used > self.limit:
            raise ResourceExhaustedError(
                f"the request carries more than {self.limit} bytes of inline tensors "
                "(--max-inline-bytes, counted over the whole request); use the "
                "shared-memory transport (same host) for large tensors, or raise the limit"
            )


def decode_tensor(message: Any, session: Session, limits: Limits,
                  budget: InlineBudget | None = None,
                  signature: list[Any] | None = None) -> jax.Array | np.ndarray:
    """One ``Tensor`` message as an array (validated); ``signature`` (if given) gets the
    tensor's ``(dtype, shape)`` appended."""
    name = _wire.dtype_name(message.dtype)
    shape = tuple(message.shape)
    if signature is not None:
        signature.append((message.dtype, shape))
    nbytes = _wire.tensor_nbytes(name, shape, limit=limits.max_tensor_bytes)
    location = message.WhichOneof("location")
    narrow = _NARROW.get(name)
    if narrow is not None and _x64():
        narrow = None  # x64 on: 64-bit values stay 64-bit
    if location == "inline_data":
        data = message.inline_data
        if budget is not None:
            budget.take(len(data))
        if len(data) != nbytes:
            raise InvalidArgumentError(
                f"inline tensor of shape {list(shape)} and dtype {name} needs {nbytes} bytes, "
                f"got {len(data)}"
            )
        array = np.frombuffer(data, dtype=_NUMPY[name]).reshape(shape)
        if name == "bool":
            return _normalised_bool(array)
        # jit takes the (read-only) numpy array as it is, faster than jnp.array.
        return array if narrow is None else _narrowed(array, name, narrow)
    if location not in REGION_KINDS:
        raise InvalidArgumentError("tensor has no location (shm, cuda_ipc or inline_data)")
    # A slice of a registered region (Note [Worker regions]): either kind, one path.
    where = getattr(message, location)
    region = session.region(location, where)
    if where.nbytes != nbytes:
        raise InvalidArgumentError(
            f"slice holds {where.nbytes} bytes but shape {list(shape)} x {name} needs "
            f"{nbytes}"
        )
    region.check(where)
    if narrow is not None:
        # Policy path (64-bit values, x64 off): a range-checked copy on the host.
        return _narrowed(region.host(where.offset, _NUMPY[name], shape), name, narrow)
    if name == "bool" and location == CUDA_IPC:
        # Note [Bool bytes]: on the device, normalising costs one elementwise op.
        return jnp.not_equal(region.view(where.offset, np.dtype(np.uint8), shape), 0)
    view = region.view(where.offset, _NUMPY[name], shape)
    if name == "bool":
        view = _normalised_bool(view)
    return import_numpy(view) if isinstance(view, np.ndarray) else view


def _normalised_bool(array: np.ndarray) -> np.ndarray:
    """Note [Bool bytes]
    ====================

    A bool tensor is one byte per element, and nothing stops a peer from sending bytes other
    than 0 and 1 (torch and numpy store whatever bytes they are given). XLA assumes 0 or 1:
    ``True + 1`` would compute 3, ``x == True`` would be false for a byte of 2. The worker
    therefore reads every bool input as ``byte != 0``, on every path: inline and shared
    memory (one pass over the bytes to check, ~0.3 ms per 16 MiB; a copy only when some byte
    is neither 0 nor 1, so a well-formed zero-copy input stays zero-copy) and CUDA IPC (one
    elementwise op on the device). Library mode does not check (zero-copy DLPack; see
    docs/library.md)."""
    raw = array.view(np.uint8)
    if raw.size and int(raw.max()) > 1:
        return np.not_equal(raw, 0)
    return array


def _narrowed(array: np.ndarray, name: str, narrow: str) -> np.ndarray:
    """Policy of Note [64-bit values with x64 off]: range-checked 32-bit copy."""
    if BY_NAME[name].kind in "iu" and array.size:
        info = np.iinfo(_NUMPY[narrow])
        low, high = int(array.min()), int(array.max())
        if low < info.min or high > info.max:
            raise InvalidArgumentError(
                f"{name} value {low if low < info.min else high} does not fit {narrow}, and "
                "this worker runs with JAX's x64 mode off. Start the worker with "
                "JAX_ENABLE_X64=1, or cast on the client."
            )
    return array.astype(_NUMPY[narrow])


def decode_leaves(tree: Any, session: Session, limits: Limits,
                  budget: InlineBudget | None = None,
                  signature: list[Any] | None = None) -> tuple[_pytree.TreeSpec, list[Any]]:
    """A ``Tree`` message as its validated structure and its arrays, in leaf order.
    ``budget`` counts inline bytes across the trees of one request (a fresh one if None);
    ``signature`` (if given) gets each leaf's ``(dtype, shape)`` appended: with the
    structures, the key of the call's compiled program."""
    limits.check_leaves(len(tree.leaves), "the request")
    spec = _wire.decode_spec(tree.nodes, len(tree.leaves))
    if budget is None:
        budget = InlineBudget(limits.max_inline_bytes)
    return spec, [decode_tensor(leaf, session, limits, budget, signature)
                  for leaf in tree.leaves]


def _is_array(value: Any) -> bool:
    return isinstance(value, (jax.Array, np.ndarray))


def flatten_outputs(value: Any) -> tuple[list[Any], _pytree.TreeSpec]:
    """Outputs of a JAX function as (leaves, spec); leaves are arrays or None."""
    leaves, spec = _pytree.flatten(value, is_leaf=_is_array)
    for leaf in leaves:
        if not _is_array(leaf):
            raise InvalidArgumentError(
                f"the function returned a {type(leaf).__name__} leaf; served functions must "
                "return pytrees (tuples, lists, dicts with str keys) of arrays"
            )
    return leaves, spec


def required_bytes(shapes: Any, max_inline: int) -> int:
    """Arena bytes the outputs ``shapes`` (ShapeDtypeStructs) need beyond the inline ones."""
    leaves = jax.tree_util.tree_leaves(shapes)
    total = 0
    for leaf in leaves:
        nbytes = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
        if nbytes > max_inline:
            total += _wire.align(nbytes)
    return total


class OutputWriter:
    """Places output arrays into the client's arena (large) or inline (small).

    The arena is a slice of a region of either kind (Note [Worker regions]): shared memory
    or a device buffer, written by one path. Each output's descriptor is the arena's with
    its own offset and size.
    """

    def __init__(self, arena: Any, session: Session, inline_threshold: int, limits: Limits):
        self.inline_threshold = inline_threshold
        self.limits = limits
        self.session = session
        self.region: WorkerRegion | None = None
        self.kind = ""
        self.arena: Any = None  # the arena's descriptor
        self.capacity = 0
        self.used = 0
        if arena is not None:
            self.kind = arena.WhichOneof("location")
            if self.kind is None:
                raise InvalidArgumentError("output arena has no location (shm or cuda_ipc)")
            self.arena = getattr(arena, self.kind)
            self.region = session.region(self.kind, self.arena)
            self.region.check(self.arena, "output arena: ")
            self.capacity = self.arena.nbytes

    def write_tree(self, leaves: list[Any], spec: _pytree.TreeSpec, out: Any) -> None:
        _wire.encode_tree_spec(spec, out)
        for leaf in leaves:
            self.write(leaf, out.leaves.add())

    def write(self, leaf: Any, message: Any) -> None:
        """A large output is copied into the arena (device to device for a device arena,
        no trip through host memory); a small one travels inline."""
        dtype = np.dtype(leaf.dtype)
        name = _NUMPY_TO_NAME.get(dtype)
        if name is None:
            raise InvalidArgumentError(
                f"the function returned dtype {dtype}, which torch cannot receive; "
                "cast it in the function"
            )
        message.dtype = _wire.DTYPE_TO_ENUM[name]
        message.shape.extend(leaf.shape)
        nbytes = math.prod(leaf.shape) * dtype.itemsize
        if self.region is not None and nbytes > self.inline_threshold:
            offset = _wire.align(self.used)
            if offset + nbytes > self.capacity:
                raise ResourceExhaustedError(
                    f"output arena of {self.capacity} bytes is too small (the client sized it "
                    "from an earlier call with other shapes); retry"
                )
            self.used = offset + nbytes
            with self.session.writing(self.region, self.arena) as region:
                region.write(self.arena.offset + offset, leaf)
            where = getattr(message, self.kind)
            where.CopyFrom(self.arena)
            where.offset = self.arena.offset + offset
            where.nbytes = nbytes
            return
        if nbytes > self.limits.max_inline_bytes:
            raise ResourceExhaustedError(
                f"an output of {nbytes} bytes exceeds the inline limit of "
                f"{self.limits.max_inline_bytes} bytes (--max-inline-bytes); use the "
                "shared-memory transport (same host) for large tensors"
            )
        message.inline_data = np.ascontiguousarray(leaf).tobytes()


__all__ = ["InlineBudget", "Limits", "OutputWriter", "decode_leaves", "flatten_outputs", "pb",
           "required_bytes"]
