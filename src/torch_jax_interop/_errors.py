"""The project's exceptions, in one module.

Every error the library raises on purpose is an :class:`InteropError`. Where a
builtin exception type is the natural one (a value out of range, an unsupported
type), the project's class derives from both, so ``except OverflowError`` and
``except InteropError`` both work::

    InteropError
    ├── ConversionError (TypeError)          a value cannot be converted
    │   ├── UnsupportedTensorError           sparse, meta, int4, sharded, ...
    │   ├── CopyRequiredError (ValueError)   ``copy=False`` but a copy is needed
    │   └── IntegerOverflowError (OverflowError)
    │                                        a 64-bit value does not fit 32 bits
    ├── DoubleBackwardError (RuntimeError)   second derivative through a wrapper
    ├── TransportError                       shared memory / CUDA IPC / inline bytes
    │   ├── SharedMemoryFullError (OSError)  /dev/shm too small (raise ``shm_size``)
    │   ├── RegionRejectedError (ValueError) a region failed the attach checks
    │   ├── SliceOutOfBoundsError (ValueError)
    │   │                                    a slice lies outside its region or is misaligned
    │   └── PoolExhaustedError               the pool's ``max_total_bytes`` is reached
    └── RemoteError                          a call to a JAX worker failed
        ├── FunctionNotFoundError (LookupError)   unknown function name
        ├── InvalidArgumentError (ValueError)     bad input, descriptor or arity
        ├── ResourceExhaustedError                size or session limits
        ├── AuthenticationError (PermissionError) missing or wrong token
        ├── WorkerUnavailableError (ConnectionError)  worker gone or unreachable
        ├── DeadlineExceededError (TimeoutError)  the call ran past its deadline
        ├── ProtocolVersionError                  client and worker speak other protocols
        └── RemoteExecutionError                  the JAX function itself raised

On the client, gRPC status codes map into the ``RemoteError`` branch (see
``torch_jax_interop.client._errors_map``).
"""

from __future__ import annotations


class InteropError(Exception):
    """Base class of every error raised on purpose by torch-jax-interop."""


class ConversionError(InteropError, TypeError):
    """A value cannot be converted between torch and JAX."""


class UnsupportedTensorError(ConversionError):
    """The tensor kind (sparse, meta, sub-byte dtype, sharded array, ...) is not supported."""


class CopyRequiredError(ConversionError, ValueError):
    """``copy=False`` was asked for, but the conversion cannot be done without a copy."""


class IntegerOverflowError(ConversionError, OverflowError):
    """A 64-bit integer does not fit the 32-bit type JAX uses while x64 mode is off."""


class DoubleBackwardError(InteropError, RuntimeError):
    """A second derivative was asked of a wrapped function that only supports one."""


class TransportError(InteropError):
    """Moving tensor bytes between processes failed."""


class SharedMemoryFullError(TransportError, OSError):
    """The shared-memory filesystem has no room for a region."""


class RegionRejectedError(TransportError, ValueError):
    """A shared-memory region failed the checks made before mapping it.

    Bad name, not a regular file, a symbolic link, another user's file, group/other
    permission bits, or smaller than the size it was registered with.
    """


class SliceOutOfBoundsError(TransportError, ValueError):
    """A slice descriptor is negative, misaligned, or does not lie inside its region."""


class PoolExhaustedError(TransportError):
    """A shared-memory pool would grow past its ``max_total_bytes`` limit."""


class RemoteError(InteropError):
    """A call to a JAX worker failed."""


class FunctionNotFoundError(RemoteError, LookupError):
    """The worker serves no function of that name."""


class InvalidArgumentError(RemoteError, ValueError):
    """The worker rejected the request: wrong arity, dtype, shape or descriptor."""


class ResourceExhaustedError(RemoteError):
    """A size limit, the residual cap or the session cap was hit."""


class AuthenticationError(RemoteError, PermissionError):
    """The worker refused the call: missing or wrong token."""


class WorkerUnavailableError(RemoteError, ConnectionError):
    """The worker is gone or cannot be reached."""


class DeadlineExceededError(RemoteError, TimeoutError):
    """The call did not finish within its deadline."""


class ProtocolVersionError(RemoteError):
    """The client and the worker speak different protocol versions: install the same
    torch-jax-interop version on both sides."""


class RemoteExecutionError(RemoteError):
    """The served JAX function raised inside the worker (whatever the exception's type; the
    message names it)."""
