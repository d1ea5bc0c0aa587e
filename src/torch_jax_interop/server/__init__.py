"""The JAX worker: serves named JAX functions over gRPC. Imports JAX, never torch."""

from .._sharding import sharded as sharded
from .._tls import TlsConfig as TlsConfig
from ._compiled import CompiledFunction as CompiledFunction
from ._server import ConnectionLimits as ConnectionLimits
from ._server import create_server as create_server
from ._server import load_function as load_function
from ._server import serve as serve
from ._server import shutdown as shutdown
from ._servicer import WorkerConfig as WorkerConfig

__all__ = [
    "CompiledFunction", "ConnectionLimits", "TlsConfig", "WorkerConfig", "create_server",
    "load_function", "serve", "sharded", "shutdown",
]
