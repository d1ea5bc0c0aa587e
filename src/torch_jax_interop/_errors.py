"""Implementation of the exception hierarchy; the public face is ``torch_jax_interop.errors``
(import from there; its docstring draws the tree). Imports no framework."""

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


class CallQueueFullError(InteropError, RuntimeError):
    """Too many asynchronous calls are pending (running and queued): the bound was hit."""


class TransportError(InteropError):
    """Moving tensor bytes between processes failed."""


class SharedMemoryFullError(TransportError, OSError):
    """The shared-memory filesystem (ENOSPC), or the memory (ENOMEM: Note [Regions are
    memory] in ``transport/_memory.py``), has no room for a region."""


class RegionRejectedError(TransportError, ValueError):
    """A shared-memory region failed the checks made before mapping it.

    Bad name, not a regular file, a symbolic link, another user's file, group/other
    permission bits, or smaller than the size it was registered with.
    """


class UntrustedSocketError(TransportError, PermissionError):
    """A unix socket, or its directory, could be replaced by another user (or is an abstract
    socket, which has no owner): neither side sends anything through it."""


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


class MalformedReplyError(RemoteError, ValueError):
    """The worker's reply broke the protocol (a bad dtype, shape, size or location, outputs
    that overlap): a bug or a hostile worker. Nothing of the reply is used."""


class RemoteExecutionError(RemoteError):
    """The served JAX function raised inside the worker (whatever the exception's type; the
    message names it)."""
