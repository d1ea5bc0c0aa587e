"""Property-based fuzzing of a LIVE worker over gRPC with hand-built (malformed) messages.

One worker serves the whole module. Session A registers a guarded region: an input area the
requests point into, an output arena, and guard bytes everywhere else; session B registers
regions of its own; a region of A was released (its ids are stale). Hypothesis then throws
descriptors (offsets and sizes near 2**64, overflowing shapes, sizes that disagree with
shape x dtype, misaligned slices, released region ids, other sessions' ids, unknown dtypes,
truncated inline bytes), structure descriptions (wrong child counts, trailing nodes, too
deep, too many nodes), region and residual operations, random bytes as whole requests and
byte-mutated valid requests at it. Every case must get OK or a clear status
(INVALID_ARGUMENT / NOT_FOUND / RESOURCE_EXHAUSTED, and FAILED_PRECONDITION for an
OpenSession of another protocol version), never INTERNAL / UNKNOWN; an accepted
request must have been valid (an oracle checks), an accepted identity call must return
exactly the bytes of the slice it named, outputs must land inside the arena the request gave,
error messages must not echo region names the requester did not send, and at the end the
guard bytes, the stale region and session B's regions are untouched and the worker serves a
normal client. The case counts go to ``.cache/reliability.json`` (see
``tests/support/reliability.py``).
"""

from __future__ import annotations

import os
import random
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from support.reliability import record
from support.workers import WorkerProcess, start_worker, stop_worker

from torch_jax_interop._dtypes import BY_NAME
from torch_jax_interop._wire import (
    DTYPE_TO_ENUM,
    ENUM_TO_DTYPE,
    MAX_NDIM,
    PROTOCOL_VERSION,
    SERVICE_NAME,
)
from torch_jax_interop.client import connect
from torch_jax_interop.proto.v1 import interop_pb2 as pb, interop_pb2_grpc as pb_grpc
from torch_jax_interop.transport import SharedMemoryRegion, region_tag

MAX_TENSOR = 16 << 20  # the worker's --max-tensor-bytes
REGION = 1 << 20  # session A's guarded region
INPUT_OFF, INPUT_END = 64 << 10, 448 << 10  # requests' input slices point in here
ARENA_OFF, ARENA_END = 512 << 10, 768 << 10  # the only bytes the worker may write
ALLOWED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.RESOURCE_EXHAUSTED}
NARROWED = {"float64": "float32", "int64": "int32", "uint64": "uint32",
            "complex128": "complex64"}  # the worker runs with JAX's x64 mode off
SERVICE = f"/{SERVICE_NAME}/"
MIN_CASES = 5_000

FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])


@dataclass(repr=False)
class Fuzz:
    worker: WorkerProcess
    stub: pb_grpc.JaxWorkerServiceStub
    channel: grpc.Channel
    a: str  # session ids
    b: str
    c: str
    region: SharedMemoryRegion  # A's guarded region (id 1)
    current: dict[int, int]  # A's live region ids -> size
    stale: list[int]  # ids A released
    b_ids: list[int]
    snapshots: dict[str, tuple[SharedMemoryRegion, bytes]]  # regions nobody may write
    guard_before: bytes  # region A as it was before fuzzing
    region_names: set[str]  # every region name the sessions registered
    lures: dict[str, str]  # name -> what it is, for RegisterRegion
    c_regions: set[int] = field(default_factory=set)
    c_residuals: set[int] = field(default_factory=set)
    c_residuals_ever: set[int] = field(default_factory=set)
    allowed_writes: list[tuple[int, int]] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)

    def __repr__(self) -> str:  # hypothesis prints the strategies' arguments
        return f"Fuzz(worker pid {self.worker.process.pid})"


def _open_session(stub: pb_grpc.JaxWorkerServiceStub) -> tuple[Any, str]:
    stream = stub.OpenSession(pb.OpenSessionRequest(protocol_version=PROTOCOL_VERSION,
                                                    client_pid=os.getpid(),
                                                    transport=pb.TRANSPORT_SHARED_MEMORY))
    return stream, next(stream).session_id


def _register(stub: pb_grpc.JaxWorkerServiceStub, session: str,
              region: SharedMemoryRegion) -> int:
    reply = stub.RegisterRegion(pb.RegisterRegionRequest(
        session_id=session,
        shared_memory=pb.SharedMemoryRegion(name=region.name, size=region.size)), timeout=30)
    return int(reply.region_id)


def _guarded(size: int, seed: int, session: str) -> SharedMemoryRegion:
    region = SharedMemoryRegion.create(size, tag=region_tag(session))
    rng = np.random.default_rng(seed)
    np.frombuffer(region.buffer, np.uint8)[:] = rng.integers(0, 256, size, dtype=np.uint8)
    return region


def _make_lures(directory: str, tag: str) -> dict[str, str]:
    """Files under the project's prefix that the worker must refuse (and one it may map),
    named for the session whose ``tag`` they carry."""
    def name() -> str:
        return f"tji-{os.getpid()}-{tag}-{os.urandom(8).hex()}"

    lures: dict[str, str] = {}
    wide = name()
    fd = os.open(os.path.join(directory, wide), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
    os.ftruncate(fd, 4096)
    os.fchmod(fd, 0o644)
    os.close(fd)
    lures[wide] = "mode 0644"
    link = name()
    os.symlink(os.path.join(directory, wide), os.path.join(directory, link))
    lures[link] = "symlink"
    fifo = name()
    os.mkfifo(os.path.join(directory, fifo), 0o600)
    lures[fifo] = "fifo"
    folder = name()
    os.mkdir(os.path.join(directory, folder), 0o700)
    lures[folder] = "directory"
    good = name()
    fd = os.open(os.path.join(directory, good), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    os.ftruncate(fd, 4096)
    os.close(fd)
    lures[good] = "valid"
    return lures


def _remove_lures(directory: str, lures: dict[str, str]) -> None:
    for lure, kind in lures.items():
        path = os.path.join(directory, lure)
        try:
            if kind == "directory":
                os.rmdir(path)
            else:
                os.unlink(path)
        except FileNotFoundError:
            pass


@pytest.fixture(scope="module")
def fz() -> Iterator[Fuzz]:
    with tempfile.TemporaryDirectory(prefix="tji", dir="/tmp") as tmp:
        # File regions (and file lures) need --allow-unsealed-regions (Note [Sealed regions]).
        worker = start_worker(tmp, extra=["--max-tensor-bytes", str(MAX_TENSOR),
                                          "--allow-unsealed-regions"])
        channel = grpc.insecure_channel(worker.address, options=[
            ("grpc.max_receive_message_length", 64 << 20),
            ("grpc.max_send_message_length", 64 << 20)])
        stub = pb_grpc.JaxWorkerServiceStub(channel)
        streams = []
        regions: list[SharedMemoryRegion] = []
        lures: dict[str, str] = {}
        try:
            stream_a, a = _open_session(stub)
            stream_b, b = _open_session(stub)
            stream_c, c = _open_session(stub)
            streams += [stream_a, stream_b, stream_c]
            main = _guarded(REGION, 1, a)
            regions.append(main)
            assert _register(stub, a, main) == 1
            main.unlink()  # as the client's pool does: nobody can map it by name any more
            released = _guarded(64 << 10, 2, a)
            regions.append(released)
            stale = [_register(stub, a, released)]
            stub.ReleaseRegion(pb.ReleaseRegionRequest(session_id=a, region_id=stale[0]),
                               timeout=30)
            again = _register(stub, a, released)  # same file, new id
            released.unlink()
            stub.ReleaseRegion(pb.ReleaseRegionRequest(session_id=a, region_id=again),
                               timeout=30)
            stale.append(again)
            snapshots = {"A-released": (released, bytes(released.buffer))}
            b_ids = []
            for index in range(3):
                region = _guarded(64 << 10, 10 + index, b)
                regions.append(region)
                b_ids.append(_register(stub, b, region))
                region.unlink()
                snapshots[f"B-{index}"] = (region, bytes(region.buffer))
            lures = _make_lures("/dev/shm", region_tag(c))
            yield Fuzz(
                worker=worker, stub=stub, channel=channel, a=a, b=b, c=c, region=main,
                current={1: REGION}, stale=stale, b_ids=b_ids, snapshots=snapshots,
                guard_before=bytes(main.buffer), region_names={r.name for r in regions},
                lures=lures,
            )
        finally:
            _remove_lures("/dev/shm", lures)
            for stream in streams:
                stream.cancel()
            channel.close()
            for region in regions:
                region.unlink()
                region.close()
            assert stop_worker(worker) == 0, worker.log()


# -- strategies -------------------------------------------------------------------------

BOUNDARY = [0, 1, 3, 63, 64, 65, 4095, 4096, INPUT_OFF, ARENA_OFF - 64, ARENA_OFF,
            REGION - 64, REGION - 1, REGION, REGION + 64, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
            2**32 + 64, 2**62, 2**63 - 64, 2**63 - 1, 2**63, 2**64 - 4096, 2**64 - 64,
            2**64 - 2, 2**64 - 1]
u64 = st.one_of(st.sampled_from(BOUNDARY), st.integers(0, 2**64 - 1),
                st.integers(0, REGION + 4096))
small_dim = st.sampled_from([0, 1, 2, 3, 16])
shapes = st.one_of(
    st.lists(small_dim, max_size=3),
    st.lists(small_dim, max_size=3),
    st.lists(st.one_of(small_dim, u64), max_size=4),
    st.lists(st.sampled_from([1, 2]), min_size=MAX_NDIM - 1, max_size=MAX_NDIM + 3),
)
BAD_DTYPES = [0, len(DTYPE_TO_ENUM) + 1, 99, 2**31 - 1, -1]
dtypes = st.one_of(st.sampled_from(sorted(ENUM_TO_DTYPE)), st.sampled_from(sorted(ENUM_TO_DTYPE)),
                   st.sampled_from(sorted(ENUM_TO_DTYPE)), st.sampled_from(BAD_DTYPES))
_RANDOM = np.random.default_rng(7).integers(0, 256, 1 << 19, dtype=np.uint8).tobytes()


def _itemsize(dtype: int) -> int | None:
    name = ENUM_TO_DTYPE.get(dtype)
    return BY_NAME[name].itemsize if name is not None else None


def _nbytes(dtype: int, shape: list[int]) -> int | None:
    """Bytes the tensor needs, or None when the worker must refuse it outright."""
    itemsize = _itemsize(dtype)
    if itemsize is None or len(shape) > MAX_NDIM:
        return None
    count = 1
    for dim in shape:
        count *= dim
    nbytes = count * itemsize
    return nbytes if nbytes <= MAX_TENSOR else None


@st.composite
def tensors(draw: st.DrawFn, fz: Fuzz) -> pb.Tensor:
    dtype = draw(dtypes)
    shape = draw(shapes)
    tensor = pb.Tensor(dtype=dtype, shape=shape)
    need = _nbytes(dtype, shape)
    where = draw(st.sampled_from(["shm", "shm", "shm", "inline", "inline", "none", "cuda"]))
    if where == "inline":
        start = draw(st.integers(0, 1 << 18))
        if need is not None and need <= 1 << 18 and draw(st.booleans()):
            delta = draw(st.sampled_from([0, 0, 0, -1, 1, -need, 7]))
            length = max(0, need + delta)
        else:
            length = draw(st.integers(0, 4096))
        tensor.inline_data = _RANDOM[start:start + length]
    elif where == "shm":
        which = draw(st.sampled_from(["A", "A", "A", "A", "stale", "B", "zero", "random"]))
        if which == "A":
            region_id = 1
            if draw(st.integers(0, 4)) == 0:  # a neighbour of A's id: never registered
                region_id = draw(st.one_of(st.sampled_from([0, 2]), u64))
        elif which == "stale":
            region_id = draw(st.sampled_from(fz.stale))
        elif which == "B":
            region_id = draw(st.sampled_from(fz.b_ids))
        elif which == "zero":
            region_id = 0
        else:
            region_id = draw(u64)
        if draw(st.integers(0, 2)):
            offset = INPUT_OFF + 64 * draw(st.integers(0, (INPUT_END - INPUT_OFF) // 64))
        else:
            offset = draw(u64)
        if need is not None and draw(st.integers(0, 3)):
            nbytes = need
        else:
            nbytes = draw(u64)
        tensor.shm.CopyFrom(pb.SharedMemorySlice(region_id=region_id, offset=offset,
                                                 nbytes=nbytes))
    elif where == "cuda":
        tensor.cuda_ipc.CopyFrom(pb.CudaIpcSlice(region_id=1, offset=0, nbytes=need or 0))
    return tensor


def _slice_ok(fz: Fuzz, where: Any) -> bool:
    size = fz.current.get(where.region_id)
    if size is None:
        return False
    return where.offset % 64 == 0 and where.offset <= size and where.nbytes <= size - where.offset


def _tensor_ok(fz: Fuzz, tensor: pb.Tensor) -> bool:
    """The oracle: may the worker accept this descriptor at all?"""
    need = _nbytes(tensor.dtype, list(tensor.shape))
    if need is None:
        return False
    location = tensor.WhichOneof("location")
    if location == "inline_data":
        return len(tensor.inline_data) == need
    if location == "shm":
        return tensor.shm.nbytes == need and _slice_ok(fz, tensor.shm)
    return False


@st.composite
def arenas(draw: st.DrawFn, fz: Fuzz) -> pb.OutputArena | None:
    kind = draw(st.sampled_from(["none", "arena", "arena", "fuzzed"]))
    if kind == "none":
        return None
    if kind == "arena":
        offset = ARENA_OFF + 64 * draw(st.integers(0, 64))
        nbytes = draw(st.sampled_from([0, 64, 4096, ARENA_END - offset]))
        where = pb.SharedMemorySlice(region_id=1, offset=offset, nbytes=nbytes)
    else:
        where = pb.SharedMemorySlice(
            region_id=draw(st.sampled_from([1, 1, 2, 3, 0, 2**64 - 1])),
            offset=draw(u64), nbytes=draw(u64))
    return pb.OutputArena(shm=where)


def _confine(fz: Fuzz, arena: pb.OutputArena | None) -> None:
    """A valid arena outside the arena area is moved into it: the worker may write to any
    valid arena, and the guard check needs to know which bytes are fair game. The arena a
    request gives is recorded as writable whatever the outcome."""
    if arena is None or arena.WhichOneof("location") != "shm":
        return
    where = arena.shm
    if not _slice_ok(fz, where):
        return
    if where.region_id != 1 or where.offset < ARENA_OFF or where.offset + where.nbytes > ARENA_END:
        where.region_id = 1
        where.offset = ARENA_OFF + (where.offset % (ARENA_END - ARENA_OFF)) // 64 * 64
        where.nbytes = min(where.nbytes, ARENA_END - where.offset)
    fz.allowed_writes.append((where.offset, where.offset + where.nbytes))


def _rpc(fz: Fuzz, what: str, method: Any, request: Any, sent_names: str = "",
         allowed: frozenset[grpc.StatusCode] = frozenset(ALLOWED)) -> Any:
    """Send; return the response or None; check the status and the message of a refusal."""
    fz.counts[what] += 1
    try:
        response = method(request, timeout=30)
    except grpc.RpcError as error:
        code = error.code()
        fz.statuses[code.name] += 1
        assert code in allowed, (what, code, error.details(), request)
        details = error.details() or ""
        assert details, (what, code)
        for name in fz.region_names | set(fz.lures):
            assert name not in details or name in sent_names, (what, name, details)
        return None
    fz.statuses["OK"] += 1
    return response


def _call_request(session: str, function: str, leaves: list[pb.Tensor],
                  arena: pb.OutputArena | None) -> pb.CallRequest:
    request = pb.CallRequest(session_id=session, function=function)
    request.args.nodes.add(kind=pb.TreeNode.KIND_TUPLE, num_children=len(leaves))
    for leaf in leaves:
        request.args.nodes.add(kind=pb.TreeNode.KIND_LEAF)
        request.args.leaves.append(leaf)
    request.kwargs.nodes.add(kind=pb.TreeNode.KIND_DICT)
    if arena is not None:
        request.output_arena.CopyFrom(arena)
    return request


def _input_bytes(fz: Fuzz, tensor: pb.Tensor) -> bytes:
    if tensor.WhichOneof("location") == "inline_data":
        return tensor.inline_data
    where = tensor.shm
    return bytes(fz.region.buffer[where.offset:where.offset + where.nbytes])


def _expected(tensor: pb.Tensor, data: bytes) -> tuple[int, bytes]:
    name = ENUM_TO_DTYPE[tensor.dtype]
    narrow = NARROWED.get(name)
    if narrow is None:
        return tensor.dtype, data
    with np.errstate(all="ignore"):  # random bytes: float64 -> float32 may overflow to inf
        narrowed = np.frombuffer(data, dtype=name).astype(narrow)
    return DTYPE_TO_ENUM[narrow], narrowed.tobytes()


def _output_bytes(fz: Fuzz, out: pb.Tensor, arena: pb.OutputArena | None) -> bytes:
    if out.WhichOneof("location") == "inline_data":
        return out.inline_data
    assert out.WhichOneof("location") == "shm", out
    assert arena is not None, "an output went to shared memory though no arena was given"
    where, given = out.shm, arena.shm
    assert where.region_id == given.region_id
    assert where.offset % 64 == 0
    assert given.offset <= where.offset
    assert where.offset + where.nbytes <= given.offset + given.nbytes, (where, given)
    return bytes(fz.region.buffer[where.offset:where.offset + where.nbytes])


# -- the cases --------------------------------------------------------------------------


@settings(FUZZ, max_examples=2_000)
@given(data=st.data())
def test_tensor_descriptors(fz: Fuzz, data: st.DataObject) -> None:
    tensor = data.draw(tensors(fz), "tensor")
    arena = data.draw(arenas(fz), "arena")
    function = data.draw(st.sampled_from(["identity"] * 8 + ["checksum", "no_such_function"]))
    _confine(fz, arena)
    request = _call_request(fz.a, function, [tensor], arena)
    response = _rpc(fz, "tensor descriptors", fz.stub.Call, request)
    if response is None:
        return
    assert function != "no_such_function"
    assert _tensor_ok(fz, tensor), ("accepted an invalid descriptor", tensor)
    if arena is not None:
        assert _slice_ok(fz, arena.shm), ("accepted an invalid arena", arena)
    if response.required_output_bytes:  # nothing ran: the arena was too small
        assert not response.outputs.leaves
        return
    if function == "identity":
        assert len(response.outputs.leaves) == 1
        out = response.outputs.leaves[0]
        dtype, expected = _expected(tensor, _input_bytes(fz, tensor))
        assert (out.dtype, list(out.shape)) == (dtype, list(tensor.shape))
        # Exactly the bytes of the slice the request named: nothing read from elsewhere.
        got = _output_bytes(fz, out, arena)
        if tensor.dtype == pb.DTYPE_BOOL:  # bytes other than 0 / 1 are no canonical bool
            got, expected = bytes(b != 0 for b in got), bytes(b != 0 for b in expected)
        assert got == expected
        fz.counts["accepted identity calls checked byte for byte"] += 1


_node = st.builds(
    pb.TreeNode,
    kind=st.one_of(st.sampled_from([1, 2, 3, 4, 5]), st.sampled_from([0, 6, 99])),
    num_children=st.one_of(st.integers(0, 4), st.sampled_from([2**31, 2**32 - 1, 100_000])),
    keys=st.one_of(st.just([]), st.lists(st.sampled_from(["a", "b", "x", "", "é", "a.b"]),
                                         max_size=4)),
)
_leaf_values = st.recursive(
    st.sampled_from(["leaf", None]),
    lambda inner: st.one_of(st.tuples(inner, inner), st.lists(inner, max_size=3),
                            st.dictionaries(st.sampled_from(["a", "b", "c"]), inner, max_size=3)),
    max_leaves=8,
)


def _encode(value: Any, nodes: list[pb.TreeNode]) -> int:
    """Pre-order nodes of a nested value; returns the number of leaves."""
    if value == "leaf":
        nodes.append(pb.TreeNode(kind=pb.TreeNode.KIND_LEAF))
        return 1
    if value is None:
        nodes.append(pb.TreeNode(kind=pb.TreeNode.KIND_NONE))
        return 0
    if isinstance(value, dict):
        nodes.append(pb.TreeNode(kind=pb.TreeNode.KIND_DICT, keys=list(value)))
        children = list(value.values())
    else:
        kind = pb.TreeNode.KIND_TUPLE if isinstance(value, tuple) else pb.TreeNode.KIND_LIST
        nodes.append(pb.TreeNode(kind=kind, num_children=len(value)))
        children = list(value)
    return sum(_encode(child, nodes) for child in children)


@st.composite
def structures(draw: st.DrawFn) -> tuple[list[pb.TreeNode], int]:
    """(nodes, number of leaves to send): random node soups, or real trees with one flaw."""
    if draw(st.integers(0, 2)) == 0:
        return draw(st.lists(_node, max_size=24)), draw(st.integers(0, 6))
    nodes: list[pb.TreeNode] = []
    leaves = _encode(("leaf", draw(_leaf_values)), nodes)  # args: (x, ...)
    flaw = draw(st.sampled_from(["none", "count", "trailing", "drop", "leaves", "kind", "keys"]))
    index = draw(st.integers(0, len(nodes) - 1))
    if flaw == "count":
        nodes[index].num_children += draw(st.sampled_from([1, 2, 2**32 - 1 - 4]))
    elif flaw == "trailing":
        nodes.append(draw(_node))
    elif flaw == "drop":
        del nodes[index]
    elif flaw == "leaves":
        leaves += draw(st.sampled_from([-1, 1, 5]))
    elif flaw == "kind":
        nodes[index].kind = draw(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 99]))
    elif flaw == "keys":
        nodes[index].keys.extend(draw(st.lists(st.sampled_from(["a", "a", "z"]), min_size=1,
                                               max_size=3)))
    return nodes, max(0, leaves)


_SMALL = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[2], inline_data=np.float32([1.5, -2]).tobytes())


@settings(FUZZ, max_examples=1_500)
@given(args=structures(), kwargs=st.one_of(st.none(), structures()))
def test_structure_descriptions(fz: Fuzz, args: tuple[list[pb.TreeNode], int],
                                kwargs: tuple[list[pb.TreeNode], int] | None) -> None:
    request = pb.CallRequest(session_id=fz.a, function="identity")
    request.args.nodes.extend(args[0])
    request.args.leaves.extend([_SMALL] * args[1])
    if kwargs is not None:
        request.kwargs.nodes.extend(kwargs[0])
        request.kwargs.leaves.extend([_SMALL] * kwargs[1])
    response = _rpc(fz, "structure descriptions", fz.stub.Call, request)
    if response is not None:
        for out in response.outputs.leaves:
            assert out.inline_data == _SMALL.inline_data


@pytest.mark.parametrize(("depth", "ok"), [(63, True), (64, True), (65, False), (66, False),
                                           (500, False), (20_000, False)])
def test_deep_structures(fz: Fuzz, depth: int, ok: bool) -> None:
    """A chain of one-child tuples: accepted up to the documented depth of 64."""
    request = pb.CallRequest(session_id=fz.a, function="identity")
    request.args.nodes.extend([pb.TreeNode(kind=pb.TreeNode.KIND_TUPLE, num_children=1)] * depth)
    request.args.nodes.add(kind=pb.TreeNode.KIND_LEAF)
    request.args.leaves.append(_SMALL)
    response = _rpc(fz, "structure descriptions", fz.stub.Call, request)
    assert (response is not None) == ok
    if response is not None:
        assert response.outputs.leaves[0].inline_data == _SMALL.inline_data


@pytest.mark.parametrize("count", [99_999, 100_000, 100_001, 400_000])
def test_too_many_nodes(fz: Fuzz, count: int) -> None:
    request = pb.CallRequest(session_id=fz.a, function="identity")
    request.args.nodes.add(kind=pb.TreeNode.KIND_TUPLE, num_children=count - 1)
    request.args.nodes.extend([pb.TreeNode(kind=pb.TreeNode.KIND_NONE)] * (count - 1))
    response = _rpc(fz, "structure descriptions", fz.stub.Call, request)
    assert response is None  # identity takes one argument, and more than 100,000 nodes never


def _foreign_names(fz: Fuzz) -> list[str]:
    return sorted(fz.region_names)


# Ids of the residuals and regions session C holds change as the cases run; strategies must
# not depend on that state (hypothesis replays choices), so they draw a reference that the
# test resolves: ("known", i) is the i-th live id (mod their number), ("raw", n) is n itself.
_ids = st.one_of(st.tuples(st.just("known"), st.integers(0, 15)),
                 st.tuples(st.just("known"), st.integers(0, 15)), st.tuples(st.just("raw"), u64))


def _resolve(ref: tuple[str, int], live: set[int]) -> int:
    kind, value = ref
    if kind == "raw" or not live:
        return value if kind == "raw" else 1
    return sorted(live)[value % len(live)]


_FIXED_NAMES = ["../../etc/passwd", "tji-1-0000000000000000", "psm_1", "", "tji-",
                "tji-0-0123456789abcdef", "tji-1-0123456789ABCDEF", "tji-12-0123456789abcdef\n",
                "x" * 5000]


_OPS = ["register"] * 4 + ["release_region"] * 2 + ["backward"] * 2 + ["release",
                                                                          "make_residual"]
_COTANGENT_STRUCTURES: list[tuple[list[pb.TreeNode], int] | None] = [
    None,
    ([pb.TreeNode(kind=pb.TreeNode.KIND_NONE)], 0),
    ([pb.TreeNode(kind=pb.TreeNode.KIND_TUPLE, num_children=2),
      pb.TreeNode(kind=pb.TreeNode.KIND_LEAF)], 1),
    ([pb.TreeNode(kind=pb.TreeNode.KIND_LEAF)], 3),
    ([pb.TreeNode(kind=pb.TreeNode.KIND_DICT, keys=["a", "a"]),
      pb.TreeNode(kind=pb.TreeNode.KIND_LEAF), pb.TreeNode(kind=pb.TreeNode.KIND_LEAF)], 2),
    ([pb.TreeNode(kind=99)], 1),
    ([], 0),
]


def _u64(rng: random.Random) -> int:
    pick = rng.random()
    if pick < 0.4:
        return rng.choice(BOUNDARY)
    if pick < 0.7:
        return rng.randrange(REGION + 4096)
    return rng.randrange(2**64)


def _id_ref(rng: random.Random) -> tuple[str, int]:
    return ("known", rng.randrange(16)) if rng.random() < 0.67 else ("raw", _u64(rng))


def region_ops(rng: random.Random) -> tuple[str, int, Any, Any]:
    """(op, session choice, fields, id references), drawn from a seeded generator.

    This stateful sequence does not use hypothesis: hypothesis replays choice sequences and
    checks that each replay draws the same way, and across a long test session that check
    tripped here (its pool of constants grows as modules are imported), failing runs whose
    requests were all answered correctly. Names and sessions are references that
    ``_region_request`` resolves against the fixture.
    """
    op = rng.choice(_OPS)
    session = rng.randrange(9)
    if op == "register":
        how = rng.randrange(4)
        if how == 0:
            name: Any = ("lure", rng.randrange(64))
        elif how == 1:
            name = ("foreign", rng.randrange(64))
        elif how == 2:
            name = ("literal", rng.choice(_FIXED_NAMES + ["/dev/shm/lure"]))
        else:
            alphabet = "tji-0123456789abcdefABCDEF/.\n\x00é\u2028 "
            name = ("literal", "".join(rng.choice(alphabet) for _ in range(rng.randrange(41))))
        size = rng.choice([1, 64, 4095, 4096, 4097]) if rng.random() < 0.5 else _u64(rng)
        kind = rng.choice(["shared_memory"] * 3 + ["none", "cuda_ipc"])
        return op, session, (name, size, kind), None
    if op == "release_region":
        return op, session, None, _id_ref(rng)
    if op == "backward":
        return op, session, (rng.random() < 0.5, rng.choice(_COTANGENT_STRUCTURES)), _id_ref(rng)
    if op == "release":
        return op, session, None, [_id_ref(rng) for _ in range(rng.randrange(6))]
    return op, session, None, None


def _region_request(fz: Fuzz, op: str, session_choice: int, fields: Any) -> Any:
    session = ([fz.c] * 6 + ["", "no-such-session", fz.c + "0"])[session_choice]
    if op == "register":
        (how, which), size, kind = fields
        lures = sorted(fz.lures)
        if how == "lure":
            name = lures[which % len(lures)]
        elif how == "foreign":
            foreign = _foreign_names(fz)
            name = foreign[which % len(foreign)]
        else:
            name = "/dev/shm/" + lures[0] if which == "/dev/shm/lure" else which
        request = pb.RegisterRegionRequest(session_id=session)
        if kind == "shared_memory":
            request.shared_memory.CopyFrom(pb.SharedMemoryRegion(name=name, size=size))
        elif kind == "cuda_ipc":  # this worker has no CUDA IPC support
            request.cuda_ipc.CopyFrom(pb.CudaIpcRegion(handle=bytes(64), size=size))
        return request
    if op == "release_region":
        return pb.ReleaseRegionRequest(session_id=session)
    if op == "backward":
        keep, structure = fields
        request = pb.BackwardRequest(session_id=session, keep_residuals=keep)
        nodes, leaves = structure or ([pb.TreeNode(kind=pb.TreeNode.KIND_LEAF)], 1)
        request.cotangents.nodes.extend(nodes)
        request.cotangents.leaves.extend([_SMALL] * leaves)
        return request
    if op == "release":
        return pb.ReleaseRequest(session_id=session)
    request = _call_request(session, "scale", [_SMALL, _SMALL], None)
    request.keep_residuals = True
    return request


def test_region_and_residual_operations(fz: Fuzz) -> None:
    rng = random.Random(20261125)
    for _ in range(1_000):
        _region_and_residual_operation(fz, *region_ops(rng))


def _region_and_residual_operation(fz: Fuzz, op: str, session_choice: int, fields: Any,
                                   ref: Any) -> None:
    request = _region_request(fz, op, session_choice, fields)
    if op == "release_region":
        request.region_id = _resolve(ref, fz.c_regions)
    elif op == "backward":
        request.residual_id = _resolve(ref, fz.c_residuals)
    elif op == "release":
        request.residual_ids.extend(_resolve(r, fz.c_residuals) for r in ref)
    methods = {"register": fz.stub.RegisterRegion, "release_region": fz.stub.ReleaseRegion,
               "backward": fz.stub.Backward, "release": fz.stub.Release,
               "make_residual": fz.stub.Call}
    live = request.session_id == fz.c
    response = _rpc(fz, "region and residual operations", methods[op], request,
                    sent_names=request.shared_memory.name if op == "register" else "")
    if op == "register":
        region = request.shared_memory
        valid = (live and request.WhichOneof("region") == "shared_memory"
                 and fz.lures.get(region.name) == "valid" and 0 < region.size <= 4096)
        assert (response is not None) == valid or (valid and len(fz.c_regions) >= 256), request
        if response is not None:
            assert response.region_id not in fz.c_regions
            fz.c_regions.add(response.region_id)
    elif op == "release_region":
        valid = live and request.region_id in fz.c_regions
        assert (response is not None) == valid, request
        if valid:  # a refused release (wrong session, unknown id) leaves C's regions alone
            fz.c_regions.discard(request.region_id)
    elif op == "backward":
        if response is not None:
            assert live and request.residual_id in fz.c_residuals_ever
        if live and not request.keep_residuals:
            fz.c_residuals.discard(request.residual_id)
    elif op == "release":
        assert (response is not None) == live
        if response is not None:
            assert response.released <= len(set(request.residual_ids) & fz.c_residuals_ever)
            fz.c_residuals -= set(request.residual_ids)
    else:
        assert (response is not None) == live
        if response is not None:
            fz.c_residuals.add(response.residual_id)
            fz.c_residuals_ever.add(response.residual_id)


METHODS = ["OpenSession", "RegisterRegion", "ReleaseRegion", "ListFunctions", "Call",
           "Backward", "Release"]


def _send_raw(fz: Fuzz, method: str, payload: bytes, what: str) -> Any:
    """Send bytes as the whole request; OpenSession's stream is closed after its first event."""
    if method == "OpenSession":
        call = fz.channel.unary_stream(SERVICE + method)(payload, timeout=30)

        def first(_: bytes, timeout: float) -> Any:
            try:
                return next(call)
            finally:
                call.cancel()

        # Bytes that decode to an OpenSessionRequest of another protocol version.
        try:
            version = pb.OpenSessionRequest.FromString(payload).protocol_version
        except Exception:
            version = PROTOCOL_VERSION
        mismatch = {grpc.StatusCode.FAILED_PRECONDITION} if version != PROTOCOL_VERSION else set()
        return _rpc(fz, what, first, payload, allowed=frozenset(ALLOWED | mismatch))
    return _rpc(fz, what, fz.channel.unary_unary(SERVICE + method), payload)


@settings(FUZZ, max_examples=800)
@given(method=st.sampled_from(METHODS), payload=st.binary(max_size=300))
def test_random_bytes_as_requests(fz: Fuzz, method: str, payload: bytes) -> None:
    _send_raw(fz, method, payload, "random bytes as requests")


def _valid_requests(fz: Fuzz) -> dict[str, bytes]:
    shm = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[64], shm=pb.SharedMemorySlice(
        region_id=1, offset=INPUT_OFF, nbytes=256))
    inline = pb.Tensor(dtype=pb.DTYPE_INT32, shape=[2, 2], inline_data=bytes(16))
    call = _call_request(fz.a, "identity", [shm], pb.OutputArena(shm=pb.SharedMemorySlice(
        region_id=1, offset=ARENA_OFF, nbytes=4096)))
    call2 = _call_request(fz.a, "scale", [inline, inline], None)
    backward = pb.BackwardRequest(session_id=fz.a, residual_id=1)
    backward.cotangents.nodes.add(kind=pb.TreeNode.KIND_LEAF)
    backward.cotangents.leaves.append(inline)
    register = pb.RegisterRegionRequest(session_id=fz.a, shared_memory=pb.SharedMemoryRegion(
        name=sorted(fz.region_names)[0], size=4096))
    return {"Call": call.SerializeToString(), "Call ": call2.SerializeToString(),
            "Backward": backward.SerializeToString(),
            "RegisterRegion": register.SerializeToString()}


@st.composite
def mutated(draw: st.DrawFn, base: bytes) -> bytes:
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        index = draw(st.integers(0, max(0, len(data) - 1)))
        if action == "flip" and data:
            data[index] ^= 1 << draw(st.integers(0, 7))
        elif action == "set" and data:
            data[index] = draw(st.sampled_from([0, 0x7F, 0x80, 0xFF, 0x08, 0x12]))
        elif action == "insert":
            data[index:index] = draw(st.binary(min_size=1, max_size=12))
        elif action == "delete" and data:
            del data[index:index + draw(st.integers(1, 8))]
        elif action == "truncate":
            del data[index:]
    return bytes(data)


@settings(FUZZ, max_examples=1_000)
@given(data=st.data())
def test_mutated_valid_requests(fz: Fuzz, data: st.DataObject) -> None:
    bases = _valid_requests(fz)
    key = data.draw(st.sampled_from(sorted(bases)), "request")
    payload = data.draw(mutated(bases[key]), "mutation")
    method = key.strip()
    if method == "Call":
        try:
            request = pb.CallRequest.FromString(payload)
        except Exception:  # noqa: BLE001 - bytes that are no CallRequest go as they are
            request = None
        if request is not None:
            _confine(fz, request.output_arena if request.HasField("output_arena") else None)
            payload = request.SerializeToString()
    names = payload.decode("utf-8", "replace")
    _rpc(fz, "mutated valid requests", fz.channel.unary_unary(SERVICE + method), payload,
         sent_names=names)


# -- afterwards: the worker serves, and nothing outside a given arena changed ----------


def test_zz_worker_serves_and_nothing_outside_the_arenas_changed(fz: Fuzz) -> None:
    assert fz.worker.process.poll() is None, fz.worker.log()
    log = fz.worker.log()
    assert "Traceback" not in log and " ERROR " not in log, log[-4000:]
    with connect(fz.worker.address, transport="shm", timeout=60) as client:
        x = torch.randn(1 << 18)
        assert torch.equal(client.function("identity")(x), x)
        assert torch.equal(client.function("add_one")(torch.zeros(3)), torch.ones(3))
    after = np.frombuffer(fz.region.buffer, np.uint8)
    before = np.frombuffer(fz.guard_before, np.uint8)
    writable = np.zeros(REGION, dtype=bool)
    for start, end in fz.allowed_writes:
        assert ARENA_OFF <= start <= end <= ARENA_END, (start, end)
        writable[start:end] = True
    changed = np.flatnonzero((after != before) & ~writable)
    assert changed.size == 0, f"bytes outside every given arena changed: {changed[:20]}"
    assert np.array_equal(after[:ARENA_OFF], before[:ARENA_OFF])  # guard + every input
    assert np.array_equal(after[ARENA_END:], before[ARENA_END:])
    for label, (region, snapshot) in fz.snapshots.items():
        assert bytes(region.buffer) == snapshot, f"{label} was written"
    total = sum(fz.counts[k] for k in fz.counts if "checked byte" not in k)
    record(
        "fuzz",
        generated_cases=total,
        cases_by_kind=dict(fz.counts),
        statuses=dict(fz.statuses),
        worker_alive_after=True,
        bytes_changed_outside_arenas=int(changed.size),
    )
    assert total >= MIN_CASES, fz.counts
