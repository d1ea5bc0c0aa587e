"""The standard ``grpc.health.v1`` service: SERVING once ready, NOT_SERVING while draining.

Uses grpcio-health-checking when installed; machines without it (the GPU image) get the
same protocol from a copy generated into ``torch_jax_interop.proto.health``.
"""

from __future__ import annotations

from typing import Any

import grpc

try:
    from grpc_health.v1 import health as _health
    from grpc_health.v1 import health_pb2 as health_pb2
    from grpc_health.v1 import health_pb2_grpc as health_pb2_grpc
except ImportError:  # pragma: no cover - exercised on machines without the package
    _health = None
    from ..proto.health import health_pb2 as health_pb2  # type: ignore[no-redef]
    from ..proto.health import health_pb2_grpc as health_pb2_grpc  # type: ignore[no-redef]


class _MinimalHealth(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    def __init__(self) -> None:
        self.status = health_pb2.HealthCheckResponse.NOT_SERVING

    def set(self, service: str, status: Any) -> None:
        self.status = status

    def Check(self, request: Any, context: grpc.ServicerContext) -> Any:
        return health_pb2.HealthCheckResponse(status=self.status)


class HealthState:
    def __init__(self, servicer: Any) -> None:
        self._servicer = servicer

    def serving(self) -> None:
        for service in ("", "torch_jax_interop.v1.JaxWorker"):
            self._servicer.set(service, health_pb2.HealthCheckResponse.SERVING)

    def not_serving(self) -> None:
        for service in ("", "torch_jax_interop.v1.JaxWorker"):
            self._servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)


def add_health_service(server: grpc.Server) -> HealthState:
    servicer = _health.HealthServicer() if _health is not None else _MinimalHealth()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    return HealthState(servicer)


def check_health(address: str, timeout: float = 5.0) -> str:
    """The worker's status name (``SERVING``, ``NOT_SERVING``, ...) or raise grpc.RpcError."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout,
                              wait_for_ready=True)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
