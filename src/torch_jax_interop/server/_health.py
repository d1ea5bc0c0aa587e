"""The standard ``grpc.health.v1`` service, worker half: SERVING once ready, NOT_SERVING while
draining. The check a client runs is ``torch_jax_interop._health.check_health``."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from .._health import SERVICES, check_health as check_health


class HealthState:
    """Switches every name in ``SERVICES`` between SERVING and NOT_SERVING."""

    def __init__(self, servicer: health.HealthServicer) -> None:
        self._servicer = servicer

    def serving(self) -> None:
        for service in SERVICES:
            self._servicer.set(service, health_pb2.HealthCheckResponse.SERVING)

    def not_serving(self) -> None:
        for service in SERVICES:
            self._servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)


def add_health_service(server: grpc.Server) -> HealthState:
    """Register the health service on ``server`` (NOT_SERVING until ``serving()``)."""
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    return HealthState(servicer)
