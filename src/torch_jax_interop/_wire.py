"""Wire codec shared by the worker and the client: dtypes, shapes and tree structures.

Imports neither torch nor JAX. Everything read from the wire is validated here before any
byte is touched: dtype values, shape products (no overflow, bounded), structure nodes
(bounded count and depth, leaves and children consistent). Tensor *locations* are resolved
by each side (``server/_codec.py`` / ``client/_codec.py``).
"""

from __future__ import annotations

from typing import Any

from . import _pytree
from ._dtypes import (
    BY_NAME,
    DTYPE_NAMES,
    DTYPE_TO_ENUM as DTYPE_TO_ENUM,
    ENUM_TO_DTYPE as ENUM_TO_DTYPE,
)
from ._errors import InvalidArgumentError, ResourceExhaustedError
from ._layout import ALIGNMENT as ALIGNMENT, align as align
from .proto.v1 import interop_pb2 as pb

# Both sides send it in OpenSession and refuse a peer of another version (FAILED_PRECONDITION
# from the worker, ProtocolVersionError on the client). Raise it with every change that
# `buf breaking` reports (see buf.yaml).
PROTOCOL_VERSION = 1
# The gRPC service's full name (method paths are /SERVICE_NAME/Method; health checks name it).
SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["JaxWorkerService"].full_name
MAX_TREE_NODES = 100_000
MAX_TREE_DEPTH = 64
MAX_NDIM = 32

_KIND = pb.TreeNode.Kind
# Plain ints: attribute lookups through protobuf's enum wrapper cost ~0.5 us each.
_LEAF, _NONE, _TUPLE, _LIST, _DICT = (int(_KIND.Value(f"KIND_{k}"))
                                     for k in ("LEAF", "NONE", "TUPLE", "LIST", "DICT"))


def boot_id() -> str:
    """This kernel's boot id: equal on both sides means same host (containers included)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def dtype_name(value: int) -> str:
    """The dtype name of a wire enum value; INVALID_ARGUMENT for anything unknown."""
    name = ENUM_TO_DTYPE.get(value)
    if name is None:
        raise InvalidArgumentError(
            f"unknown dtype value {value}; this worker speaks protocol v{PROTOCOL_VERSION} "
            f"with dtypes {', '.join(DTYPE_NAMES)}. Upgrade the older side."
        )
    return name


_nbytes: dict[tuple[str, tuple[int, ...]], int] = {}  # valid (dtype, shape) -> bytes


def tensor_nbytes(dtype: str, shape: Any, *, limit: int) -> int:
    """Bytes of a dense tensor; refuses shapes whose product overflows or exceeds ``limit``.

    Calls repeat their shapes: one that passed the checks before is answered from a
    bounded cache (the limit is compared every time, it may differ between callers)."""
    key = (dtype, shape) if type(shape) is tuple else None
    if key is not None:
        nbytes = _nbytes.get(key)
        if nbytes is not None and nbytes <= limit:
            return nbytes
    nbytes = _checked_nbytes(dtype, shape, limit)
    if key is not None:
        if len(_nbytes) >= _MAX_CACHED_SPECS:
            _nbytes.clear()
        _nbytes[key] = nbytes
    return nbytes


def _checked_nbytes(dtype: str, shape: Any, limit: int) -> int:
    if len(shape) > MAX_NDIM:
        raise InvalidArgumentError(f"tensor has {len(shape)} dimensions; at most {MAX_NDIM}")
    if any(dim < 0 for dim in shape):
        raise InvalidArgumentError(f"negative dimension in shape {list(shape)}")
    if 0 in shape:
        return 0
    itemsize = BY_NAME[dtype].itemsize
    count = 1
    for dim in shape:
        count *= dim  # Python ints: at most MAX_NDIM factors below 2**64, no wrap-around
    nbytes = count * itemsize
    if nbytes >= 2**64:
        # Not a size limit: no uint64 byte count can describe it, so the shape is bogus.
        raise InvalidArgumentError(
            f"tensor of shape {list(shape)} and dtype {dtype} is larger than any tensor can "
            "be: its byte size overflows 64 bits"
        )
    if nbytes > limit:
        raise ResourceExhaustedError(
            f"tensor of shape {list(shape)} and dtype {dtype} needs {nbytes} bytes, larger "
            f"than the worker's limit of {limit} bytes (--max-tensor-bytes)"
        )
    return nbytes


_DESCRIBABLE = frozenset(
    {_pytree.LEAF, _pytree.NONE, _pytree.TUPLE, _pytree.LIST, _pytree.NAMEDTUPLE, _pytree.DICT}
)


def describable(spec: _pytree.TreeSpec) -> bool:
    """Whether ``encode_spec`` can describe ``spec``: tuples (namedtuples travel as tuples),
    lists, dicts with str keys and None; no registered node, no dataclass."""
    if spec.kind not in _DESCRIBABLE:
        return False
    if spec.kind == _pytree.DICT and not all(isinstance(k, str) for k in spec.meta[0]):
        return False
    return all(describable(child) for child in spec.children)


def encode_spec(spec: _pytree.TreeSpec, nodes: Any) -> None:
    """Append ``spec`` in pre-order to the repeated ``TreeNode`` field ``nodes``."""
    kind = spec.kind
    if kind == _pytree.LEAF:
        nodes.add(kind=_LEAF)
    elif kind == _pytree.NONE:
        nodes.add(kind=_NONE)
    elif kind in (_pytree.TUPLE, _pytree.NAMEDTUPLE):
        nodes.add(kind=_TUPLE, num_children=len(spec.children))
    elif kind == _pytree.LIST:
        nodes.add(kind=_LIST, num_children=len(spec.children))
    elif kind == _pytree.DICT:
        keys = spec.meta[0]
        if not all(isinstance(k, str) for k in keys):
            raise TypeError(
                f"dicts sent to a worker need str keys, got {[k for k in keys]!r}; "
                "convert the keys to str"
            )
        nodes.add(kind=_DICT, keys=keys)
    elif kind == _pytree.REGISTERED:
        raise TypeError(
            f"a `{spec.meta[0]}` node (registered with jax.tree_util) cannot travel between "
            "a client and a worker: use tuples, lists, dicts with str keys and None, or "
            "declare the parameters' structure on the served function (Note [Registered "
            "pytree nodes in service mode] in server/_compiled.py)"
        )
    else:
        raise TypeError(
            f"a {kind} cannot be sent to a worker; use tuples, lists, dicts with str keys "
            "and None"
        )
    for child in spec.children:
        encode_spec(child, nodes)


_MAX_CACHED_SPECS = 1024
"""Specs remembered by :func:`encode_tree_spec` and :func:`decode_spec` (each, at most): a
call repeats its structures, so both sides see a few; a peer sending ever new ones only
refills the cache (it is cleared when full)."""
_MAX_CACHED_NODES = 256  # larger structures are rebuilt every time: no cache of big keys
_MAX_CANDIDATES = 8
"""Structures :func:`decode_spec` remembers per node and leaf count, newest first."""
_encoded: dict[_pytree.TreeSpec, Any] = {}
# (node count, leaf count) -> [(a Tree holding a copy of the nodes, their spec), ...]
_decoded: dict[tuple[int, int], list[tuple[Any, _pytree.TreeSpec]]] = {}


def encode_tree_spec(spec: _pytree.TreeSpec, tree: Any) -> None:
    """``encode_spec(spec, tree.nodes)`` for an empty ``Tree`` message ``tree``, merged
    from a template encoded once per spec (one C-level merge instead of a Python walk)."""
    template = _encoded.get(spec)
    if template is None:
        template = type(tree)()
        encode_spec(spec, template.nodes)  # raises for a spec the wire cannot carry
        if len(_encoded) >= _MAX_CACHED_SPECS:
            _encoded.clear()
        _encoded[spec] = template
    tree.MergeFrom(template)


def decode_spec(nodes: Any, num_leaves: int) -> _pytree.TreeSpec:
    """Rebuild a ``TreeSpec`` from pre-order nodes, validating every count and bound.

    A structure seen before (equal nodes and the same leaf count) is answered from a cache
    of the specs this function built and validated: the same input, the same checks, one
    result. Equality is one C-level comparison of the node messages with a kept copy
    (~1 us for a call's two-node tuple, against ~5 us to read the nodes into a Python key).
    """
    count = len(nodes)
    if not 0 < count <= _MAX_CACHED_NODES:
        return _decode_spec(nodes, num_leaves)
    key = (count, num_leaves)
    seen = _decoded.get(key, ())
    for holder, spec in seen:
        if holder.nodes == nodes:
            return spec
    spec = _decode_spec(nodes, num_leaves)
    holder = pb.Tree()
    holder.nodes.extend(nodes)
    if not seen and len(_decoded) >= _MAX_CACHED_SPECS // _MAX_CANDIDATES:
        _decoded.clear()
    # a new list, not an update in place: other threads may be reading the old one
    _decoded[key] = [(holder, spec), *seen[:_MAX_CANDIDATES - 1]]
    return spec


def _decode_spec(nodes: Any, num_leaves: int) -> _pytree.TreeSpec:
    if len(nodes) > MAX_TREE_NODES:
        raise InvalidArgumentError(
            f"structure has {len(nodes)} nodes; at most {MAX_TREE_NODES} are accepted"
        )
    if not nodes:
        raise InvalidArgumentError("empty structure description: expected at least one node")
    # A module-level recursion, not a nested function: a nested recursive function refers to
    # itself through its closure, a reference cycle that kept `nodes` (hence the whole
    # request message and its inline bytes) alive until the garbage collector ran (seen:
    # +16 MiB of worker RSS per 16 MiB call).
    position = [0]
    spec = _build_node(nodes, position, 0)
    if position[0] != len(nodes):
        raise InvalidArgumentError(
            f"structure description has {len(nodes) - position[0]} trailing nodes"
        )
    if spec.num_leaves != num_leaves:
        raise InvalidArgumentError(
            f"structure has {spec.num_leaves} leaves but {num_leaves} tensors were sent"
        )
    return spec


def _build_node(nodes: Any, position: list[int], depth: int) -> _pytree.TreeSpec:
    """The node at ``position[0]`` and its children (``position`` advances past them)."""
    if depth > MAX_TREE_DEPTH:
        raise InvalidArgumentError(f"structure is nested deeper than {MAX_TREE_DEPTH}")
    if position[0] >= len(nodes):
        raise InvalidArgumentError("structure description ends in the middle of a node")
    node = nodes[position[0]]
    position[0] += 1
    kind = node.kind
    if kind == _LEAF:
        return _pytree.LEAF_SPEC
    if kind == _NONE:
        return _pytree.NONE_SPEC
    if kind == _DICT:
        keys = tuple(node.keys)
        if len(set(keys)) != len(keys):
            raise InvalidArgumentError("dict node has duplicate keys")
        count = len(keys)
    elif kind in (_TUPLE, _LIST):
        if node.keys:
            raise InvalidArgumentError("tuple/list node carries keys")
        count = node.num_children
    else:
        raise InvalidArgumentError(f"unknown structure node kind {kind}")
    if count > len(nodes) - position[0]:
        raise InvalidArgumentError(
            f"node claims {count} children but only {len(nodes) - position[0]} nodes follow"
        )
    children = tuple(_build_node(nodes, position, depth + 1) for _ in range(count))
    leaves = sum(c.num_leaves for c in children)
    if kind == _DICT:
        return _pytree.TreeSpec(_pytree.DICT, children, (keys, dict, None, None), leaves)
    return _pytree.TreeSpec(
        _pytree.TUPLE if kind == _TUPLE else _pytree.LIST, children, None, leaves
    )
