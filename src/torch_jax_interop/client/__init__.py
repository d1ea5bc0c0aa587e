"""The torch side of service mode: ``connect()`` to a JAX worker. Imports torch, never JAX
(except ``connect("inproc", ...)``, which runs the functions in this process)."""

from .._errors import (
    AuthenticationError as AuthenticationError,
)
from .._errors import (
    DeadlineExceededError as DeadlineExceededError,
)
from .._errors import (
    FunctionNotFoundError as FunctionNotFoundError,
)
from .._errors import (
    InvalidArgumentError as InvalidArgumentError,
)
from .._errors import (
    ProtocolVersionError as ProtocolVersionError,
)
from .._errors import (
    RemoteError as RemoteError,
)
from .._errors import (
    RemoteExecutionError as RemoteExecutionError,
)
from .._errors import (
    ResourceExhaustedError as ResourceExhaustedError,
)
from .._errors import (
    WorkerUnavailableError as WorkerUnavailableError,
)
from ._connect import FunctionInfo as FunctionInfo
from ._connect import RemoteFunction as RemoteFunction
from ._connect import Worker as Worker
from ._connect import connect as connect

__all__ = [
    "AuthenticationError",
    "DeadlineExceededError",
    "FunctionInfo",
    "FunctionNotFoundError",
    "InvalidArgumentError",
    "ProtocolVersionError",
    "RemoteError",
    "RemoteExecutionError",
    "RemoteFunction",
    "ResourceExhaustedError",
    "Worker",
    "WorkerUnavailableError",
    "connect",
]
