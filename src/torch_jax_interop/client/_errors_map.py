"""gRPC status codes -> the project's exceptions (see ``torch_jax_interop._errors``)."""

from __future__ import annotations

import grpc

from .._errors import (
    AuthenticationError,
    DeadlineExceededError,
    FunctionNotFoundError,
    InvalidArgumentError,
    RemoteError,
    RemoteExecutionError,
    ResourceExhaustedError,
    WorkerUnavailableError,
)

_BY_CODE: dict[grpc.StatusCode, type[RemoteError]] = {
    grpc.StatusCode.NOT_FOUND: FunctionNotFoundError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.FAILED_PRECONDITION: InvalidArgumentError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgumentError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: AuthenticationError,
    grpc.StatusCode.UNAVAILABLE: WorkerUnavailableError,
    grpc.StatusCode.CANCELLED: WorkerUnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.INTERNAL: RemoteExecutionError,
    grpc.StatusCode.UNKNOWN: RemoteExecutionError,
}

_HINTS = {
    WorkerUnavailableError: "Is the worker running (`torch-jax-interop health ADDRESS`)?",
    DeadlineExceededError: "Raise `timeout=` in connect() if the function is slow.",
}


def to_remote_error(error: grpc.RpcError, what: str, address: str) -> RemoteError:
    """The project's exception for a failed RPC, with a message that says what to do."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    cls = _BY_CODE.get(code, RemoteError)
    hint = _HINTS.get(cls, "")
    message = f"{what} on worker {address} failed ({code.name}): {details}"
    return cls(f"{message} {hint}".strip())
