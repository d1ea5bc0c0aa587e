"""CUDA IPC through real worker processes.

Without a GPU: a worker that has no CUDA IPC support answers CUDA IPC requests (a region,
a tensor location, an output arena) with INVALID_ARGUMENT and a message that says to use
shared memory, and keeps serving; ``transport="cuda_ipc"`` leaves CPU tensors on the
shared-memory path; the worker does not let JAX preallocate GPU memory.

With a GPU (tests marked ``gpu``): CUDA tensors round-trip with CUDA IPC, a remote
``WrappedJaxFunction`` trains with every tensor on the device, and each region's handle is
opened once per session and closed when the session ends.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import torch
from support.workers import FUNCTIONS, WorkerProcess, start_worker, stop_worker

from torch_jax_interop import WrappedJaxFunction
from torch_jax_interop._wire import PROTOCOL_VERSION
from torch_jax_interop.client import connect
from torch_jax_interop.proto.v1 import interop_pb2 as pb, interop_pb2_grpc as pb_grpc

UUID = "GPU-8f6a2c1e-1b2d-4c3e-9f10-0a1b2c3d4e5f"
NO_SUPPORT = "this worker has no CUDA IPC support"


@pytest.fixture(scope="module")
def cpu_worker() -> Iterator[WorkerProcess]:
    """A worker that cannot do CUDA IPC on any machine: it sees no GPU."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="tji", dir="/tmp") as tmp:
        process = start_worker(tmp, env={"CUDA_VISIBLE_DEVICES": "", "JAX_PLATFORMS": "cpu"})
        try:
            yield process
        finally:
            assert stop_worker(process) == 0, process.log()


def _raw_session(worker: WorkerProcess) -> Iterator[tuple[Any, str]]:
    """A hand-made session that says it intends CUDA IPC: (stub, session id)."""
    channel = grpc.insecure_channel(worker.address)
    stub = pb_grpc.JaxWorkerServiceStub(channel)
    stream = stub.OpenSession(pb.OpenSessionRequest(protocol_version=PROTOCOL_VERSION,
                                                    client_pid=os.getpid(),
                                                    transport=pb.TRANSPORT_CUDA_IPC))
    session = next(stream).session_id
    yield stub, session
    stream.cancel()
    channel.close()


@pytest.fixture
def raw(cpu_worker: WorkerProcess):  # noqa: ANN201
    yield from _raw_session(cpu_worker)


def _identity_request(session: str, tensor: pb.Tensor) -> pb.CallRequest:
    request = pb.CallRequest(session_id=session, function="identity")
    request.args.nodes.add(kind=pb.TreeNode.KIND_TUPLE, num_children=1)
    request.args.nodes.add(kind=pb.TreeNode.KIND_LEAF)
    request.args.leaves.append(tensor)
    request.kwargs.nodes.add(kind=pb.TreeNode.KIND_DICT)
    return request


def _still_serves(stub: pb_grpc.JaxWorkerServiceStub, session: str) -> None:
    one = b"\0\0\x80?"
    reply = stub.Call(_identity_request(session, pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[1],
                                                           inline_data=one)), timeout=30)
    assert reply.outputs.leaves[0].inline_data == one


def test_cuda_ipc_region_on_a_worker_without_support_is_invalid_argument(raw) -> None:  # noqa: ANN001
    stub, session = raw
    request = pb.RegisterRegionRequest(session_id=session, cuda_ipc=pb.CudaIpcRegion(
        handle=bytes(64), size=2 << 20, device_uuid=UUID))
    with pytest.raises(grpc.RpcError) as caught:
        stub.RegisterRegion(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert NO_SUPPORT in caught.value.details()
    assert "shared memory" in caught.value.details()
    _still_serves(stub, session)


def test_cuda_ipc_tensor_location_on_a_worker_without_support_is_invalid_argument(raw) -> None:  # noqa: ANN001
    stub, session = raw
    tensor = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[4], cuda_ipc=pb.CudaIpcSlice(
        region_id=1, offset=0, nbytes=16))
    with pytest.raises(grpc.RpcError) as caught:
        stub.Call(_identity_request(session, tensor), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert NO_SUPPORT in caught.value.details()
    _still_serves(stub, session)


def test_cuda_ipc_output_arena_on_a_worker_without_support_is_invalid_argument(raw) -> None:  # noqa: ANN001
    stub, session = raw
    request = _identity_request(session, pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[1],
                                                   inline_data=bytes(4)))
    request.output_arena.cuda_ipc.CopyFrom(pb.CudaIpcSlice(
        region_id=1, offset=0, nbytes=1 << 20))
    with pytest.raises(grpc.RpcError) as caught:
        stub.Call(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert NO_SUPPORT in caught.value.details()
    _still_serves(stub, session)


def test_transport_cuda_ipc_sends_cpu_tensors_through_shared_memory(
        cpu_worker: WorkerProcess) -> None:
    x = torch.randn(1 << 18)
    with connect(cpu_worker.address, transport="cuda_ipc") as w:
        assert torch.equal(w.function("identity")(x), x)
        assert w.transport == "shared memory"
        assert w.stats.shared_memory_bytes == x.numel() * 4 and w.stats.cuda_ipc_bytes == 0
        assert "CUDA IPC" not in str(w.stats)
    with pytest.raises(ValueError, match="'auto', 'cuda_ipc', 'shm', 'inline'"):
        connect(cpu_worker.address, transport="nccl")


def test_the_worker_keeps_jax_from_preallocating_gpu_memory(run_python) -> None:  # noqa: ANN001
    code = """
        import os, tempfile
        if os.environ.pop("TJI_TEST_UNSET", None):
            os.environ.pop("XLA_PYTHON_CLIENT_PREALLOCATE", None)
        from torch_jax_interop.server._server import create_server, shutdown
        with tempfile.TemporaryDirectory(prefix="tji", dir="/tmp") as tmp:
            server, _, servicer = create_server({"f": lambda x: x}, f"unix://{tmp}/w.sock")
            shutdown(server, servicer, grace=1)
        print(os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE"))
    """
    defaulted = run_python(code, env={"TJI_TEST_UNSET": "1", "JAX_PLATFORMS": "cpu"})
    assert defaulted.returncode == 0, defaulted.stderr
    assert defaulted.stdout.strip().splitlines()[-1] == "false"
    told = run_python(code, env={"XLA_PYTHON_CLIENT_PREALLOCATE": "true", "JAX_PLATFORMS": "cpu"})
    assert told.returncode == 0, told.stderr
    assert told.stdout.strip().splitlines()[-1] == "true"  # an explicit setting wins


# -- on a GPU ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpu_worker() -> Iterator[WorkerProcess]:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="tji", dir="/tmp") as tmp:
        # Exact float32 matmuls on both sides, so remote and local training agree closely.
        process = start_worker(tmp, env={"JAX_DEFAULT_MATMUL_PRECISION": "highest"})
        try:
            yield process
        finally:
            assert stop_worker(process) == 0, process.log()


@pytest.fixture
def gpu_raw(gpu_worker: WorkerProcess):  # noqa: ANN201
    yield from _raw_session(gpu_worker)


@pytest.mark.gpu
@pytest.mark.parametrize(("garbage", "code", "message"), [
    ({"handle": b"short"}, "INVALID_ARGUMENT", "has 64 bytes, got 5"),
    ({"device_uuid": "cuda:0"}, "INVALID_ARGUMENT", "malformed GPU UUID"),
    ({}, "INVALID_ARGUMENT", "is not visible to the worker"),  # UUID is no real GPU
    ({"size": 0}, "RESOURCE_EXHAUSTED", "outside 1.."),
])
def test_malformed_cuda_ipc_regions_are_refused_and_the_worker_serves_on(
        gpu_raw, garbage: dict, code: str, message: str) -> None:  # noqa: ANN001
    stub, session = gpu_raw
    fields = {"handle": bytes(64), "device_uuid": UUID, "size": 2 << 20, **garbage}
    with pytest.raises(grpc.RpcError) as caught:
        stub.RegisterRegion(pb.RegisterRegionRequest(
            session_id=session, cuda_ipc=pb.CudaIpcRegion(**fields)), timeout=30)
    assert caught.value.code() == getattr(grpc.StatusCode, code)
    assert message in caught.value.details()
    _still_serves(stub, session)


def _count(log: str, text: str) -> int:
    return len(re.findall(re.escape(text), log))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int32, torch.bool])
def test_cuda_tensors_round_trip_by_cuda_ipc(gpu_worker: WorkerProcess,
                                             dtype: torch.dtype) -> None:
    x = (torch.randn(1 << 18, device="cuda") * 100).to(dtype)
    with connect(gpu_worker.address, transport="cuda_ipc") as w:
        y = w.function("identity")(x)
        assert y.is_cuda and y.device == x.device and y.dtype == dtype
        assert torch.equal(y, x)
        assert w.stats.cuda_ipc_bytes == x.numel() * x.element_size()
        assert w.stats.shared_memory_bytes == 0
        pools = [p for p in w._session.cuda._pools.values() if p is not None]
        buffers = [e.buffer for p in pools for e in p._entries.values()]
        # the output is a view of a device slot of this process, not a copy
        assert any(b.ptr <= y.data_ptr() < b.ptr + b.size for b in buffers)
        small = w.function("add_one")(torch.zeros(3, device="cuda"))
        assert small.is_cuda and torch.equal(small.cpu(), torch.ones(3))


@pytest.mark.gpu
def test_handles_are_opened_once_per_session_and_closed_at_its_end(
        gpu_worker: WorkerProcess) -> None:
    before = gpu_worker.log()
    x = torch.randn(1 << 20, device="cuda")
    with connect(gpu_worker.address, transport="cuda_ipc") as w:
        for _ in range(10):
            assert torch.equal(w.function("identity")(x), x)
        log = gpu_worker.log()[len(before):]
        registered = _count(log, "registered CUDA IPC region")
        assert 1 <= registered <= 3
        assert _count(log, "opened a CUDA IPC handle") == registered
    deadline = time.monotonic() + 15
    while _count(gpu_worker.log()[len(before):], "closed a CUDA IPC handle") < registered:
        assert time.monotonic() < deadline, gpu_worker.log()[len(before):]
        time.sleep(0.1)


def _params(device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"w1": (torch.randn(784, 256, generator=g) * 0.05).to(device),
            "b1": torch.zeros(256, device=device),
            "w2": (torch.randn(256, 10, generator=g) * 0.05).to(device),
            "b2": torch.zeros(10, device=device)}


def _train(worker, device: str) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:  # noqa: ANN001
    torch.manual_seed(0)
    model = torch.nn.Sequential(WrappedJaxFunction(worker.function("mlp_apply"),
                                                   _params(device)),
                                torch.nn.Linear(10, 1)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    grads: list[torch.Tensor] = []
    for step in range(5):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(512, 784, generator=g).to(device)
        y = torch.randn(512, 1, generator=g).to(device)
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        grads.extend(p.grad for p in model.parameters())
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, grads


@pytest.mark.gpu
def test_remote_wrapped_function_trains_on_the_gpu_with_tensors_on_the_device(
        gpu_worker: WorkerProcess) -> None:
    with connect("inproc", functions=FUNCTIONS) as local:
        expected, _ = _train(local, "cpu")
    with connect(gpu_worker.address, transport="cuda_ipc") as remote:
        got, grads = _train(remote, "cuda")
        assert remote.stats.shared_memory_bytes == 0
        assert remote.stats.cuda_ipc_bytes > 5 * 512 * 784 * 4  # inputs, params, cotangents
    assert all(t.is_cuda for t in got.values()) and all(g.is_cuda for g in grads)
    for key in expected:
        torch.testing.assert_close(got[key].cpu(), expected[key], rtol=1e-4, atol=1e-5)
