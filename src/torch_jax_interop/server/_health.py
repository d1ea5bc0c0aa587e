"""The standard ``grpc.health.v1`` service (grpcio-health-checking, a dependency of every
install): SERVING once ready, NOT_SERVING while draining."""

from __future__ import annotations

from typing import Any

import grpc
from grpc_health.v1 import health as _health
from grpc_health.v1 import health_pb2 as health_pb2
from grpc_health.v1 import health_pb2_grpc as health_pb2_grpc

from .._wire import SERVICE_NAME


class HealthState:
    def __init__(self, servicer: Any) -> None:
        self._servicer = servicer

    def serving(self) -> None:
        for service in ("", SERVICE_NAME):
            self._servicer.set(service, health_pb2.HealthCheckResponse.SERVING)

    def not_serving(self) -> None:
        for service in ("", SERVICE_NAME):
            self._servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)


def add_health_service(server: grpc.Server) -> HealthState:
    servicer = _health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    return HealthState(servicer)


def check_health(address: str, timeout: float = 5.0) -> str:
    """The worker's status name (``SERVING``, ``NOT_SERVING``, ...) or raise grpc.RpcError."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout,
                              wait_for_ready=True)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
