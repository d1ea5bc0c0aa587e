"""The torch side of service mode: ``connect()`` to a JAX worker. Imports torch, never JAX
(except ``connect("inproc", ...)``, which runs the functions in this process)."""

from .._ranks import rank_address as rank_address
from .._tls import TlsConfig as TlsConfig
from ..errors import (
    AuthenticationError as AuthenticationError,
    DeadlineExceededError as DeadlineExceededError,
    FunctionNotFoundError as FunctionNotFoundError,
    InvalidArgumentError as InvalidArgumentError,
    MalformedReplyError as MalformedReplyError,
    ProtocolVersionError as ProtocolVersionError,
    RemoteError as RemoteError,
    RemoteExecutionError as RemoteExecutionError,
    ResourceExhaustedError as ResourceExhaustedError,
    WorkerUnavailableError as WorkerUnavailableError,
)
from ._connect import (
    FunctionInfo as FunctionInfo,
    RemoteFunction as RemoteFunction,
    Worker as Worker,
    connect as connect,
)

__all__ = [
    "AuthenticationError",
    "DeadlineExceededError",
    "FunctionInfo",
    "TlsConfig",
    "FunctionNotFoundError",
    "InvalidArgumentError",
    "MalformedReplyError",
    "ProtocolVersionError",
    "RemoteError",
    "RemoteExecutionError",
    "RemoteFunction",
    "ResourceExhaustedError",
    "Worker",
    "WorkerUnavailableError",
    "connect",
    "rank_address",
]
