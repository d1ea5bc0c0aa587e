"""Names the worker, the client, the CLI and the docs share. Imports no framework."""

from __future__ import annotations

TOKEN_ENV = "TORCH_JAX_INTEROP_TOKEN"
"""Environment variable holding the bearer token TCP clients send (the worker's default
``--token-env``, and what ``connect()`` reads when no ``token=`` is given)."""

TRANSPORTS: tuple[str, ...] = ("auto", "cuda_ipc", "shm", "inline")
"""What ``connect(transport=...)`` and the CLI's ``--transport`` accept (see ``connect``)."""


def check_transport(transport: str) -> str:
    """``transport`` if it is one of ``TRANSPORTS``, else a ``ValueError`` listing them."""
    if transport not in TRANSPORTS:
        raise ValueError(
            f"transport must be one of {', '.join(repr(t) for t in TRANSPORTS)}, got "
            f"{transport!r}"
        )
    return transport


# Worker limits whose defaults both ``WorkerConfig`` and the CLI use (docs/reliability.md,
# "Memory and request bounds", says what memory each bounds).
DEFAULT_MAX_LEAVES = 4096
"""Tensors per request (``--max-leaves``)."""
DEFAULT_MAX_COMPILED_SIGNATURES = 256
"""Compiled input signatures kept per served function (``--max-compiled-signatures``)."""
DEFAULT_MAX_RESIDUAL_BYTES = 4 << 30
"""Bytes of vjp residuals kept per session (``--max-residual-bytes``)."""
