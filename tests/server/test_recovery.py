"""Peer death, beyond ``test_faults.py``: SIGKILL of the worker before and after a call,
training that resumes from the last optimizer step across a worker restart, a killed
client's mappings and residuals dropped by the worker, and region fencing (a region given
back is never written, and its stale ids are refused)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import torch
from support.reliability import record
from support.workers import WorkerProcess, start_worker, stop_worker

from torch_jax_interop._wire import PROTOCOL_VERSION
from torch_jax_interop.client import WorkerUnavailableError, connect
from torch_jax_interop.demo import build_model, synthetic_batch
from torch_jax_interop.proto.v1 import interop_pb2 as pb, interop_pb2_grpc as pb_grpc
from torch_jax_interop.transport import SharedMemoryRegion, region_tag

FAULTS: dict[str, int] = {}


@pytest.fixture(scope="module", autouse=True)
def _record_faults() -> Iterator[None]:
    yield
    record("recovery", faults_injected=sum(FAULTS.values()), faults=dict(FAULTS))


def _fault(kind: str) -> None:
    FAULTS[kind] = FAULTS.get(kind, 0) + 1


def _kill(worker: WorkerProcess) -> None:
    worker.process.send_signal(signal.SIGKILL)
    worker.process.wait()


def _segments_of(pid: int) -> list[str]:
    return [n for n in os.listdir("/dev/shm") if n.startswith(f"tji-{pid}-")]


def _mapped_segments(worker_pid: int, owner_pid: int) -> list[str]:
    """Lines of the worker's memory map that map a segment created by ``owner_pid``."""
    with open(f"/proc/{worker_pid}/maps") as f:
        # File regions, and sealed memfd regions (Note [Sealed regions] in transport/_shm.py).
        return [line for line in f if f"/dev/shm/tji-{owner_pid}-" in line
                or f"/memfd:tji-{owner_pid}-" in line]


def test_sigkill_before_a_call_gives_a_clear_error_within_the_deadline(
        fresh_worker: WorkerProcess) -> None:
    with connect(fresh_worker.address, timeout=60) as w:
        assert torch.equal(w.function("add_one")(torch.zeros(2)), torch.ones(2))
        w.timeout = 3  # the deadline under test (a loaded machine may compile slowly above)
        _kill(fresh_worker)
        _fault("worker SIGKILL between calls")
        for x in (torch.ones(2), torch.randn(1 << 18)):  # inline, and shared memory
            start = time.monotonic()
            with pytest.raises(WorkerUnavailableError, match="worker"):
                w.function("identity")(x)
            assert time.monotonic() - start < 3 * 3 + 5
    assert _segments_of(os.getpid()) == []


def test_sigkill_after_a_call_leaves_its_outputs_readable(fresh_worker: WorkerProcess) -> None:
    with connect(fresh_worker.address, transport="shm", timeout=60) as w:
        x = torch.randn(1 << 18)
        y = w.function("identity")(x)  # lands in this process's output arena
        w.timeout = 3
        _kill(fresh_worker)
        _fault("worker SIGKILL after a call")
        assert torch.equal(y, x)  # the client owns that memory: no SIGBUS, same bytes
        with pytest.raises(WorkerUnavailableError):
            w.function("identity")(x)
        assert torch.equal(y, x)
    del y
    assert _segments_of(os.getpid()) == []


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int) -> float:
    x, y = synthetic_batch(step)
    loss = torch.nn.functional.mse_loss(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


def test_training_resumes_from_the_last_optimizer_step(short_tmp: str) -> None:
    """The worker dies between forward and backward of step 3: backward raises, the
    optimizer never steps, the next forward fails within its deadline, a new worker comes
    up on the same socket, and training goes on from step 3. The parameters end exactly
    where an uninterrupted run on the new worker ends."""
    steps, crash_at = 6, 3
    first = start_worker(short_tmp)
    with connect(first.address, timeout=60) as w:
        model = build_model(w.function("mlp"), seed=0)
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        for step in range(crash_at):
            _step(model, optimizer, step)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        x, y = synthetic_batch(crash_at)
        loss = torch.nn.functional.mse_loss(model(x), y)  # forward ran in the worker
        _kill(first)
        _fault("worker SIGKILL between forward and backward")
        optimizer.zero_grad()
        with pytest.raises(WorkerUnavailableError, match="run the forward again|worker"):
            loss.backward()
        del loss
        w.timeout = 5
        start = time.monotonic()
        with pytest.raises(WorkerUnavailableError):
            _step(model, optimizer, crash_at)  # nobody serves: fails within the deadline
        assert time.monotonic() - start < 5 + 10
        w.timeout = 60
        for key, value in model.state_dict().items():
            assert torch.equal(value, before[key]), f"{key} moved without an optimizer step"
        second = start_worker(short_tmp)
        try:
            for step in range(crash_at, steps):
                _step(model, optimizer, step)
            resumed = {k: v.clone() for k, v in model.state_dict().items()}
            reference = build_model(w.function("mlp"), seed=0)
            ref_optimizer = torch.optim.Adam(reference.parameters(), lr=3e-3)
            for step in range(steps):
                _step(reference, ref_optimizer, step)
            for key, value in reference.state_dict().items():
                torch.testing.assert_close(resumed[key], value, rtol=1e-6, atol=1e-7)
        finally:
            assert stop_worker(second) == 0, second.log()
    assert _segments_of(os.getpid()) == []


CLIENT_WITH_RESIDUALS = """
import sys, time, torch
from torch_jax_interop.client import connect
w = connect(sys.argv[1], transport="shm")
params = torch.ones((), requires_grad=True)
x = torch.randn(1 << 18)  # 1 MiB: in shared memory, and kept by the worker's vjp residuals
out = w.function("scale")(params, x)
assert out.requires_grad
print("ready", flush=True)
time.sleep(600)
"""


def test_killed_client_mappings_and_residuals_are_dropped(fresh_worker: WorkerProcess) -> None:
    client = subprocess.Popen([sys.executable, "-c", CLIENT_WITH_RESIDUALS,
                               fresh_worker.address], stdout=subprocess.PIPE, text=True)
    assert client.stdout is not None
    try:
        assert client.stdout.readline().strip() == "ready"
        worker_pid = fresh_worker.process.pid
        assert _mapped_segments(worker_pid, client.pid), "the worker should map the region"
    finally:
        client.kill()
        client.wait()
        client.stdout.close()
    _fault("client SIGKILL with residuals held")
    deadline = time.monotonic() + 15
    # the worker unmaps first, then logs: wait for both
    ended = "ended: residuals and mappings dropped"
    while _mapped_segments(worker_pid, client.pid) or ended not in fresh_worker.log():
        assert time.monotonic() < deadline, (_mapped_segments(worker_pid, client.pid),
                                             fresh_worker.log()[-2000:])
        time.sleep(0.1)
    assert _segments_of(client.pid) == []
    with connect(fresh_worker.address, timeout=30) as w:
        assert torch.equal(w.function("add_one")(torch.zeros(2)), torch.ones(2))


def _call(stub: pb_grpc.JaxWorkerServiceStub, session: str, function: str,
          tensor: pb.Tensor, arena: pb.SharedMemorySlice | None = None) -> pb.CallResponse:
    request = pb.CallRequest(session_id=session, function=function)
    request.args.nodes.add(kind=pb.TreeNode.KIND_TUPLE, num_children=1)
    request.args.nodes.add(kind=pb.TreeNode.KIND_LEAF)
    request.args.leaves.append(tensor)
    request.kwargs.nodes.add(kind=pb.TreeNode.KIND_DICT)
    if arena is not None:
        request.output_arena.shm.CopyFrom(arena)
    return stub.Call(request, timeout=30)


def test_a_region_given_back_mid_call_is_never_written(fresh_worker: WorkerProcess) -> None:
    """ReleaseRegion while a call that will write its output there is running: the call
    fails cleanly, not a byte of the region changes, and the released ids stay refused."""
    channel = grpc.insecure_channel(fresh_worker.address)
    stub = pb_grpc.JaxWorkerServiceStub(channel)
    stream = stub.OpenSession(pb.OpenSessionRequest(protocol_version=PROTOCOL_VERSION,
                                                    client_pid=os.getpid()))
    session = next(stream).session_id
    region = SharedMemoryRegion.create(1 << 20, tag=region_tag(session), sealed=True)
    try:
        view = np.frombuffer(region.buffer, np.uint8)
        view[:] = 0xAB
        reply = stub.RegisterRegion(pb.RegisterRegionRequest(
            session_id=session,
            shared_memory=pb.SharedMemoryRegion(name=region.name, size=region.size)),
            timeout=30)
        data = np.arange(1 << 16, dtype=np.float32)  # 256 KiB: the output goes to the arena
        tensor = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[data.size],
                           inline_data=data.tobytes())
        arena = pb.SharedMemorySlice(region_id=reply.region_id, offset=0, nbytes=1 << 20)
        ok = _call(stub, session, "identity", tensor, arena)  # the region works
        assert ok.outputs.leaves[0].shm.nbytes == data.nbytes
        view[:] = 0xAB
        results: list[object] = []

        def slow_call() -> None:
            try:
                results.append(_call(stub, session, "slow_identity", tensor, arena))
            except grpc.RpcError as error:
                results.append(error)

        thread = threading.Thread(target=slow_call)
        thread.start()
        time.sleep(0.8)  # slow_identity sleeps 2 s in the worker before its output exists
        stub.ReleaseRegion(pb.ReleaseRegionRequest(session_id=session,
                                                   region_id=reply.region_id), timeout=30)
        _fault("region released during a call")
        thread.join(30)
        assert len(results) == 1 and isinstance(results[0], grpc.RpcError), results
        assert results[0].code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "released" in results[0].details()
        assert region.name not in results[0].details()
        assert (view == 0xAB).all(), "the worker wrote into a region that was given back"
        # Stale ids stay refused, as input and as arena; a new registration gets new ones.
        stale_input = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[4], shm=pb.SharedMemorySlice(
            region_id=reply.region_id, offset=0, nbytes=16))
        for args in ((stale_input, None), (tensor, arena)):
            with pytest.raises(grpc.RpcError) as caught:
                _call(stub, session, "identity", *args)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "not registered" in caught.value.details()
        again = stub.RegisterRegion(pb.RegisterRegionRequest(
            session_id=session,
            shared_memory=pb.SharedMemoryRegion(name=region.name, size=region.size)),
            timeout=30)
        assert again.region_id != reply.region_id
        fresh = pb.SharedMemorySlice(region_id=again.region_id, offset=0, nbytes=1 << 20)
        assert _call(stub, session, "identity", tensor, fresh).outputs.leaves[0].shm.nbytes
        assert np.array_equal(view[:data.nbytes].view(np.float32), data)
        del view
    finally:
        stream.cancel()
        channel.close()
        region.unlink()
        region.close()
