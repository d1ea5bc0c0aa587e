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
from ..transport import _cuda_ipc, check_slice, numpy_view
from ._session import Session

_NUMPY = NAME_TO_NUMPY
_NUMPY_TO_NAME = NUMPY_TO_NAME
_x64 = x64_enabled


class Limits:
    def __init__(self, max_tensor_bytes: int, max_inline_bytes: int) -> None:
        self.max_tensor_bytes = max_tensor_bytes
        self.max_inline_bytes = max_inline_bytes


def decode_tensor(message: Any, session: Session, limits: Limits) -> jax.Array | np.ndarray:
    name = _wire.dtype_name(message.dtype)
    shape = tuple(message.shape)
    nbytes = _wire.tensor_nbytes(name, shape, limit=limits.max_tensor_bytes)
    location = message.WhichOneof("location")
    if location == "inline_data":
        data = message.inline_data
        if len(data) != nbytes:
            raise InvalidArgumentError(
                f"inline tensor of shape {list(shape)} and dtype {name} needs {nbytes} bytes, "
                f"got {len(data)}"
            )
        array = np.frombuffer(data, dtype=_NUMPY[name]).reshape(shape)
    elif location == "shm":
        where = message.shm
        region = session.region(where.region_id, where.generation)
        if where.nbytes != nbytes:
            raise InvalidArgumentError(
                f"slice holds {where.nbytes} bytes but shape {list(shape)} x {name} needs "
                f"{nbytes}"
            )
        try:
            check_slice(region.size, where.offset, where.nbytes)
        except ValueError as error:
            raise InvalidArgumentError(str(error)) from None
        array = numpy_view(region.buffer, where.offset, _NUMPY[name], shape)
    elif location == "cuda_ipc":
        return _decode_cuda(message.cuda_ipc, name, shape, nbytes, session)
    else:
        raise InvalidArgumentError("tensor has no location (shm, cuda_ipc or inline_data)")
    narrow = NARROW.get(name)
    if narrow is not None and not _x64():
        return _narrowed(array, name, narrow)
    # Inline bytes: jit takes the (read-only) numpy array as it is, faster than jnp.array.
    return import_numpy(array) if location == "shm" else array


def _decode_cuda(where: Any, name: str, shape: tuple[int, ...], nbytes: int,
                 session: Session) -> Any:
    """A JAX array viewing a slice of the client's device memory (no copy), validated:
    a CUDA IPC region of this session, its generation, its GPU, bounds and alignment."""
    support = _cuda_ipc.cuda_ipc_support()
    if not support.available:
        raise InvalidArgumentError(_cuda_ipc.no_support_message(support))
    mapping = session.cuda_region(where.region_id, where.generation)
    try:
        _cuda_ipc.check_cuda_descriptor(
            region_size=mapping.size, region_uuid=mapping.uuid, offset=where.offset,
            nbytes=where.nbytes, device_uuid=where.device_uuid, expected_nbytes=nbytes,
        )
    except ValueError as error:
        raise InvalidArgumentError(str(error)) from None
    narrow = NARROW.get(name)
    if narrow is not None and not _x64():
        # Rare policy path (64-bit values, x64 off): range-checked on the host.
        return _narrowed(mapping.host_copy(where.offset, _NUMPY[name], shape), name, narrow)
    return mapping.jax_array(where.offset, _NUMPY[name], shape)


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
    """Places output arrays into the client's arena (large) or inline (small)."""

    def __init__(self, arena: Any, session: Session, inline_threshold: int, limits: Limits):
        self.inline_threshold = inline_threshold
        self.limits = limits
        self.session = session
        self.region = None
        self.base = 0
        self.capacity = 0
        self.used = 0
        self.region_id = 0
        self.generation = 0
        self.cuda: Any = None  # a CudaIpcMapping when the arena is device memory
        if arena is not None and arena.WhichOneof("location") == "cuda_ipc":
            where = arena.cuda_ipc
            support = _cuda_ipc.cuda_ipc_support()
            if not support.available:
                raise InvalidArgumentError(_cuda_ipc.no_support_message(support))
            self.cuda = session.cuda_region(where.region_id, where.generation)
            try:
                _cuda_ipc.check_cuda_descriptor(
                    region_size=self.cuda.size, region_uuid=self.cuda.uuid,
                    offset=where.offset, nbytes=where.nbytes, device_uuid=where.device_uuid,
                    expected_nbytes=None,
                )
            except ValueError as error:
                raise InvalidArgumentError(f"output arena: {error}") from None
            self.base, self.capacity = where.offset, where.nbytes
            self.region_id, self.generation = where.region_id, where.generation
        if arena is not None and arena.WhichOneof("location") == "shm":
            where = arena.shm
            self.region = session.region(where.region_id, where.generation)
            try:
                check_slice(self.region.size, where.offset, where.nbytes)
            except ValueError as error:
                raise InvalidArgumentError(f"output arena: {error}") from None
            self.base, self.capacity = where.offset, where.nbytes
            self.region_id, self.generation = where.region_id, where.generation

    def write_tree(self, leaves: list[Any], spec: _pytree.TreeSpec, out: Any) -> None:
        _wire.encode_spec(spec, out.nodes)
        for leaf in leaves:
            if self.cuda is not None:
                self.write_device(leaf, out.leaves.add())
            else:
                self.write(np.asarray(leaf), out.leaves.add())

    def write_device(self, leaf: Any, message: Any) -> None:
        """CUDA IPC arena: a large output is copied device-to-device into the client's slot
        (no trip through host memory); a small one travels inline."""
        dtype = np.dtype(leaf.dtype)
        nbytes = int(np.prod(leaf.shape, dtype=np.int64)) * dtype.itemsize
        if nbytes <= self.inline_threshold:
            self.write(np.asarray(leaf), message)
            return
        name = _NUMPY_TO_NAME.get(dtype)
        if name is None:
            raise InvalidArgumentError(
                f"the function returned dtype {dtype}, which torch cannot receive; "
                "cast it in the function"
            )
        offset = _wire.align(self.used)
        if offset + nbytes > self.capacity:
            raise ResourceExhaustedError(
                f"output arena of {self.capacity} bytes is too small (the client sized it "
                "from an earlier call with other shapes); retry"
            )
        self.used = offset + nbytes
        with self.session.cuda_writing(self.region_id, self.generation) as mapping:
            mapping.write(self.base + offset, leaf)
        message.dtype = _wire.DTYPE_TO_ENUM[name]
        message.shape.extend(leaf.shape)
        where = message.cuda_ipc
        where.region_id = self.region_id
        where.generation = self.generation
        where.offset = self.base + offset
        where.nbytes = nbytes
        where.device_uuid = self.cuda.uuid

    def write(self, array: np.ndarray, message: Any) -> None:
        name = _NUMPY_TO_NAME.get(array.dtype)
        if name is None:
            raise InvalidArgumentError(
                f"the function returned dtype {array.dtype}, which torch cannot receive; "
                "cast it in the function"
            )
        message.dtype = _wire.DTYPE_TO_ENUM[name]
        message.shape.extend(array.shape)
        nbytes = array.nbytes
        if self.region is not None and nbytes > self.inline_threshold:
            offset = _wire.align(self.used)
            if offset + nbytes > self.capacity:
                raise ResourceExhaustedError(
                    f"output arena of {self.capacity} bytes is too small (the client sized it "
                    "from an earlier call with other shapes); retry"
                )
            self.used = offset + nbytes
            with self.session.writing(self.region_id, self.generation) as region:
                target = numpy_view(region.buffer, self.base + offset, array.dtype, array.shape)
                np.copyto(target, array, casting="no")
                del target
            message.shm.region_id = self.region_id
            message.shm.generation = self.generation
            message.shm.offset = self.base + offset
            message.shm.nbytes = nbytes
            return
        if nbytes > self.limits.max_inline_bytes:
            raise ResourceExhaustedError(
                f"an output of {nbytes} bytes exceeds the inline limit of "
                f"{self.limits.max_inline_bytes} bytes (--max-inline-bytes); use the "
                "shared-memory transport (same host) for large tensors"
            )
        message.inline_data = np.ascontiguousarray(array).tobytes()


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
