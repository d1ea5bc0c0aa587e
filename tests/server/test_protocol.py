"""The protocol's edges: both sides enforce ``protocol_version``, a peer without the service
is named as another version, and the interceptors guard JaxWorkerService only (the health
service answers without a token)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
import torch
from grpc_health.v1 import health as grpc_health, health_pb2, health_pb2_grpc
from support.workers import WorkerProcess

from torch_jax_interop._version import __version__
from torch_jax_interop._wire import PROTOCOL_VERSION, SERVICE_NAME
from torch_jax_interop.client import AuthenticationError, connect
from torch_jax_interop.client._errors_map import _BY_CODE
from torch_jax_interop.errors import ProtocolVersionError
from torch_jax_interop.proto.v1 import interop_pb2 as pb, interop_pb2_grpc as pb_grpc
from torch_jax_interop.server._health import check_health


@pytest.mark.parametrize(("version", "older"), [(0, "client"), (PROTOCOL_VERSION + 1, "worker"),
                                                (2**32 - 1, "worker")])
def test_a_client_of_another_protocol_version_is_refused(worker: WorkerProcess, version: int,
                                                         older: str) -> None:
    with grpc.insecure_channel(worker.address) as channel:
        stub = pb_grpc.JaxWorkerServiceStub(channel)
        stream = stub.OpenSession(pb.OpenSessionRequest(protocol_version=version,
                                                        client_pid=os.getpid()))
        with pytest.raises(grpc.RpcError) as caught:
            next(stream)
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        details = caught.value.details()
        assert f"client speaks protocol v{version}" in details, details
        assert f"torch-jax-interop {__version__}) speaks v{PROTOCOL_VERSION}" in details
        assert f"upgrade the {older}" in details
        # The worker opened no session and serves a client of its own version.
        good = stub.OpenSession(pb.OpenSessionRequest(protocol_version=PROTOCOL_VERSION))
        assert next(good).session_id
        good.cancel()
    assert _BY_CODE[grpc.StatusCode.FAILED_PRECONDITION] is ProtocolVersionError


class _OtherVersionWorker(pb_grpc.JaxWorkerServiceServicer):
    """A worker that answers OpenSession with another protocol version."""

    def __init__(self, version: int) -> None:
        self.version = version
        self.requests: list[Any] = []

    def OpenSession(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        self.requests.append(request)
        yield pb.OpenSessionResponse(session_id="s", worker_pid=os.getpid(),
                                     protocol_version=self.version)


@pytest.fixture
def grpc_server() -> Iterator[tuple[grpc.Server, str]]:
    """A bare grpc server on a temporary unix socket; the test adds its services."""
    with tempfile.TemporaryDirectory(prefix="tji", dir="/tmp") as tmp:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        address = f"unix://{tmp}/s.sock"
        assert server.add_insecure_port(address)
        try:
            yield server, address
        finally:
            server.stop(None).wait(10)


@pytest.mark.parametrize(("version", "older"), [(PROTOCOL_VERSION + 1, "client"),
                                                (0, "worker")])
def test_a_worker_of_another_protocol_version_is_refused_by_the_client(
        grpc_server: tuple[grpc.Server, str], version: int, older: str) -> None:
    server, address = grpc_server
    servicer = _OtherVersionWorker(version)
    pb_grpc.add_JaxWorkerServiceServicer_to_server(servicer, server)
    server.start()
    with pytest.raises(ProtocolVersionError) as caught:
        connect(address, timeout=30)
    message = str(caught.value)
    assert f"worker at {address} speaks protocol v{version}" in message, message
    assert f"(torch-jax-interop {__version__}) speaks v{PROTOCOL_VERSION}" in message
    assert f"upgrade the {older}" in message
    assert [r.protocol_version for r in servicer.requests] == [PROTOCOL_VERSION]


def test_a_peer_without_the_service_is_named_as_another_version(
        grpc_server: tuple[grpc.Server, str]) -> None:
    """A worker of another protocol serves no method of this client's service: UNIMPLEMENTED
    becomes ProtocolVersionError with the fix."""
    server, address = grpc_server
    health_pb2_grpc.add_HealthServicer_to_server(grpc_health.HealthServicer(), server)
    server.start()
    with pytest.raises(ProtocolVersionError,
                       match=f"UNIMPLEMENTED.*does not serve {SERVICE_NAME}.*same "
                             "torch-jax-interop version"):
        connect(address, timeout=30)


def test_the_health_service_needs_no_token_but_the_worker_does(worker: WorkerProcess) -> None:
    assert worker.tcp_address is not None
    assert check_health(worker.tcp_address, timeout=30) == "SERVING"
    with grpc.insecure_channel(worker.tcp_address) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=30)
        assert response.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as caught:
            pb_grpc.JaxWorkerServiceStub(channel).ListFunctions(pb.ListFunctionsRequest(),
                                                                timeout=30)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(AuthenticationError, match="token"):
        connect(worker.tcp_address, transport="inline", timeout=30)
    with connect(worker.tcp_address, token=worker.token, transport="inline") as w:
        assert torch.equal(w.function("add_one")(torch.zeros(2)), torch.ones(2))
