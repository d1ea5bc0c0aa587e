"""Hostile peers of the same host, with real workers, real gRPC and real shared memory.

A session cannot register another session's region (Note [Regions belong to one session]);
a peer that truncates its registered region does not crash the worker (Note [Sealed
regions]); an abstract socket needs the token; the worker refuses a socket directory that
other users can write.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from support.workers import WorkerProcess, start_worker

from torch_jax_interop._wire import PROTOCOL_VERSION
from torch_jax_interop.errors import UntrustedSocketError
from torch_jax_interop.proto.v1 import interop_pb2 as pb, interop_pb2_grpc as pb_grpc
from torch_jax_interop.transport import SharedMemoryRegion, region_tag


class _Peer:
    """A raw session on a worker: a stub, its metadata and the session id."""

    def __init__(self, address: str, token: str | None = None) -> None:
        self.channel = grpc.insecure_channel(address)
        self.stub = pb_grpc.JaxWorkerServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.stream = self.stub.OpenSession(pb.OpenSessionRequest(
            protocol_version=PROTOCOL_VERSION, client_pid=os.getpid(),
            transport=pb.TRANSPORT_SHARED_MEMORY), metadata=self.metadata)
        self.session = next(self.stream).session_id

    def register(self, name: str, size: int) -> int:
        reply = self.stub.RegisterRegion(pb.RegisterRegionRequest(
            session_id=self.session,
            shared_memory=pb.SharedMemoryRegion(name=name, size=size)),
            timeout=30, metadata=self.metadata)
        return int(reply.region_id)

    def call(self, function: str, tensor: pb.Tensor,
             arena: pb.SharedMemorySlice | None = None) -> pb.CallResponse:
        request = pb.CallRequest(session_id=self.session, function=function)
        request.args.nodes.add(kind=pb.TreeNode.KIND_TUPLE, num_children=1)
        request.args.nodes.add(kind=pb.TreeNode.KIND_LEAF)
        request.args.leaves.append(tensor)
        request.kwargs.nodes.add(kind=pb.TreeNode.KIND_DICT)
        if arena is not None:
            request.output_arena.shm.CopyFrom(arena)
        return self.stub.Call(request, timeout=30, metadata=self.metadata)

    def close(self) -> None:
        self.stream.cancel()
        self.channel.close()


@pytest.fixture
def victim(worker: WorkerProcess) -> Iterator[_Peer]:
    peer = _Peer(worker.address)
    yield peer
    peer.close()


def test_a_region_registers_only_in_the_session_that_created_it(
        worker: WorkerProcess, victim: _Peer) -> None:
    """Finding 3: another session (unix socket, or TCP with the token) sees the victim's
    fresh region in /dev/shm before the victim unlinks it and registers it: refused."""
    region = SharedMemoryRegion.create(1 << 20, tag=region_tag(victim.session), sealed=True)
    try:
        data = np.arange(1024, dtype=np.float32)
        np.frombuffer(region.buffer, np.float32)[: data.size] = data
        assert worker.tcp_address is not None
        for address, token in ((worker.address, None), (worker.tcp_address, worker.token)):
            attacker = _Peer(address, token)
            try:
                with pytest.raises(grpc.RpcError, match="not created for this session") as caught:
                    attacker.register(region.name, region.size)
                assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                # An untagged name (the old form) is refused the same way.
                untagged = region.name.replace(f"-{region_tag(victim.session)}-", "-")
                with pytest.raises(grpc.RpcError, match="not created for this session"):
                    attacker.register(untagged, region.size)
                # Nothing got mapped: region 1 does not exist in the attacker's session.
                stolen = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[1024],
                                   shm=pb.SharedMemorySlice(region_id=1, offset=0,
                                                            nbytes=4096))
                with pytest.raises(grpc.RpcError, match="not registered in this session"):
                    attacker.call("identity", stolen)
            finally:
                attacker.close()
        # The victim's own registration works and reads its data.
        region_id = victim.register(region.name, region.size)
        region.unlink()
        tensor = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[1024], shm=pb.SharedMemorySlice(
            region_id=region_id, offset=0, nbytes=4096))
        reply = victim.call("add_one", tensor)
        out = reply.outputs.leaves[0]
        got = np.frombuffer(out.inline_data, np.float32) if out.inline_data else None
        if got is None:
            got = np.frombuffer(region.buffer, np.float32, count=1024, offset=out.shm.offset)
        assert np.array_equal(got, data + 1)
    finally:
        region.unlink()
        region.close()


def test_an_abstract_socket_is_refused(short_tmp: str) -> None:
    """Finding 4: `unix-abstract:` has no owner and no permissions, and grpc Python shows no
    peer credentials: any local user could call functions without a token. Refused."""
    name = f"unix-abstract:tji-test-{os.getpid()}"
    with pytest.raises(RuntimeError, match="abstract unix sockets are refused"):
        start_worker(short_tmp, extra=["--listen", name])
    from torch_jax_interop.server import create_server

    with pytest.raises(UntrustedSocketError, match="abstract unix socket"):
        create_server({"f": "support.served:identity"}, [name], token="a-token")


def _nobody() -> int:
    return pwd.getpwnam("nobody").pw_uid


@pytest.mark.parametrize("how", ["mode 0777", "owned by nobody"])
def test_a_socket_directory_others_can_write_is_refused(short_tmp: str, how: str) -> None:
    """Finding 5: a directory another user made first (or can write) lets that user swap
    the socket. The worker refuses to listen there and creates nothing in it."""
    directory = os.path.join(short_tmp, "d")
    os.mkdir(directory, 0o700)
    if how == "mode 0777":
        os.chmod(directory, 0o777)
        problem = "its mode is 0777: group or others can write it"
    else:
        if os.getuid() != 0:
            pytest.skip("chown to another uid needs root")
        os.chown(directory, _nobody(), -1)
        problem = f"it belongs to uid {_nobody()}"
    with pytest.raises(RuntimeError, match=f"is not private \\({problem}"):
        start_worker(directory)
    assert not os.path.exists(os.path.join(directory, "w.sock"))


def _open_own_memfd(name: str) -> int:
    """What a hostile peer of the same uid does: reopen the region through /proc."""
    for entry in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{entry}") == f"/memfd:{name} (deleted)":
                return os.open(f"/proc/self/fd/{entry}", os.O_RDWR)
        except OSError:
            continue
    raise AssertionError(f"no memfd {name}")


def test_a_peer_cannot_shrink_a_region_under_the_worker(
        worker: WorkerProcess, victim: _Peer) -> None:
    """Finding 1: a peer that shrinks its registered region must not kill the worker with
    SIGBUS (input read and output-arena write). Regions are sealed memfds: the shrink is
    refused by the kernel; an unsealed region (a file, or a memfd without F_SEAL_SHRINK) is
    refused by the worker; both paths keep working and other sessions keep being served."""
    peer = _Peer(worker.address)
    tag = region_tag(peer.session)
    region = SharedMemoryRegion.create(1 << 20, tag=tag, sealed=True)
    try:
        data = np.arange(1 << 16, dtype=np.float32)  # 256 KiB: the output goes to the arena
        np.frombuffer(region.buffer, np.float32)[: data.size] = data
        region_id = peer.register(region.name, region.size)
        fd = _open_own_memfd(region.name)
        try:
            for size in (0, 4096):
                with pytest.raises(PermissionError):
                    os.ftruncate(fd, size)
            assert os.fstat(fd).st_size == 1 << 20
        finally:
            os.close(fd)
        region.unlink()
        # Input read from the region, output written to an arena in the same region.
        shm_input = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[data.size],
                              shm=pb.SharedMemorySlice(region_id=region_id, offset=0,
                                                       nbytes=data.nbytes))
        arena = pb.SharedMemorySlice(region_id=region_id, offset=data.nbytes,
                                     nbytes=(1 << 20) - data.nbytes)
        reply = peer.call("add_one", shm_input, arena)
        out = reply.outputs.leaves[0].shm
        assert out.region_id == region_id
        got = np.frombuffer(region.buffer, np.float32, count=data.size, offset=out.offset)
        assert np.array_equal(got, data + 1)
        # A small inline input whose large output goes to the arena.
        inline = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[data.size],
                           inline_data=data.tobytes())
        assert peer.call("identity", inline, arena).outputs.leaves[0].shm.nbytes == data.nbytes

        # Regions a peer could shrink are refused before they are mapped.
        memfd = os.memfd_create(f"tji-{os.getpid()}-{tag}-{os.urandom(8).hex()}",
                                os.MFD_ALLOW_SEALING)
        plain = f"tji-{os.getpid()}-{tag}-{os.urandom(8).hex()}"
        plain_fd = os.open(f"/dev/shm/{plain}", os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(memfd, 1 << 20)
            os.ftruncate(plain_fd, 1 << 20)
            memfd_name = os.readlink(f"/proc/self/fd/{memfd}")[len("/memfd:"):-len(" (deleted)")]
            with pytest.raises(grpc.RpcError, match="not sealed against shrinking") as caught:
                peer.register(memfd_name, 1 << 20)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(grpc.RpcError, match="not a sealed memfd.*--allow-unsealed"):
                peer.register(plain, 1 << 20)
        finally:
            os.close(memfd)
            os.close(plain_fd)
            os.unlink(f"/dev/shm/{plain}")
        # The worker is up and serves the other session.
        assert worker.process.poll() is None
        one = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[1], inline_data=b"\0\0\x80?")
        assert victim.call("identity", one).outputs.leaves[0].inline_data == b"\0\0\x80?"
    finally:
        region.unlink()
        region.close()
        peer.close()


def test_a_client_without_sealed_regions_gets_inline_bytes_not_an_unsafe_mapping(
        worker: WorkerProcess, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Where the worker cannot take a sealed region (here: a client that cannot make one),
    it refuses the file region a peer could shrink; `auto` falls back to inline bytes and
    says why, `shm` raises."""
    import torch

    from torch_jax_interop.client import _connect, connect
    from torch_jax_interop.errors import TransportError

    monkeypatch.setattr(_connect, "sealing_supported", lambda: False)
    with pytest.raises(TransportError, match="not a sealed memfd.*--allow-unsealed-regions"):
        connect(worker.address, transport="shm", timeout=30)
    with caplog.at_level("WARNING"), connect(worker.address, timeout=30) as w:
        assert w.transport == "inline"
        x = torch.randn(1 << 16)
        assert torch.equal(w.function("identity")(x), x)
    assert "not a sealed memfd" in caplog.text
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"tji-{os.getpid()}-")]
