"""The exceptions of torch-jax-interop, in one public module.

Every error the library raises on purpose is an :class:`InteropError`, importable from
here (``from torch_jax_interop.errors import TransportError``). Where a
builtin exception type is the natural one (a value out of range, an unsupported
type), the project's class derives from both, so ``except OverflowError`` and
``except InteropError`` both work:

    InteropError
    ├── ConversionError (TypeError)          a value cannot be converted
    │   ├── UnsupportedTensorError           sparse, meta, int4, sharded, ...
    │   ├── CopyRequiredError (ValueError)   ``copy=False`` but a copy is needed
    │   └── IntegerOverflowError (OverflowError)
    │                                        a 64-bit value does not fit 32 bits
    ├── DoubleBackwardError (RuntimeError)   second derivative through a wrapper
    ├── CallQueueFullError (RuntimeError)    too many asynchronous calls pending
    ├── TransportError                       shared memory / CUDA IPC / inline bytes
    │   ├── SharedMemoryFullError (OSError)  /dev/shm (``shm_size``) or memory too small
    │   ├── RegionRejectedError (ValueError) a region failed the attach checks
    │   ├── SliceOutOfBoundsError (ValueError)
    │   │                                    a slice lies outside its region or is misaligned
    │   ├── PoolExhaustedError               the pool's ``max_total_bytes`` is reached
    │   └── UntrustedSocketError (PermissionError)
    │                                        a unix socket others could swap, or abstract
    └── RemoteError                          a call to a JAX worker failed
        ├── FunctionNotFoundError (LookupError)   unknown function name
        ├── InvalidArgumentError (ValueError)     bad input, descriptor or arity
        ├── ResourceExhaustedError                size or session limits
        ├── AuthenticationError (PermissionError) missing or wrong token
        ├── WorkerUnavailableError (ConnectionError)  worker gone or unreachable
        ├── DeadlineExceededError (TimeoutError)  the call ran past its deadline
        ├── ProtocolVersionError                  client and worker speak other protocols
        ├── MalformedReplyError (ValueError)      the worker's reply broke the protocol
        └── RemoteExecutionError                  the JAX function itself raised

On the client, gRPC status codes map into the ``RemoteError`` branch (see
``torch_jax_interop.client._errors_map``); an exception raised by the served JAX function
itself arrives as ``RemoteExecutionError``, whatever its Python type. Importing this module
imports neither torch nor JAX.
"""

from __future__ import annotations

from ._errors import (
    AuthenticationError as AuthenticationError,
    CallQueueFullError as CallQueueFullError,
    ConversionError as ConversionError,
    CopyRequiredError as CopyRequiredError,
    DeadlineExceededError as DeadlineExceededError,
    DoubleBackwardError as DoubleBackwardError,
    FunctionNotFoundError as FunctionNotFoundError,
    IntegerOverflowError as IntegerOverflowError,
    InteropError as InteropError,
    InvalidArgumentError as InvalidArgumentError,
    MalformedReplyError as MalformedReplyError,
    PoolExhaustedError as PoolExhaustedError,
    ProtocolVersionError as ProtocolVersionError,
    RegionRejectedError as RegionRejectedError,
    RemoteError as RemoteError,
    RemoteExecutionError as RemoteExecutionError,
    ResourceExhaustedError as ResourceExhaustedError,
    SharedMemoryFullError as SharedMemoryFullError,
    SliceOutOfBoundsError as SliceOutOfBoundsError,
    TransportError as TransportError,
    UnsupportedTensorError as UnsupportedTensorError,
    UntrustedSocketError as UntrustedSocketError,
    WorkerUnavailableError as WorkerUnavailableError,
)

__all__ = [
    "AuthenticationError",
    "CallQueueFullError",
    "ConversionError",
    "CopyRequiredError",
    "DeadlineExceededError",
    "DoubleBackwardError",
    "FunctionNotFoundError",
    "IntegerOverflowError",
    "InteropError",
    "InvalidArgumentError",
    "MalformedReplyError",
    "PoolExhaustedError",
    "ProtocolVersionError",
    "RegionRejectedError",
    "RemoteError",
    "RemoteExecutionError",
    "ResourceExhaustedError",
    "SharedMemoryFullError",
    "SliceOutOfBoundsError",
    "TransportError",
    "UnsupportedTensorError",
    "UntrustedSocketError",
    "WorkerUnavailableError",
]
