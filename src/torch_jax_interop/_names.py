"""Names the worker, the client, the CLI and the docs share. Imports no framework."""

from __future__ import annotations

TOKEN_ENV = "TORCH_JAX_INTEROP_TOKEN"
"""Environment variable holding the bearer token TCP clients send (the worker's default
``--token-env``, and what ``connect()`` reads when no ``token=`` is given)."""

TRANSPORTS: tuple[str, ...] = ("auto", "cuda_ipc", "shm", "inline")
"""What ``connect(transport=...)`` and the CLI's ``--transport`` accept (see ``connect``)."""


def _check_choice(what: str, value: str, choices: tuple[str, ...]) -> str:
    """``value`` if it is one of ``choices``, else a ``ValueError`` listing them."""
    if value not in choices:
        raise ValueError(
            f"{what} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}"
        )
    return value


def check_transport(transport: str) -> str:
    """``transport`` if it is one of ``TRANSPORTS``, else a ``ValueError`` listing them."""
    return _check_choice("transport", transport, TRANSPORTS)


DATA_PLANES: tuple[str, ...] = ("auto", "unix_socket", "grpc")
"""What ``connect(data_plane=...)`` accepts: how calls travel (Note [Same-host data plane]
in ``transport/_data_plane.py``). ``"auto"``: the worker's same-host unix socket when it
offers one and this process can use it, else gRPC (one log line says why)."""


def check_data_plane(data_plane: str) -> str:
    """``data_plane`` if it is one of ``DATA_PLANES``, else a ``ValueError`` listing them."""
    return _check_choice("data_plane", data_plane, DATA_PLANES)


# Worker limits whose defaults both ``WorkerConfig`` and the CLI use (docs/reliability.md,
# "Memory and request bounds", says what memory each bounds).
DEFAULT_MAX_LEAVES = 4096
"""Tensors per request (``--max-leaves``)."""
DEFAULT_MAX_COMPILED_SIGNATURES = 256
"""Compiled input signatures kept per served function (``--max-compiled-signatures``)."""
DEFAULT_MAX_RESIDUAL_BYTES = 4 << 30
"""Bytes of vjp residuals kept per session (``--max-residual-bytes``)."""
DEFAULT_MAX_FRAME_BYTES = 64 << 20
"""The largest request frame body the worker reads on the same-host data plane
(``--max-frame-bytes``): tensors travel in shared memory, so a frame holds descriptors and
inline tensors up to ``--max-inline-bytes``."""
DEFAULT_SPIN_US = 200
"""How long (microseconds) either end of the same-host data plane polls for the other's next
frame before sleeping in the kernel (worker ``--spin-us``, ``connect(spin_us=)``; Note [Spin,
then sleep] in ``transport/_data_plane.py``). 0 sleeps at once."""
MAX_SPIN_US = 100_000
"""More spin than this (0.1 s) only burns a core: refused."""


def check_spin_us(spin_us: int) -> int:
    """``spin_us`` if it is a whole number in ``[0, MAX_SPIN_US]``, else a ``ValueError``."""
    if isinstance(spin_us, bool) or not isinstance(spin_us, int) or not (
            0 <= spin_us <= MAX_SPIN_US):
        raise ValueError(f"spin_us={spin_us!r}: must be a whole number of microseconds from 0 "
                         f"(sleep at once) to {MAX_SPIN_US}")
    return spin_us
