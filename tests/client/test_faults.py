"""Faults with real processes: dead workers, deadlines, draining, killed clients, bad requests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
import torch
from support.workers import WorkerProcess, start_worker, stop_worker

from torch_jax_interop._wire import PROTOCOL_VERSION
from torch_jax_interop.client import (
    DeadlineExceededError,
    InvalidArgumentError,
    WorkerUnavailableError,
    connect,
)
from torch_jax_interop.proto.v1 import interop_pb2 as pb, interop_pb2_grpc as pb_grpc


def _segments_of(pid: int) -> list[str]:
    return [n for n in os.listdir("/dev/shm") if n.startswith(f"tji-{pid}-")]


def test_deadline_gives_a_clear_error_and_the_worker_keeps_serving(
        fresh_worker: WorkerProcess) -> None:
    with connect(fresh_worker.address, timeout=0.5) as w:
        start = time.monotonic()
        with pytest.raises(DeadlineExceededError, match="timeout="):
            w.function("slow_identity")(torch.ones(3))
        assert time.monotonic() - start < 5
    with connect(fresh_worker.address, timeout=30) as w:
        assert torch.equal(w.function("add_one")(torch.zeros(2)), torch.ones(2))


def test_worker_killed_mid_call_gives_an_error_within_the_deadline(
        fresh_worker: WorkerProcess) -> None:
    with connect(fresh_worker.address, timeout=20) as w:
        w.function("identity")(torch.ones(2))  # connected and warm
        threading.Timer(0.5, fresh_worker.process.kill).start()
        start = time.monotonic()
        with pytest.raises(WorkerUnavailableError, match="worker"):
            w.function("slow_identity")(torch.ones(3))
        assert time.monotonic() - start < 20
        # A worker that is gone for good: the next call fails within the deadline too.
        with pytest.raises(WorkerUnavailableError):
            w.function("identity")(torch.ones(2))


def test_client_reconnects_when_a_worker_comes_back(short_tmp: str) -> None:
    first = start_worker(short_tmp)
    with connect(first.address, timeout=30) as w:
        x = torch.randn(1 << 16)
        assert torch.equal(w.function("identity")(x), x)
        first.process.kill()
        first.process.wait()
        with pytest.raises(WorkerUnavailableError):
            w.function("identity")(x)
        second = start_worker(short_tmp)
        try:
            assert torch.equal(w.function("identity")(x), x)
            assert w.transport == "shared memory"
        finally:
            assert stop_worker(second) == 0


def test_sigterm_drains_in_flight_calls_and_exits_zero(fresh_worker: WorkerProcess) -> None:
    results: list[object] = []
    with connect(fresh_worker.address, timeout=30) as w:
        f = w.function("slow_identity")

        def call() -> None:
            try:
                results.append(f(torch.arange(4.0)))
            except Exception as error:  # recorded and asserted below
                results.append(error)

        thread = threading.Thread(target=call)
        thread.start()
        time.sleep(0.7)  # the call is running in the worker
        fresh_worker.process.send_signal(signal.SIGTERM)
        thread.join(30)
    assert fresh_worker.process.wait(timeout=30) == 0
    assert len(results) == 1 and isinstance(results[0], torch.Tensor), results
    assert torch.equal(results[0], torch.arange(4.0))
    assert "draining" in fresh_worker.log()


CLIENT_SCRIPT = """
import sys, time, torch
from torch_jax_interop.client import connect
w = connect(sys.argv[1], transport="shm")
big = torch.randn(1 << 20)
assert torch.equal(w.function("identity")(big), big)
print("ready", flush=True)
w.function("slow_identity")(big)
"""


def test_killed_client_leaves_no_segment_and_the_worker_serves_others(
        fresh_worker: WorkerProcess) -> None:
    client = subprocess.Popen([sys.executable, "-c", CLIENT_SCRIPT, fresh_worker.address],
                              stdout=subprocess.PIPE, text=True)
    assert client.stdout is not None
    assert client.stdout.readline().strip() == "ready"
    time.sleep(0.3)  # inside the slow call
    client.kill()
    client.wait()
    client.stdout.close()
    assert _segments_of(client.pid) == []
    deadline = time.monotonic() + 10
    while "ended: residuals and mappings dropped" not in fresh_worker.log():
        assert time.monotonic() < deadline, fresh_worker.log()
        time.sleep(0.1)
    with connect(fresh_worker.address, timeout=30) as w:
        x = torch.randn(1 << 18)
        assert torch.equal(w.function("identity")(x), x)
    assert fresh_worker.process.poll() is None


def test_closed_client_leaves_no_segment(fresh_worker: WorkerProcess) -> None:
    with connect(fresh_worker.address, transport="shm") as w:
        w.function("identity")(torch.randn(1 << 20))
    assert _segments_of(os.getpid()) == []


# -- requests a normal client never sends -----------------------------------------------


@pytest.fixture
def raw(fresh_worker: WorkerProcess):  # noqa: ANN201
    """A raw stub and an open session, to send hand-made (malformed) requests."""
    channel = grpc.insecure_channel(fresh_worker.address)
    stub = pb_grpc.JaxWorkerServiceStub(channel)
    stream = stub.OpenSession(pb.OpenSessionRequest(protocol_version=PROTOCOL_VERSION,
                                                    client_pid=os.getpid()))
    session = next(stream).session_id
    yield stub, session
    stream.cancel()
    channel.close()


def _call(stub: pb_grpc.JaxWorkerServiceStub, session: str,
          tensor: pb.Tensor) -> pb.CallResponse:
    request = pb.CallRequest(session_id=session, function="identity")
    request.args.nodes.add(kind=pb.TreeNode.KIND_TUPLE, num_children=1)
    request.args.nodes.add(kind=pb.TreeNode.KIND_LEAF)
    request.args.leaves.append(tensor)
    request.kwargs.nodes.add(kind=pb.TreeNode.KIND_DICT)
    return stub.Call(request, timeout=30)


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        (pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[4], inline_data=b"123"), "needs 16 bytes"),
        (pb.Tensor(dtype=99, shape=[1], inline_data=b"1234"), "unknown dtype"),
        (pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[2**40, 2**40], inline_data=b""),
         "larger than"),
        (pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[4],
                   shm=pb.SharedMemorySlice(region_id=7, offset=0, nbytes=16)),
         "not registered in this session"),
        (pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[4]), "no location"),
    ],
)
def test_malformed_tensors_are_invalid_argument(raw, tensor: pb.Tensor, message: str) -> None:  # noqa: ANN001
    stub, session = raw
    with pytest.raises(grpc.RpcError) as caught:
        _call(stub, session, tensor)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in caught.value.details()
    ok = _call(stub, session,
               pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[1], inline_data=b"\0\0\x80?"))
    assert ok.outputs.leaves[0].inline_data == b"\0\0\x80?"


def test_slices_outside_a_registered_region_are_refused(raw) -> None:  # noqa: ANN001
    from torch_jax_interop.transport import SharedMemoryRegion, region_tag

    stub, session = raw
    region = SharedMemoryRegion.create(4096, tag=region_tag(session), sealed=True)
    try:
        reply = stub.RegisterRegion(pb.RegisterRegionRequest(
            session_id=session,
            shared_memory=pb.SharedMemoryRegion(name=region.name, size=region.size)),
            timeout=30)
        bad = [
            (4096, 16, "runs past the end"),
            (64, 2**64 - 1, "holds|needs|runs past the end"),
            (4032, 128, "runs past the end"),
            (3, 16, "align"),
        ]
        for offset, nbytes, message in bad:
            count = max(1, nbytes // 4) if nbytes < 2**32 else 4
            tensor = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[count], shm=pb.SharedMemorySlice(
                region_id=reply.region_id, offset=offset, nbytes=nbytes))
            with pytest.raises(grpc.RpcError) as caught:
                _call(stub, session, tensor)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            import re
            assert re.search(message, caught.value.details()), caught.value.details()
        # A released region's id is never valid again in the session, even for the same file.
        stub.ReleaseRegion(pb.ReleaseRegionRequest(session_id=session,
                                                   region_id=reply.region_id), timeout=30)
        again = stub.RegisterRegion(pb.RegisterRegionRequest(
            session_id=session,
            shared_memory=pb.SharedMemoryRegion(name=region.name, size=region.size)),
            timeout=30)
        assert again.region_id != reply.region_id
        stale = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[4], shm=pb.SharedMemorySlice(
            region_id=reply.region_id, offset=0, nbytes=16))
        with pytest.raises(grpc.RpcError, match="not registered in this session"):
            _call(stub, session, stale)
    finally:
        region.unlink()
        region.close()


def test_foreign_region_names_are_refused_without_echoing_them(raw) -> None:  # noqa: ANN001
    stub, session = raw
    for name in ("../../etc/passwd", "psm_12345", "tji-1-0000000000000000"):
        with pytest.raises(grpc.RpcError) as caught:
            stub.RegisterRegion(pb.RegisterRegionRequest(
                session_id=session, shared_memory=pb.SharedMemoryRegion(name=name, size=4096)),
                timeout=30)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_another_sessions_region_is_not_usable(fresh_worker: WorkerProcess) -> None:
    with connect(fresh_worker.address, transport="shm") as owner:
        owner.function("identity")(torch.randn(1 << 18))
        channel = grpc.insecure_channel(fresh_worker.address)
        stub = pb_grpc.JaxWorkerServiceStub(channel)
        stream = stub.OpenSession(pb.OpenSessionRequest(protocol_version=PROTOCOL_VERSION,
                                                        client_pid=os.getpid()))
        intruder = next(stream).session_id
        try:
            tensor = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[4], shm=pb.SharedMemorySlice(
                region_id=1, offset=0, nbytes=16))
            with pytest.raises(grpc.RpcError, match="not registered in this session"):
                _call(stub, intruder, tensor)
        finally:
            stream.cancel()
            channel.close()


def test_no_grad_leaves_out_of_range_is_invalid_argument(raw) -> None:  # noqa: ANN001
    stub, session = raw
    request = pb.CallRequest(session_id=session, function="identity", keep_residuals=True,
                             no_grad_leaves=[5])
    request.args.nodes.add(kind=pb.TreeNode.KIND_TUPLE, num_children=1)
    request.args.nodes.add(kind=pb.TreeNode.KIND_LEAF)
    request.args.leaves.append(pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[1],
                                         inline_data=b"\0\0\x80?"))
    request.kwargs.nodes.add(kind=pb.TreeNode.KIND_DICT)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Call(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "no_grad_leaves names leaf 5, but the call has 1 tensor leaves" in caught.value.details()
    del request.no_grad_leaves[:]
    response = stub.Call(request, timeout=30)  # the worker is still up; now valid
    assert response.residual_id > 0


def test_unknown_session_is_refused(raw) -> None:  # noqa: ANN001
    stub, _ = raw
    with pytest.raises(grpc.RpcError, match="unknown or ended session"):
        _call(stub, "not-a-session",
              pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[0], inline_data=b""))


def test_backward_on_unknown_residual_is_invalid_argument(raw) -> None:  # noqa: ANN001
    stub, session = raw
    request = pb.BackwardRequest(session_id=session, residual_id=12345)
    request.cotangents.nodes.add(kind=pb.TreeNode.KIND_NONE)
    with pytest.raises(grpc.RpcError, match="no residuals under id 12345"):
        stub.Backward(request, timeout=30)


def test_invalid_argument_maps_to_the_projects_exception(fresh_worker: WorkerProcess) -> None:
    with connect(fresh_worker.address) as w, pytest.raises(InvalidArgumentError):
        w.function("add_one")(torch.ones(2), torch.ones(3))
