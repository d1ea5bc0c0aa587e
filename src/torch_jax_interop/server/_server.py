"""Building and running a JAX worker: ``create_server`` (a factory) and ``serve`` (blocking)."""

from __future__ import annotations

import errno
import logging
import os
import resource
import signal
import socket
import stat
import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc

from .._names import TOKEN_ENV
from .._targets import load_function as load_function
from .._tls import TlsConfig, check_listen_security, is_tcp
from ..proto.v1 import interop_pb2_grpc as pb_grpc
from ..transport import (
    check_socket_directory,
    cleanup_orphans,
    refuse_abstract,
    unix_socket_path,
)
from ._compiled import CompiledFunction
from ._data_plane import DataPlaneListener
from ._health import add_health_service
from ._interceptors import StatusInterceptor, TokenAuthInterceptor
from ._servicer import JaxWorkerServicer, WorkerConfig

log = logging.getLogger("torch_jax_interop.server")

_GRPC_MESSAGE_OVERHEAD = 16 << 20
_FILES_KEPT_FREE = 256  # descriptors beyond the connection caps: mappings, logs, JAX


@dataclass(frozen=True)
class ConnectionLimits:
    """What a peer that has not (yet) authenticated may hold in the worker (the CLI flags
    ``--max-connections``, ``--handshake-timeout``, ``--idle-timeout``,
    ``--max-streams-per-connection``).

    Note [Unauthenticated peers cost little]
    ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
    * A call without the token is refused by ``TokenAuthInterceptor`` before its request
      body is read: the refusal reads the request as a stream and aborts before asking for
      the first message, so gRPC holds at most one HTTP/2 flow-control window of it (not the
      75 MiB a peer sent), and nothing is deserialized.
    * Each listener (every TCP port, the unix socket) accepts at most ``max_connections``
      connections; gRPC closes the ones above at once, so a flood of idle TCP connections
      cannot use up the process's descriptors and the unix socket keeps serving. At start
      the worker raises its open-file limit to the hard limit.
    * A connection must finish its handshake (TLS and HTTP/2 preface) within
      ``handshake_timeout`` seconds and is closed after ``idle_timeout`` seconds without a
      call (a connected client always has its session's stream open, so it is never idle).
    * One connection carries at most ``max_streams_per_connection`` calls at once (a client
      needs one for its session plus one per concurrent call).
    * No maximum connection age: a session lives on its connection's stream, so closing an
      old connection would end a healthy session (and drop its residuals).
    * Out of reach of these caps: a peer that can reach the TCP port can keep taking its
      ``max_connections``, so TCP clients may be shut out during a flood; the unix socket
      has its own cap and keeps serving.
    """

    max_connections: int = 256
    handshake_timeout: float = 10.0
    idle_timeout: float = 300.0
    max_streams_per_connection: int = 128

    def grpc_options(self) -> list[tuple[str, int]]:
        return [
            ("grpc.max_allowed_incoming_connections", self.max_connections),
            ("grpc.max_concurrent_streams", self.max_streams_per_connection),
            ("grpc.server_handshake_timeout_ms", int(self.handshake_timeout * 1000)),
            ("grpc.max_connection_idle_ms", int(self.idle_timeout * 1000)),
        ]


def _raise_open_file_limit(needed: int) -> None:
    """Raise the soft open-file limit to the hard one; warn when even that is below
    ``needed`` (the connection caps would then not protect the unix socket)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < needed:
        log.warning("the open-file limit is %d but the connection caps allow %d descriptors; "
                    "lower --max-connections or raise the limit (ulimit -n)", soft, needed)


def create_server(
    functions: Mapping[str, Callable[..., Any] | str],
    addresses: str | Iterable[str],
    *,
    token: str | None = None,
    config: WorkerConfig | None = None,
    tls: TlsConfig | None = None,
    insecure: bool = False,
    connection_limits: ConnectionLimits | None = None,
) -> tuple[grpc.Server, list[str], JaxWorkerServicer]:
    """Build a started JAX worker. Returns ``(server, bound_addresses, servicer)``.

    ``functions`` maps names to JAX callables or ``"package.module:attr"`` strings.
    ``addresses``: ``unix:///path`` (created mode 0600, in a directory of this user that
    group and others cannot write: UntrustedSocketError otherwise; ``unix-abstract:`` is
    refused) and/or ``host:port`` (port 0 picks one; the bound address is returned). A TCP
    listener needs ``token`` (or the ``TORCH_JAX_INTEROP_TOKEN`` environment variable):
    without one it refuses to start, since anybody who can reach the port could otherwise
    read and write the session's tensors.
    ``tls`` serves the TCP ports over TLS (``TlsConfig(cert_file, key_file, ca_file=client
    CA for mTLS)``); a non-loopback TCP address without it is refused unless ``insecure``
    (Note [Who may reach a TCP worker] in ``_tls.py``). ``connection_limits``: Note
    [Unauthenticated peers cost little]. ``config.metrics_listen`` (``HOST:PORT``) also
    serves Prometheus metrics there, stopped by :func:`shutdown` (Note [What the metrics
    cost and expose] in ``_metrics.py``).

    Args:
        functions: Name -> JAX callable or ``"package.module:attr"``.
        addresses: One address or several (``unix:///path``, ``host:port``).
        token: The bearer token TCP clients must send (default: ``TORCH_JAX_INTEROP_TOKEN``).
        config: Limits and paths (``WorkerConfig()`` by default).
        tls: Certificates for the TCP listeners.
        insecure: Allow plaintext TCP on a non-loopback address (a trusted network only).
        connection_limits: Connection caps and timeouts of the listeners.

    Returns:
        ``(server, bound_addresses, servicer)``: the started ``grpc.Server``, the addresses it
        listens on (with the port chosen for ``:0``), and the servicer ``shutdown`` drains.

    Raises:
        ValueError: A TCP address without a token, a non-loopback TCP address without
            ``tls`` or ``insecure``, a unix socket path over 107 bytes, or a
            ``"package.module:attr"`` that names nothing callable.
        UntrustedSocketError: A unix socket's directory that others may write.
        OSError: An address in use (``EADDRINUSE``, naming what is there) or one that
            cannot be bound.
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
    limits = connection_limits or ConnectionLimits()
    check_listen_security(addresses, tls=tls is not None, insecure=insecure)
    credentials = tls.server_credentials() if tls is not None else None  # fails early
    if any(is_tcp(a) for a in addresses) and not token:
        raise ValueError(
            "a TCP listener needs a token: pass --token-env VAR (or set "
            f"{TOKEN_ENV}); use a unix:// socket for a local worker without a token"
        )
    compiled: dict[str, CompiledFunction] = {}
    for name, fn in functions.items():
        target = ""
        if isinstance(fn, str):
            _, fn, target = load_function(f"{name}={fn}")
        compiled[name] = CompiledFunction(name, fn, target,
                                          max_programs=config.max_compiled_signatures)
        if compiled[name].engine.shardings is not None:  # builds the mesh: fails early
            log.info("`%s` runs sharded over the mesh %s", name, compiled[name].mesh)
    # min_age: pids in names mean nothing across PID namespaces (containers sharing only
    # /dev/shm); a live client unlinks its names within a second of creating them.
    removed = cleanup_orphans(config.shm_dir, min_age=60.0)
    if removed:
        log.info("removed %d shared-memory segments of dead processes", len(removed))

    servicer = JaxWorkerServicer(compiled, config)
    # The token check runs first: a peer without it learns nothing else. Metrics (when on)
    # sit between it and the status mapping, whose codes they count.
    interceptors: list[grpc.ServerInterceptor] = [StatusInterceptor()]
    metrics = None
    if config.metrics_listen is not None:
        from ._metrics import MetricsInterceptor, WorkerMetrics, start_metrics

        metrics = WorkerMetrics(servicer)
        interceptors.insert(0, MetricsInterceptor(metrics))
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
            *limits.grpc_options(),
        ],
        maximum_concurrent_rpcs=None,
        interceptors=interceptors,
    )
    pb_grpc.add_JaxWorkerServiceServicer_to_server(servicer, server)
    health = add_health_service(server)
    _raise_open_file_limit(limits.max_connections * len(addresses) + _FILES_KEPT_FREE)
    bound: list[str] = []
    if metrics is not None and config.metrics_listen is not None:
        servicer.metrics_server = start_metrics(metrics, config.metrics_listen)
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
                remove_stale_socket(path)
            if credentials is not None and is_tcp(address):
                port = server.add_secure_port(address, credentials)
            else:
                port = server.add_insecure_port(address)
            if port == 0:
                raise OSError(f"could not listen on {address}")
            if is_tcp(address):
                host = address.rsplit(":", 1)[0]
                bound.append(f"{host}:{port}")
            else:
                bound.append(address)
        server.start()
    except BaseException:
        if servicer.metrics_server is not None:
            servicer.metrics_server.close()
        raise
    finally:
        os.umask(old_umask)
    for address in bound:
        if address.startswith("unix://"):
            os.chmod(address[len("unix://"):], 0o600)
    if config.fast_path:
        near = next((unix_socket_path(a) for a in bound if unix_socket_path(a)), None)
        try:
            counting = None
            if metrics is not None:  # fast-path calls are counted like gRPC ones
                from ._metrics import _counting

                def counting(name: str, handler: Any, metrics: Any = metrics) -> Any:
                    return _counting(metrics, name)(handler, False)
            servicer.data_plane = DataPlaneListener(
                lambda name: getattr(servicer, name), near=near,
                max_frame_bytes=config.max_frame_bytes, spin_us=config.spin_us,
                hello_timeout=limits.handshake_timeout, max_connections=limits.max_connections,
                wrap=counting)
        except OSError as error:  # calls then use gRPC; each client logs why
            log.warning("no same-host data plane (calls use gRPC): cannot listen on a "
                        "private unix socket (%s)", error)
    health.serving()
    # not a declared attribute: shutdown() reads it with getattr to report NOT_SERVING first
    servicer.health = health  # type: ignore[attr-defined]
    if any(is_tcp(a) for a in bound):
        log.info("TCP %s", "without TLS (--insecure or loopback)" if tls is None else
                 "over TLS, client certificates required" if tls.ca_file else "over TLS")
    log.info("serving %s on %s", ", ".join(sorted(compiled)), ", ".join(bound))
    return server, bound, servicer


def remove_stale_socket(path: str) -> None:
    """Unlink ``path`` only if it is a stale unix socket (one that refuses connections: its
    worker is gone). Anything else there is in use, or not ours to delete: a regular file,
    a directory, or the socket of a live worker (taking it over would leave that worker
    running, unreachable). Raises ``OSError(EADDRINUSE)`` naming what is there."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(errno.EADDRINUSE,
                      f"address in use: `{path}` exists and is not a socket; remove it or "
                      "listen on another path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # stale: an earlier worker died without removing it
        return
    except OSError as error:
        raise OSError(errno.EADDRINUSE,
                      f"address in use: cannot tell whether the socket `{path}` is stale "
                      f"({error.strerror or error}); remove it if no worker uses it") from None
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE,
                  f"address in use: a worker already listens on `{path}`; stop it first, or "
                  "listen on another path")


def shutdown(server: grpc.Server, servicer: JaxWorkerServicer, grace: float = 30.0) -> None:
    """Drain: refuse new calls, let in-flight ones finish, end sessions, stop."""
    health = getattr(servicer, "health", None)
    if health is not None:
        health.not_serving()
    servicer.shutting_down.set()
    server.stop(grace).wait(grace + 5)
    if servicer.data_plane is not None:
        servicer.data_plane.close(grace)
    for session_id in list(servicer.sessions):
        servicer.end_session(session_id)
    if servicer.metrics_server is not None:
        servicer.metrics_server.close()


def serve(
    functions: Mapping[str, Callable[..., Any] | str],
    addresses: str | Iterable[str],
    *,
    token: str | None = None,
    config: WorkerConfig | None = None,
    ready_file: str | None = None,
    grace: float = 30.0,
    tls: TlsConfig | None = None,
    insecure: bool = False,
    connection_limits: ConnectionLimits | None = None,
) -> int:
    """Run a worker until SIGTERM / SIGINT; then drain in-flight calls and return 0.
    The keywords are ``create_server``'s.

    Args:
        functions: Name -> JAX callable or ``"package.module:attr"``.
        addresses: One address or several (``unix:///path``, ``host:port``).
        token: The bearer token TCP clients must send (default: ``TORCH_JAX_INTEROP_TOKEN``).
        config: Limits and paths (``WorkerConfig()`` by default).
        ready_file: Written (JSON with the bound addresses and the pid) once the worker serves.
        grace: Seconds in-flight calls get to finish after SIGTERM.
        tls: Certificates for the TCP listeners.
        insecure: Allow plaintext TCP on a non-loopback address (a trusted network only).
        connection_limits: Connection caps and timeouts of the listeners.

    Returns:
        The exit status: 0 after a drain.

    Raises:
        ValueError, UntrustedSocketError, OSError: As ``create_server``.
    """
    server, bound, servicer = create_server(functions, addresses, token=token, config=config,
                                            tls=tls, insecure=insecure,
                                            connection_limits=connection_limits)
    return run_until_stopped(server, bound, servicer, ready_file=ready_file, grace=grace)


def run_until_stopped(server: grpc.Server, bound: list[str], servicer: JaxWorkerServicer, *,
                      ready_file: str | None = None, grace: float = 30.0) -> int:
    """Serve a worker ``create_server`` built until SIGTERM / SIGINT; then drain and return
    0. ``ready_file`` gets ``{"addresses", "pid", "metrics"}`` as JSON once serving
    (``metrics``: the Prometheus endpoint's ``host:port``, or null)."""
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    if ready_file:
        import json

        tmp = f"{ready_file}.tmp"
        with open(tmp, "w") as f:
            metrics = servicer.metrics_server
            json.dump({"addresses": bound, "pid": os.getpid(),
                       "metrics": metrics.address if metrics is not None else None}, f)
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
