"""The standard ``grpc.health.v1`` check, client half: what ``torch-jax-interop health`` runs.

Imports grpc and the generated protocol, never torch or JAX: a health probe (a Docker
healthcheck runs one every few seconds) must stay cheap, and must work in an image that has
only one of the two frameworks. The worker's half is ``server/_health.py``.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ._tls import TlsConfig
from .proto.v1 import interop_pb2 as _pb

SERVICES: tuple[str, ...] = ("", *(s.full_name for s in _pb.DESCRIPTOR.services_by_name.values()))
"""Health service names the worker reports: the whole server (``""``) and its gRPC service."""


def check_health(address: str, timeout: float = 5.0, tls: TlsConfig | None = None) -> str:
    """The worker's status name (``SERVING``, ``NOT_SERVING``, ...) or raise ``grpc.RpcError``.

    Waits up to ``timeout`` seconds for the worker to answer (``wait_for_ready``). ``tls``:
    reach a TLS worker (the same settings as ``connect(tls=...)``; no token is needed).
    """
    channel = (grpc.secure_channel(address, tls.channel_credentials(),
                                   options=tls.channel_options())
               if tls is not None else grpc.insecure_channel(address))
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout,
                              wait_for_ready=True)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
