"""Worker side of the wire codec: descriptors -> JAX arrays, JAX arrays -> descriptors.

Inputs in shared memory are imported into JAX zero-copy (the slice is 64-byte aligned, so
DLPack import needs no copy); inline inputs are copied once. Outputs are written into the
client's output arena (one copy) or sent inline.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from .. import _pytree, _wire
from .._compat._jax import import_numpy as import_numpy
from .._dtypes import BY_NAME, NARROW
from .._dtypes_jax import NAME_TO_NUMPY, NUMPY_TO_NAME, x64_enabled
from .._errors import InvalidArgumentError, ResourceExhaustedError
from ..proto.v1 import interop_pb2 as pb
from ._session import CUDA_IPC, SHM, Session, WorkerRegion

_NUMPY = NAME_TO_NUMPY
_NUMPY_TO_NAME = NUMPY_TO_NAME
_NARROW = NARROW
_x64 = x64_enabled
REGION_KINDS = (SHM, CUDA_IPC)


class Limits:
    def __init__(self, max_tensor_bytes: int, max_inline_bytes: int) -> None:
        self.max_tensor_bytes = max_tensor_bytes
        self.max_inline_bytes = max_inline_bytes


def decode_tensor(message: Any, session: Session, limits: Limits) -> jax.Array | np.ndarray:
    name = _wire.dtype_name(message.dtype)
    shape = tuple(message.shape)
    nbytes = _wire.tensor_nbytes(name, shape, limit=limits.max_tensor_bytes)
    location = message.WhichOneof("location")
    narrow = _NARROW.get(name)
    if narrow is not None and _x64():
        narrow = None  # x64 on: 64-bit values stay 64-bit
    if location == "inline_data":
        data = message.inline_data
        if len(data) != nbytes:
            raise InvalidArgumentError(
                f"inline tensor of shape {list(shape)} and dtype {name} needs {nbytes} bytes, "
                f"got {len(data)}"
            )
        array = np.frombuffer(data, dtype=_NUMPY[name]).reshape(shape)
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
    view = region.view(where.offset, _NUMPY[name], shape)
    return import_numpy(view) if isinstance(view, np.ndarray) else view


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


def decode_leaves(tree: Any, session: Session,
                  limits: Limits) -> tuple[_pytree.TreeSpec, list[Any]]:
    """A ``Tree`` message as its validated structure and its arrays, in leaf order."""
    spec = _wire.decode_spec(tree.nodes, len(tree.leaves))
    return spec, [decode_tensor(leaf, session, limits) for leaf in tree.leaves]


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
        nbytes = int(np.prod(leaf.shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
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
        _wire.encode_spec(spec, out.nodes)
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
        nbytes = int(np.prod(leaf.shape, dtype=np.int64)) * dtype.itemsize
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


def signature_key(request_args: Any, request_kwargs: Any, extra: Any) -> Any:
    """Hashable key of a call's input signature, straight from the request messages."""
    return (
        tuple((n.kind, n.num_children, tuple(n.keys)) for n in request_args.nodes),
        tuple((n.kind, n.num_children, tuple(n.keys)) for n in request_kwargs.nodes),
        tuple((t.dtype, tuple(t.shape)) for t in request_args.leaves),
        tuple((t.dtype, tuple(t.shape)) for t in request_kwargs.leaves),
        extra,
    )


__all__ = ["Limits", "OutputWriter", "decode_leaves", "flatten_outputs", "pb", "required_bytes"]
