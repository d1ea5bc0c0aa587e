"""The JAX worker: serves named JAX functions over gRPC. Imports JAX, never torch."""

from .._sharding import sharded as sharded
from .._tls import TlsConfig as TlsConfig
from ._compiled import CompiledFunction as CompiledFunction
from ._server import (
    ConnectionLimits as ConnectionLimits,
    create_server as create_server,
    load_function as load_function,
    serve as serve,
    shutdown as shutdown,
)
from ._servicer import WorkerConfig as WorkerConfig

__all__ = [
    "CompiledFunction", "ConnectionLimits", "TlsConfig", "WorkerConfig", "create_server",
    "load_function", "serve", "sharded", "shutdown",
]
