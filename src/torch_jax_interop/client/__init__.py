"""The torch side of service mode: ``connect()`` to a JAX worker. Imports torch, never JAX
(except ``connect("inproc", ...)``, which runs the functions in this process)."""

from .._ranks import rank_address as rank_address
from .._tls import TlsConfig as TlsConfig
from ..errors import (
    AuthenticationError as AuthenticationError,
)
from ..errors import (
    DeadlineExceededError as DeadlineExceededError,
)
from ..errors import (
    FunctionNotFoundError as FunctionNotFoundError,
)
from ..errors import (
    InvalidArgumentError as InvalidArgumentError,
)
from ..errors import (
    ProtocolVersionError as ProtocolVersionError,
)
from ..errors import (
    RemoteError as RemoteError,
)
from ..errors import (
    RemoteExecutionError as RemoteExecutionError,
)
from ..errors import (
    ResourceExhaustedError as ResourceExhaustedError,
)
from ..errors import (
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
    "TlsConfig",
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
    "rank_address",
]
