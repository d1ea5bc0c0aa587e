"""gRPC status codes -> the project's exceptions (see ``torch_jax_interop._errors``); the
worker's side of the mapping is Note [Status codes of the worker] in
``server/_interceptors.py``."""

from __future__ import annotations

import grpc

from .. import _wire
from .._errors import (
    AuthenticationError,
    DeadlineExceededError,
    FunctionNotFoundError,
    InvalidArgumentError,
    ProtocolVersionError,
    RemoteError,
    RemoteExecutionError,
    ResourceExhaustedError,
    WorkerUnavailableError,
)

_BY_CODE: dict[grpc.StatusCode, type[RemoteError]] = {
    grpc.StatusCode.NOT_FOUND: FunctionNotFoundError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.FAILED_PRECONDITION: ProtocolVersionError,
    grpc.StatusCode.UNIMPLEMENTED: ProtocolVersionError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgumentError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: AuthenticationError,
    grpc.StatusCode.UNAVAILABLE: WorkerUnavailableError,
    grpc.StatusCode.CANCELLED: WorkerUnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNKNOWN: RemoteExecutionError,
}

_HINTS = {
    WorkerUnavailableError: "Is the worker running (`torch-jax-interop health ADDRESS`)?",
    DeadlineExceededError: "Raise `timeout=` in connect() if the function is slow.",
}
# A worker of another protocol serves no method of this client's service at all.
_UNIMPLEMENTED_HINT = (
    f"The worker does not serve {_wire.SERVICE_NAME} (protocol v{_wire.PROTOCOL_VERSION}): "
    "install the same torch-jax-interop version in the client and the worker."
)


def to_remote_error(error: grpc.RpcError, what: str, address: str) -> RemoteError:
    """The project's exception for a failed RPC, with a message that says what to do."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    return error_for_status(code, details, what, address)


def error_for_status(code: grpc.StatusCode, details: str, what: str,
                     address: str) -> RemoteError:
    """The project's exception for a status (from gRPC or the same-host data plane)."""
    cls = _BY_CODE.get(code, RemoteError)
    hint = _UNIMPLEMENTED_HINT if code == grpc.StatusCode.UNIMPLEMENTED else _HINTS.get(cls, "")
    message = f"{what} on worker {address} failed ({code.name}): {details}"
    return cls(f"{message} {hint}".strip())
