"""Resource limits and access control with real processes.

* a shared-memory directory too small: a clear error naming ``shm_size`` / ``--shm-size``,
  never a SIGBUS, nothing left in the directory;
* a tensor over ``--max-tensor-bytes``: RESOURCE_EXHAUSTED with the limit in the message;
* a worker at ``--max-sessions`` refuses new sessions cleanly and takes them again later;
* TCP without the right token: every RPC is UNAUTHENTICATED;
* the unix socket and every segment the worker maps are mode 0600; the worker maps only
  names with the project's prefix that the same session registered, and its messages never
  echo another session's region names.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import grpc
import pytest
import torch
from support.reliability import record
from support.workers import WorkerProcess, start_worker, stop_worker

from torch_jax_interop._wire import PROTOCOL_VERSION, SERVICE_NAME
from torch_jax_interop.client import AuthenticationError, ResourceExhaustedError, connect
from torch_jax_interop.proto.v1 import interop_pb2 as pb, interop_pb2_grpc as pb_grpc

CHECKS: dict[str, int] = {}


@pytest.fixture(scope="module", autouse=True)
def _record_checks() -> Iterator[None]:
    yield
    record("limits", checks=dict(CHECKS), limit_and_access_checks=sum(CHECKS.values()))


def _count(kind: str, n: int = 1) -> None:
    CHECKS[kind] = CHECKS.get(kind, 0) + n


# -- /dev/shm too small -----------------------------------------------------------------


@pytest.fixture
def tiny_shm(request: pytest.FixtureRequest) -> Iterator[str]:
    """A tmpfs of ``request.param`` (default 2m), mounted for the test and unmounted after."""
    size = getattr(request, "param", "2m")
    with tempfile.TemporaryDirectory(prefix="tjishm", dir="/tmp") as directory:
        try:
            mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700",
                                      "tmpfs", directory], capture_output=True, text=True)
        except FileNotFoundError:
            pytest.skip("no `mount` command here to make a small tmpfs")
        if mounted.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): "
                        f"{mounted.stderr.strip()}")
        try:
            yield directory
        finally:
            left = os.listdir(directory)
            subprocess.run(["umount", directory], check=True)
            assert left == [], f"left in the shared-memory directory: {left}"


SMALL_SHM_CLIENT = """
import json, sys, torch
from torch_jax_interop.client import _connect, connect
from torch_jax_interop._errors import InteropError
# File regions, as on a kernel without memfd sealing: sealed regions are memfds, which live
# in no directory (Note [Sealed regions] in transport/_shm.py).
_connect.sealing_supported = lambda: False
result = {}
try:
    with connect(sys.argv[1], transport=sys.argv[2], timeout=60) as w:
        result["transport"] = w.transport
        x = torch.randn(1 << 16)  # 256 KiB: shared memory when there is any
        result["small_ok"] = bool(torch.equal(w.function("identity")(x), x))
        try:
            big = torch.randn(8 << 20)  # 32 MiB: more than the directory holds
            w.function("identity")(big)
            result["big"] = "ok"
        except InteropError as error:
            result["big"] = f"{type(error).__name__}: {error}"
        result["after_ok"] = bool(torch.equal(w.function("identity")(x), x))
except InteropError as error:
    result["error"] = f"{type(error).__name__}: {error}"
print(json.dumps(result), flush=True)
"""


def _small_shm_run(short_tmp: str, directory: str, transport: str) -> dict[str, object]:
    env = {"TORCH_JAX_INTEROP_SHM_DIR": directory}
    worker = start_worker(short_tmp, env=env, extra=["--allow-unsealed-regions"])
    try:
        done = subprocess.run([sys.executable, "-c", SMALL_SHM_CLIENT, worker.address,
                               transport], capture_output=True, text=True, timeout=300,
                              env={**os.environ, **env})
    finally:
        assert stop_worker(worker) == 0, worker.log()
    assert done.returncode == 0, (done.returncode, done.stderr[-3000:])  # -7 would be SIGBUS
    assert os.listdir(directory) == []
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_shm_directory_too_small_for_any_region(short_tmp: str, tiny_shm: str) -> None:
    result = _small_shm_run(short_tmp, tiny_shm, "shm")
    error = str(result.get("error"))
    assert error.startswith("TransportError"), result
    assert "shm_size" in error and "--shm-size" in error, error
    assert tiny_shm in error  # says which directory is too small
    _count("shared memory directory too small (no region fits)")


def test_shm_directory_too_small_falls_back_to_inline_with_auto(short_tmp: str,
                                                               tiny_shm: str) -> None:
    result = _small_shm_run(short_tmp, tiny_shm, "auto")
    assert result == {"transport": "inline", "small_ok": True, "after_ok": True,
                      "big": "ok"}, result
    _count("shared memory directory too small (auto falls back to inline)")


@pytest.mark.parametrize("tiny_shm", ["12m"], indirect=True)
def test_shm_directory_full_for_a_big_tensor(short_tmp: str, tiny_shm: str) -> None:
    """Room for the first 8 MiB region, not for a 32 MiB one: that call fails clearly, and
    the session keeps working with what fits."""
    result = _small_shm_run(short_tmp, tiny_shm, "shm")
    assert result["transport"] == "shared memory" and result["small_ok"], result
    big = str(result["big"])
    assert big.startswith("SharedMemoryFullError"), big
    assert "shm_size" in big and "--shm-size" in big, big
    assert result["after_ok"], result
    _count("shared memory directory full (pool cannot grow)")


# -- size limit, session cap ------------------------------------------------------------


@pytest.fixture(scope="module")
def capped_worker() -> Iterator[WorkerProcess]:
    with tempfile.TemporaryDirectory(prefix="tji", dir="/tmp") as tmp:
        worker = start_worker(tmp, extra=["--max-tensor-bytes", "4m", "--max-sessions", "2"])
        try:
            yield worker
        finally:
            assert stop_worker(worker) == 0, worker.log()


@pytest.mark.parametrize("transport", ["shm", "inline"])
def test_tensor_over_the_limit_is_resource_exhausted(capped_worker: WorkerProcess,
                                                     transport: str) -> None:
    with connect(capped_worker.address, transport=transport, timeout=60) as w:
        assert w.transport == ("shared memory" if transport == "shm" else "inline")
        at_limit = torch.zeros(1 << 20)  # exactly 4 MiB: allowed
        assert torch.equal(w.function("identity")(at_limit), at_limit)
        with pytest.raises(ResourceExhaustedError, match=r"4194304 bytes \(--max-tensor-bytes"):
            w.function("identity")(torch.zeros((1 << 20) + 16))
        assert torch.equal(w.function("add_one")(torch.zeros(2)), torch.ones(2))
    _count("tensor over --max-tensor-bytes")


def test_worker_at_its_session_cap_refuses_new_sessions(capped_worker: WorkerProcess) -> None:
    first = connect(capped_worker.address, timeout=30)
    try:
        with connect(capped_worker.address, timeout=30) as second:
            with pytest.raises(ResourceExhaustedError, match="session cap.*--max-sessions"):
                connect(capped_worker.address, timeout=30)
            channel = grpc.insecure_channel(capped_worker.address)
            try:
                stream = pb_grpc.JaxWorkerServiceStub(channel).OpenSession(
                    pb.OpenSessionRequest(protocol_version=PROTOCOL_VERSION))
                with pytest.raises(grpc.RpcError) as caught:
                    next(stream)
                assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            finally:
                channel.close()
            # The sessions already open are unaffected.
            assert torch.equal(second.function("add_one")(torch.zeros(2)), torch.ones(2))
            assert torch.equal(first.function("add_one")(torch.ones(2)), 2 * torch.ones(2))
    finally:
        first.close()
    _count("session over --max-sessions")
    # Closed sessions free their places (the worker notices within a second or so).
    clients: list = []
    deadline = time.monotonic() + 15
    try:
        while len(clients) < 2:
            try:
                clients.append(connect(capped_worker.address, timeout=30))
            except ResourceExhaustedError:
                assert time.monotonic() < deadline, "closed sessions were not given back"
                time.sleep(0.2)
        for client in clients:
            assert torch.equal(client.function("add_one")(torch.zeros(1)), torch.ones(1))
    finally:
        for client in clients:
            client.close()


# -- access control ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tcp_worker() -> Iterator[WorkerProcess]:
    with tempfile.TemporaryDirectory(prefix="tji", dir="/tmp") as tmp:
        worker = start_worker(tmp, tcp=True, token="the-right-token")
        try:
            yield worker
        finally:
            assert stop_worker(worker) == 0, worker.log()


_REQUESTS = {
    "OpenSession": pb.OpenSessionRequest(protocol_version=PROTOCOL_VERSION, client_pid=1),
    "RegisterRegion": pb.RegisterRegionRequest(
        session_id="x",
        shared_memory=pb.SharedMemoryRegion(name="tji-1-0000000000000000", size=4096)),
    "ReleaseRegion": pb.ReleaseRegionRequest(session_id="x", region_id=1),
    "ListFunctions": pb.ListFunctionsRequest(),
    "Call": pb.CallRequest(session_id="x", function="identity"),
    "Backward": pb.BackwardRequest(session_id="x", residual_id=1),
    "Release": pb.ReleaseRequest(session_id="x", residual_ids=[1]),
}


@pytest.mark.parametrize("metadata", [(), (("authorization", "Bearer wrong"),),
                                      (("authorization", "the-right-token"),),
                                      (("authorization", "Bearer the-right-token "),),
                                      (("x-token", "Bearer the-right-token"),)],
                         ids=["none", "wrong", "no-bearer", "trailing-space", "other-header"])
def test_tcp_without_the_right_token_refuses_every_rpc(tcp_worker: WorkerProcess,
                                                       metadata: tuple) -> None:
    assert tcp_worker.tcp_address is not None
    with grpc.insecure_channel(tcp_worker.tcp_address) as channel:
        for method, request in _REQUESTS.items():
            for payload in (request.SerializeToString(), b"\xff\xfe garbage"):
                path = f"/{SERVICE_NAME}/{method}"
                with pytest.raises(grpc.RpcError) as caught:
                    if method == "OpenSession":
                        stream = channel.unary_stream(path)(payload, metadata=metadata,
                                                           timeout=30)
                        next(stream)
                    else:
                        channel.unary_unary(path)(payload, metadata=metadata, timeout=30)
                assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, (method,
                                                                                  metadata)
                assert "token" in caught.value.details()
                _count("RPC without the right token", 1)
    assert tcp_worker.process.poll() is None


def test_tcp_with_the_token_works_and_connect_without_it_fails(
        tcp_worker: WorkerProcess) -> None:
    assert tcp_worker.tcp_address is not None
    with pytest.raises(AuthenticationError, match="token"):
        connect(tcp_worker.tcp_address, transport="inline", timeout=30)
    with connect(tcp_worker.tcp_address, token="the-right-token", transport="inline") as w:
        assert "identity" in {f.name for f in w.functions()}
        assert torch.equal(w.function("add_one")(torch.zeros(2)), torch.ones(2))


def _worker_segments(pid: int) -> dict[str, os.stat_result]:
    """The shared-memory segments the process maps: name -> stat of the mapped file."""
    found: dict[str, os.stat_result] = {}
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            match = re.search(r"(?:/dev/shm/|/memfd:)(tji-\S+)", line)  # files, sealed memfds
            if match:
                address = line.split()[0]
                found[match.group(1)] = os.stat(f"/proc/{pid}/map_files/{address}")
    return found


def test_socket_and_every_segment_are_private(tcp_worker: WorkerProcess) -> None:
    assert tcp_worker.socket_path is not None
    assert stat.S_IMODE(os.stat(tcp_worker.socket_path).st_mode) == 0o600
    with connect(tcp_worker.address, transport="shm", timeout=60) as w:
        for numel in (1 << 15, 1 << 18, 3 << 20, 5 << 20):  # the pool grows to several regions
            x = torch.randn(numel)
            assert torch.equal(w.function("identity")(x), x)
        try:
            segments = _worker_segments(tcp_worker.process.pid)
        except PermissionError as error:
            pytest.skip(f"cannot read /proc/PID/map_files here: {error}")
        assert len(segments) >= 2, segments
        for name, st in segments.items():
            assert name.startswith(f"tji-{os.getpid()}-"), name
            assert stat.S_IMODE(st.st_mode) == 0o600, (name, oct(st.st_mode))
            assert st.st_uid == os.getuid()
        _count("segments checked for mode 0600", len(segments))
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"tji-{os.getpid()}-")]


def test_only_prefixed_names_of_the_same_session_are_mapped(tcp_worker: WorkerProcess) -> None:
    """Session B learns nothing of session A's regions: it cannot map them by name (the
    client unlinked the names once registered), its ids do not reach them, and no error
    message it gets names them. Files without the project's prefix are never mapped."""
    plain = os.path.join("/dev/shm", f"psm-{os.getpid()}-0123456789abcdef")
    fd = os.open(plain, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    os.ftruncate(fd, 4096)
    os.close(fd)
    try:
        with connect(tcp_worker.address, transport="shm", timeout=60) as owner:
            x = torch.randn(1 << 18)
            assert torch.equal(owner.function("identity")(x), x)
            a_names = [n for n in _worker_segments(tcp_worker.process.pid)]
            assert a_names
            channel = grpc.insecure_channel(tcp_worker.address)
            stub = pb_grpc.JaxWorkerServiceStub(channel)
            stream = stub.OpenSession(pb.OpenSessionRequest(protocol_version=PROTOCOL_VERSION,
                                                            client_pid=os.getpid()))
            try:
                intruder = next(stream).session_id
                details: list[str] = []
                for name in (*a_names, os.path.basename(plain), "tji_1_0123456789abcdef"):
                    with pytest.raises(grpc.RpcError) as caught:
                        stub.RegisterRegion(pb.RegisterRegionRequest(
                            session_id=intruder,
                            shared_memory=pb.SharedMemoryRegion(name=name, size=4096)),
                            timeout=30)
                    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                for region_id in range(1, 6):
                    for offset in (0, 64, 4096):
                        where = pb.SharedMemorySlice(region_id=region_id, offset=offset,
                                                     nbytes=16)
                        request = pb.CallRequest(session_id=intruder, function="identity")
                        request.args.nodes.add(kind=pb.TreeNode.KIND_TUPLE, num_children=1)
                        request.args.nodes.add(kind=pb.TreeNode.KIND_LEAF)
                        request.args.leaves.add(dtype=pb.DTYPE_FLOAT32, shape=[4], shm=where)
                        as_arena = pb.CallRequest()
                        as_arena.CopyFrom(request)
                        as_arena.args.leaves[0].ClearField("shm")
                        as_arena.args.leaves[0].inline_data = bytes(16)
                        as_arena.output_arena.shm.CopyFrom(where)
                        for rpc, message in ((stub.Call, request), (stub.Call, as_arena),
                                             (stub.ReleaseRegion, pb.ReleaseRegionRequest(
                                                 session_id=intruder, region_id=region_id))):
                            with pytest.raises(grpc.RpcError) as caught:
                                rpc(message, timeout=30)
                            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                            details.append(caught.value.details())
                for text in details:
                    for name in a_names:
                        assert name not in text, text
                _count("foreign region accesses refused", len(details) + len(a_names) + 2)
            finally:
                stream.cancel()
                channel.close()
            mapped = _worker_segments(tcp_worker.process.pid)
            assert os.path.basename(plain) not in mapped
            assert all(n.startswith("tji-") for n in mapped), mapped
            assert torch.equal(owner.function("identity")(x), x)  # the owner is unaffected
    finally:
        os.unlink(plain)
