"""A worker the client does not have to trust: a real gRPC server in the test speaks the
protocol but answers with crafted replies. The client decides its own shared-memory
directory, caps the arena a worker may ask for, and refuses malformed replies with
``MalformedReplyError`` naming what was wrong (never a raw torch or Python error)."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
import torch

from torch_jax_interop import _wire
from torch_jax_interop.client import connect
from torch_jax_interop.errors import MalformedReplyError, TransportError
from torch_jax_interop.proto.v1 import interop_pb2 as pb, interop_pb2_grpc as pb_grpc

Reply = Callable[[Any], Any]


def _leaf_tree(*leaves: Any) -> pb.Tree:
    tree = pb.Tree()
    if len(leaves) == 1:
        tree.nodes.add(kind=pb.TreeNode.KIND_LEAF)
    else:
        tree.nodes.add(kind=pb.TreeNode.KIND_TUPLE, num_children=len(leaves))
        for _ in leaves:
            tree.nodes.add(kind=pb.TreeNode.KIND_LEAF)
    tree.leaves.extend(leaves)
    return tree


class _CraftedWorker(pb_grpc.JaxWorkerServiceServicer):
    """Opens a same-host session naming ``shm_directory``; registers any region (recording
    where its file was); answers each Call with ``reply(request)``."""

    def __init__(self, shm_directory: str, reply: Reply) -> None:
        self.shm_directory = shm_directory
        self.reply = reply
        self.region_names: list[str] = []
        self.region_paths: list[str] = []
        self.calls: list[Any] = []

    def OpenSession(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        yield pb.OpenSessionResponse(
            session_id="s", worker_pid=os.getpid(), boot_id=_wire.boot_id(),
            shm_directory=self.shm_directory, max_inline_bytes=64 << 20,
            protocol_version=_wire.PROTOCOL_VERSION)
        while context.is_active():  # the session lasts as long as the client's stream
            time.sleep(0.05)

    def RegisterRegion(self, request: Any, context: grpc.ServicerContext) -> Any:
        name = request.shared_memory.name
        self.region_names.append(name)
        for directory in ("/dev/shm", self.shm_directory):
            if os.path.exists(os.path.join(directory, name)):
                self.region_paths.append(os.path.join(directory, name))
        return pb.RegisterRegionResponse(region_id=len(self.region_names))

    def ReleaseRegion(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb.ReleaseRegionResponse()

    def Call(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.calls.append(request)
        return self.reply(request)


@pytest.fixture
def crafted() -> Iterator[Callable[[Reply], tuple[_CraftedWorker, str]]]:
    with tempfile.TemporaryDirectory(prefix="tji", dir="/tmp") as tmp:
        servers: list[grpc.Server] = []

        def make(reply: Reply) -> tuple[_CraftedWorker, str]:
            n = len(servers)
            servicer = _CraftedWorker(os.path.join(tmp, f"disk{n}"), reply)
            os.mkdir(servicer.shm_directory)
            server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
            pb_grpc.add_JaxWorkerServiceServicer_to_server(servicer, server)
            address = f"unix://{tmp}/s{n}.sock"
            assert server.add_insecure_port(address)
            server.start()
            servers.append(server)
            return servicer, address

        try:
            yield make
        finally:
            for server in servers:
                server.stop(None).wait(10)


def _arena_reply(outputs: Callable[[pb.SharedMemorySlice], list[pb.Tensor]],
                 need: int = 4096) -> Reply:
    """Asks for an arena of ``need`` bytes, then answers with ``outputs(arena)``."""
    def reply(request: Any) -> Any:
        if not request.HasField("output_arena"):
            return pb.CallResponse(required_output_bytes=need)
        return pb.CallResponse(outputs=_leaf_tree(*outputs(request.output_arena.shm)))
    return reply


def _at(arena: pb.SharedMemorySlice, offset: int, nbytes: int) -> pb.SharedMemorySlice:
    return pb.SharedMemorySlice(region_id=arena.region_id, offset=arena.offset + offset,
                                nbytes=nbytes)


def _f32(shape: list[int], **location: Any) -> pb.Tensor:
    return pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=shape, **location)


def test_the_client_ignores_the_workers_shared_memory_directory(crafted) -> None:  # noqa: ANN001
    servicer, address = crafted(_arena_reply(lambda a: [_f32([4], shm=_at(a, 0, 16))]))
    with connect(address, timeout=10, transport="shm") as w:
        out = w.function("f")(torch.ones(4))
        assert out.shape == (4,)
    # Sealed regions are memfds (no file anywhere); unsealed ones are files in /dev/shm.
    assert servicer.region_names, "no region was registered"
    assert all(p.startswith("/dev/shm/") for p in servicer.region_paths), servicer.region_paths
    assert os.listdir(servicer.shm_directory) == []


def test_an_arena_larger_than_the_client_allows_is_refused(crafted) -> None:  # noqa: ANN001
    servicer, address = crafted(_arena_reply(lambda a: [_f32([4], shm=_at(a, 0, 16))],
                                             need=2 << 30))
    with connect(address, timeout=10, transport="shm") as w:
        with pytest.raises(TransportError, match=r"max_arena_bytes"):
            w.function("f")(torch.ones(4))  # a 16-byte call; the default cap is 1 GiB
        assert len(servicer.calls) == 1  # no second call with a 2 GiB arena
        assert w._session.pool.total_bytes < 64 << 20
    servicer, address = crafted(_arena_reply(lambda a: [_f32([4], shm=_at(a, 0, 16))],
                                             need=1 << 20))
    with connect(address, timeout=10, transport="shm", max_arena_bytes=64 << 10) as w:
        with pytest.raises(TransportError, match=r"1048576-byte output arena .* \(65536 bytes\)"):
            w.function("f")(torch.ones(4))


MALFORMED: list[tuple[str, Callable[[pb.SharedMemorySlice], list[pb.Tensor]], str]] = [
    ("unknown dtype", lambda a: [pb.Tensor(dtype=999, shape=[1], inline_data=b"1234")],
     r"malformed output 0 \(dtype 999"),
    ("impossible shape", lambda a: [_f32([2**40, 2**40, 2**40], inline_data=b"")],
     r"malformed output 0 .*overflows 64 bits"),
    ("too many dimensions", lambda a: [_f32([1] * 100, inline_data=b"1234")],
     r"malformed output 0 .*dimensions"),
    ("short inline bytes", lambda a: [_f32([4], inline_data=b"123")],
     r"3 inline bytes for output 0 of shape \[4\] .* needs 16"),
    ("bytes for an empty tensor", lambda a: [_f32([0, 4], inline_data=b"1234")],
     r"4 bytes for the empty output 0"),
    ("outside the arena", lambda a: [_f32([4], shm=_at(a, 4096 - 8, 16))],
     r"output 0 outside the output arena"),
    ("another region", lambda a: [_f32([4], shm=pb.SharedMemorySlice(
        region_id=a.region_id + 7, offset=a.offset, nbytes=16))],
     r"output 0 outside the output arena"),
    ("no location", lambda a: [_f32([4])], r"output 0 with location `None`"),
    ("same bytes twice", lambda a: [_f32([4], shm=_at(a, 0, 16)),
                                    _f32([4], shm=_at(a, 0, 16))],
     r"output 1 on arena bytes \[0, 16\) that another output"),
    ("overlapping bytes", lambda a: [_f32([4], shm=_at(a, 64, 16)),
                                     _f32([8], shm=_at(a, 40, 32))],
     r"output 1 on arena bytes \[40, 72\) that another output"),
]


@pytest.mark.parametrize(("outputs", "message"), [(o, m) for _, o, m in MALFORMED],
                         ids=[name for name, _, _ in MALFORMED])
def test_malformed_replies_are_refused_with_what_was_wrong(
        crafted, outputs: Callable[[pb.SharedMemorySlice], list[pb.Tensor]],  # noqa: ANN001
        message: str) -> None:
    _, address = crafted(_arena_reply(outputs))
    with connect(address, timeout=10, transport="shm") as w:
        with pytest.raises(MalformedReplyError, match=message):
            w.function("f")(torch.ones(4))
        pool = w._session.pool
        assert pool is not None and pool.used_bytes == 0  # the arena went back


def test_a_malformed_structure_is_refused(crafted) -> None:  # noqa: ANN001
    def reply(request: Any) -> Any:
        response = pb.CallResponse()
        response.outputs.nodes.add(kind=pb.TreeNode.KIND_TUPLE, num_children=3)
        response.outputs.leaves.add(dtype=pb.DTYPE_FLOAT32, shape=[1], inline_data=b"1234")
        return response

    _, address = crafted(reply)
    with connect(address, timeout=10, transport="inline") as w:
        with pytest.raises(MalformedReplyError, match="malformed output structure"):
            w.function("f")(torch.ones(4))
