"""Building and running a JAX worker: ``create_server`` (a factory) and ``serve`` (blocking)."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent import futures
from typing import Any

import grpc

from .._names import TOKEN_ENV
from .._targets import load_function as load_function
from ..proto.v1 import interop_pb2_grpc as pb_grpc
from ..transport import (
    check_socket_directory,
    cleanup_orphans,
    refuse_abstract,
    unix_socket_path,
)
from ._compiled import CompiledFunction
from ._health import add_health_service
from ._interceptors import StatusInterceptor, TokenAuthInterceptor
from ._servicer import JaxWorkerServicer, WorkerConfig

log = logging.getLogger("torch_jax_interop.server")

_GRPC_MESSAGE_OVERHEAD = 16 << 20


def _is_tcp(address: str) -> bool:
    return not address.startswith(("unix:", "unix-abstract:"))


def create_server(
    functions: Mapping[str, Callable[..., Any] | str],
    addresses: str | Iterable[str],
    *,
    token: str | None = None,
    config: WorkerConfig | None = None,
) -> tuple[grpc.Server, list[str], JaxWorkerServicer]:
    """Build a started JAX worker. Returns ``(server, bound_addresses, servicer)``.

    ``functions`` maps names to JAX callables or ``"package.module:attr"`` strings.
    ``addresses``: ``unix:///path`` (created mode 0600, in a directory of this user that
    group and others cannot write: UntrustedSocketError otherwise; ``unix-abstract:`` is
    refused) and/or ``host:port`` (port 0 picks one; the bound address is returned). A TCP
    listener needs ``token`` (or the ``TORCH_JAX_INTEROP_TOKEN`` environment variable):
    without one it refuses to start, since anybody who can reach the port could otherwise
    read and write the session's tensors.
    """
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    config = config or WorkerConfig()
    if isinstance(addresses, str):
        addresses = [addresses]
    addresses = list(addresses)
    for address in addresses:
        # Note [Whom a unix socket reaches] (transport/_unix_socket.py).
        refuse_abstract(address)
        socket_path = unix_socket_path(address)
        if socket_path is not None:
            check_socket_directory(socket_path)
    token = token or os.environ.get(TOKEN_ENV) or None
    if any(_is_tcp(a) for a in addresses) and not token:
        raise ValueError(
            "a TCP listener needs a token: pass --token-env VAR (or set "
            f"{TOKEN_ENV}); use a unix:// socket for a local worker without a token"
        )
    compiled: dict[str, CompiledFunction] = {}
    for name, fn in functions.items():
        target = ""
        if isinstance(fn, str):
            _, fn, target = load_function(f"{name}={fn}")
        compiled[name] = CompiledFunction(name, fn, target)
    # min_age: pids in names mean nothing across PID namespaces (containers sharing only
    # /dev/shm); a live client unlinks its names within a second of creating them.
    removed = cleanup_orphans(config.shm_dir, min_age=60.0)
    if removed:
        log.info("removed %d shared-memory segments of dead processes", len(removed))

    servicer = JaxWorkerServicer(compiled, config)
    # The token check runs first: a peer without it learns nothing else.
    interceptors: list[grpc.ServerInterceptor] = [StatusInterceptor()]
    if token:
        interceptors.insert(0, TokenAuthInterceptor(token))
    message_limit = config.limits.max_inline_bytes + _GRPC_MESSAGE_OVERHEAD
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.max_sessions + 32,
                                   thread_name_prefix="jax-worker"),
        options=[
            ("grpc.max_receive_message_length", message_limit),
            ("grpc.max_send_message_length", message_limit),
            ("grpc.so_reuseport", 0),
        ],
        maximum_concurrent_rpcs=None,
        interceptors=interceptors,
    )
    pb_grpc.add_JaxWorkerServiceServicer_to_server(servicer, server)
    health = add_health_service(server)
    bound: list[str] = []
    old_umask = os.umask(0o177)  # the unix socket file is created 0600
    try:
        for address in addresses:
            if address.startswith("unix://"):
                path = address[len("unix://"):]
                if len(path.encode()) > 107:
                    raise ValueError(
                        f"unix socket path is {len(path.encode())} bytes; the limit is 107. "
                        "Use a shorter directory (e.g. /tmp/tji/worker.sock)"
                    )
                if os.path.exists(path):
                    os.unlink(path)  # a stale socket of an earlier worker
            port = server.add_insecure_port(address)
            if port == 0:
                raise OSError(f"could not listen on {address}")
            if _is_tcp(address):
                host = address.rsplit(":", 1)[0]
                bound.append(f"{host}:{port}")
            else:
                bound.append(address)
        server.start()
    finally:
        os.umask(old_umask)
    for address in bound:
        if address.startswith("unix://"):
            os.chmod(address[len("unix://"):], 0o600)
    health.serving()
    servicer.health = health  # type: ignore[attr-defined]
    log.info("serving %s on %s", ", ".join(sorted(compiled)), ", ".join(bound))
    return server, bound, servicer


def shutdown(server: grpc.Server, servicer: JaxWorkerServicer, grace: float = 30.0) -> None:
    """Drain: refuse new calls, let in-flight ones finish, end sessions, stop."""
    health = getattr(servicer, "health", None)
    if health is not None:
        health.not_serving()
    servicer.shutting_down.set()
    server.stop(grace).wait(grace + 5)
    for session_id in list(servicer.sessions):
        servicer.end_session(session_id)


def serve(
    functions: Mapping[str, Callable[..., Any] | str],
    addresses: str | Iterable[str],
    *,
    token: str | None = None,
    config: WorkerConfig | None = None,
    ready_file: str | None = None,
    grace: float = 30.0,
) -> int:
    """Run a worker until SIGTERM / SIGINT; then drain in-flight calls and return 0."""
    server, bound, servicer = create_server(functions, addresses, token=token, config=config)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    if ready_file:
        import json

        tmp = f"{ready_file}.tmp"
        with open(tmp, "w") as f:
            json.dump({"addresses": bound, "pid": os.getpid()}, f)
        os.replace(tmp, ready_file)
    stop.wait()
    log.info("signal received: draining in-flight calls (grace %.0f s)", grace)
    shutdown(server, servicer, grace)
    for address in bound:
        if address.startswith("unix://"):
            try:
                os.unlink(address[len("unix://"):])
            except FileNotFoundError:
                pass
    log.info("worker stopped")
    return 0
