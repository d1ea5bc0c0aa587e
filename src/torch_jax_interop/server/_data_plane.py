"""The worker's half of the same-host data plane (Note [Same-host data plane] in
``transport/_data_plane.py``): one listening unix socket, one thread per bound connection,
each request served by the servicer's own ``Call`` / ``Backward`` / ``Release``."""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc

from ..proto.v1 import interop_pb2 as pb
from ..transport import _data_plane as frames
from ._interceptors import UndecodableRequest, _abort

log = logging.getLogger("torch_jax_interop.server")

_JOIN_TIMEOUT_S = 2.0

# kind -> (servicer method name, request type)
_REQUESTS: dict[int, tuple[str, Any]] = {
    pb.DATA_PLANE_FRAME_KIND_CALL: ("Call", pb.CallRequest),
    pb.DATA_PLANE_FRAME_KIND_BACKWARD: ("Backward", pb.BackwardRequest),
    pb.DATA_PLANE_FRAME_KIND_RELEASE: ("Release", pb.ReleaseRequest),
}


Handler = Callable[[Any, Any], Any]


def _mapping_errors(method: Handler, name: str) -> Handler:
    """``method`` raising :class:`_Aborted` with the status gRPC's StatusInterceptor would
    have set (Note [Status codes of the worker] in ``_interceptors.py``: the same code)."""
    def run(request: Any, context: Any) -> Any:
        try:
            return method(request, context)
        except _Aborted:
            raise
        except Exception as error:
            _abort(context, name, error)  # raises _Aborted
            raise
    return run


class _Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class DataPlaneContext:
    """Stands in for ``grpc.ServicerContext`` in the servicer's ``Call`` / ``Backward`` /
    ``Release``: the client is active while its connection is open; ``abort`` raises."""

    def __init__(self, sock: socket.socket) -> None:
        self._hangup = frames.HangupWatch(sock)
        self._code: grpc.StatusCode | None = None

    def is_active(self) -> bool:
        return not self._hangup.closed()

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self._code = code
        raise _Aborted(code, details)

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def peer(self) -> str:
        return "unix:data-plane"

    def invocation_metadata(self) -> tuple[()]:
        return ()

    def time_remaining(self) -> None:
        return None  # the client keeps the deadline (Note [Same-host data plane])


class _Offer:
    __slots__ = ("secret", "client_pid", "connection", "busy", "ending")

    def __init__(self, secret: bytes, client_pid: int) -> None:
        self.secret = secret
        self.client_pid = client_pid
        self.connection: socket.socket | None = None
        self.busy = False  # a request is being served: its answer is still sent
        self.ending = False  # the session ended: close after the request in progress


class DataPlaneListener:
    """Listens on a private unix socket; binds each connection to the one session whose
    secret it presents. ``serve(method, request, context)`` runs one request (the
    servicer's method by name). Close with :meth:`close` (removes the socket and its
    directory, ends every connection)."""

    def __init__(self, serve: Callable[[str], Handler], *,
                 near: str | None, max_frame_bytes: int, hello_timeout: float,
                 max_connections: int, spin_us: int = 0,
                 wrap: Callable[[str, Handler], Handler] | None = None) -> None:
        # The servicer's methods with the status mapping of gRPC's StatusInterceptor, then
        # ``wrap`` (the metrics' counting, as MetricsInterceptor wraps the gRPC methods).
        self._handlers: dict[str, Handler] = {}
        for name, _ in _REQUESTS.values():
            handler = _mapping_errors(serve(name), name)
            self._handlers[name] = wrap(name, handler) if wrap is not None else handler
        self.max_frame_bytes = max_frame_bytes
        # A silent peer holds a thread at most this long (--handshake-timeout) ...
        self.hello_timeout = hello_timeout
        # ... and at most this many connections have a thread (--max-connections).
        self.max_connections = max_connections
        # Polls this long for a session's next request before sleeping (--spin-us).
        self.spin_us = spin_us
        self.path = frames.private_socket_path(near)
        self._offers: dict[str, _Offer] = {}
        self._lock = threading.Lock()
        self._threads: set[threading.Thread] = set()
        self._closed = False
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # the socket file is created 0600
        try:
            self._listener.bind(self.path)
            self._listener.listen(64)
        except BaseException:
            self._listener.close()
            frames.remove_socket_path(self.path)
            raise
        finally:
            os.umask(old_umask)
        self._accepting = threading.Thread(target=self._accept_loop, daemon=True,
                                           name="tji-data-plane-accept")
        self._accepting.start()
        log.info("same-host data plane on %s", self.path)

    # -- sessions --------------------------------------------------------------------------

    def offer(self, session_id: str, client_pid: int) -> Any:
        """A ``DataPlaneOffer`` for a new session."""
        secret = secrets.token_bytes(32)
        with self._lock:
            self._offers[session_id] = _Offer(secret, client_pid)
        return pb.DataPlaneOffer(socket_path=self.path, secret=secret,
                                 max_frame_bytes=self.max_frame_bytes)

    def forget(self, session_id: str) -> None:
        """The session ended: its secret is void and its connection is closed (the client
        sees EOF at once)."""
        with self._lock:
            offer = self._offers.pop(session_id, None)
            if offer is None or offer.connection is None:
                return
            offer.ending = True
            if offer.busy:  # like gRPC's drain: the call in progress still gets its answer
                return
        _shutdown(offer.connection)

    # -- connections -----------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed
            if self._closed:
                conn.close()
                return
            with self._lock:
                full = len(self._threads) >= self.max_connections
            if full:
                self._refuse(conn, grpc.StatusCode.RESOURCE_EXHAUSTED,
                             f"the data plane has {self.max_connections} connections "
                             "(--max-connections)")
                conn.close()
                continue
            thread = threading.Thread(target=self._connection, args=(conn,), daemon=True,
                                      name="tji-data-plane")
            with self._lock:
                self._threads.add(thread)
            thread.start()

    def _connection(self, conn: socket.socket) -> None:
        session_id: str | None = None
        offer: _Offer | None = None
        why = "the session ended"
        try:
            session_id, offer = self._hello(conn)
            if offer is None or session_id is None:
                return
            self._serve(conn, session_id, offer)
        except (EOFError, OSError) as error:
            why = str(error) or type(error).__name__
        finally:
            if session_id is not None:
                log.info("session %s: data-plane connection closed (%s)", session_id[:8], why)
            if offer is not None:
                with self._lock:
                    if offer.connection is conn:
                        offer.connection = None
            conn.close()
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _refuse(self, conn: socket.socket, code: grpc.StatusCode, why: str,
                request_id: int = 0) -> None:
        log.warning("refused a data-plane connection: %s", why)
        with contextlib.suppress(OSError):
            frames.send_frame(conn, pb.DATA_PLANE_FRAME_KIND_ERROR, request_id,
                              pb.DataPlaneStatus(
                code=code.value[0], message=why).SerializeToString())

    def _hello(self, conn: socket.socket) -> tuple[str | None, _Offer | None]:
        conn.settimeout(self.hello_timeout)
        try:
            kind, _, body = frames.recv_frame(conn, frames.HELLO_MAX_BYTES)
        except (EOFError, OSError) as error:
            self._refuse(conn, grpc.StatusCode.INVALID_ARGUMENT,
                         f"no valid hello within {self.hello_timeout:g} s "
                         f"(--handshake-timeout): {error}")
            return None, None
        pid, uid, _ = frames.peer_credentials(conn)
        if kind != pb.DATA_PLANE_FRAME_KIND_HELLO:
            self._refuse(conn, grpc.StatusCode.INVALID_ARGUMENT,
                         "the first frame on the data plane must be a DataPlaneHello")
            return None, None
        hello = pb.DataPlaneHello()
        try:
            hello.ParseFromString(body)
        except Exception:  # DecodeError
            self._refuse(conn, grpc.StatusCode.INVALID_ARGUMENT,
                         "the hello frame is not a valid DataPlaneHello message")
            return None, None
        if uid != os.getuid():
            self._refuse(conn, grpc.StatusCode.PERMISSION_DENIED,
                         f"peer uid {uid} is not the worker's uid {os.getuid()}")
            return None, None
        with self._lock:
            offer = self._offers.get(hello.session_id)
            if offer is None or not hmac.compare_digest(offer.secret, hello.secret):
                why = "unknown session or wrong secret"
            elif offer.client_pid and pid != offer.client_pid:
                why = (f"peer pid {pid} is not the session's client pid {offer.client_pid} "
                       "(another process, or another PID namespace)")
            elif offer.connection is not None:
                why = "the session already has a data-plane connection"
            else:
                why = ""
                offer.connection = conn
        if why:
            self._refuse(conn, grpc.StatusCode.PERMISSION_DENIED, why)
            return None, None
        conn.settimeout(None)
        frames.send_frame(conn, pb.DATA_PLANE_FRAME_KIND_OK, 0, b"")
        log.info("session %s: calls use the same-host data plane", hello.session_id[:8])
        return hello.session_id, offer

    def _serve(self, conn: socket.socket, session_id: str, offer: _Offer) -> None:
        context = DataPlaneContext(conn)
        spinner = frames.Spinner(conn, self.spin_us)
        while True:
            spinner.wait()  # Note [Spin, then sleep]
            try:
                kind, request_id, body = frames.recv_frame(conn, self.max_frame_bytes)
            except frames.FrameTooLargeError as error:
                self._refuse(conn, grpc.StatusCode.RESOURCE_EXHAUSTED,
                             f"{error} (--max-frame-bytes); the connection is closed",
                             error.request_id)
                return
            with self._lock:
                if offer.ending:
                    return
                offer.busy = True
            try:
                self._answer(conn, session_id, context, kind, request_id, body)
            finally:
                with self._lock:
                    offer.busy = False
                    ending = offer.ending
            if ending:
                return

    def _answer(self, conn: socket.socket, session_id: str, context: DataPlaneContext,
                kind: int, request_id: int, body: bytes) -> None:
        entry = _REQUESTS.get(kind)
        if entry is None:
            self._refuse(conn, grpc.StatusCode.INVALID_ARGUMENT,
                         f"unknown data-plane frame kind {kind}; the connection is closed",
                         request_id)
            _shutdown(conn)
            return
        name, request_type = entry
        context._code = None
        try:
            request = request_type()
            try:
                request.ParseFromString(body)
            except Exception as error:  # DecodeError
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              UndecodableRequest(name, error).refusal())
            if request.session_id != session_id:
                context.abort(grpc.StatusCode.PERMISSION_DENIED,
                              "this data-plane connection serves another session")
            response = self._handlers[name](request, context)
        except _Aborted as aborted:
            frames.send_frame(conn, pb.DATA_PLANE_FRAME_KIND_ERROR, request_id,
                              pb.DataPlaneStatus(code=aborted.code.value[0],
                                                 message=aborted.details)
                              .SerializeToString())
            return
        frames.send_frame(conn, pb.DATA_PLANE_FRAME_KIND_OK, request_id,
                          response.SerializeToString())

    def close(self, grace: float = _JOIN_TIMEOUT_S) -> None:
        """Stop listening; end every connection once its request in progress is answered
        (waiting ``grace`` seconds at most); remove the socket and its directory."""
        if self._closed:
            return
        self._closed = True
        _shutdown(self._listener)
        self._listener.close()
        frames.remove_socket_path(self.path)
        with self._lock:
            connections = [o.connection for o in self._offers.values() if o.connection]
            threads = list(self._threads)
        for session_id in list(self._offers):
            self.forget(session_id)
        self._accepting.join(_JOIN_TIMEOUT_S)
        deadline = time.monotonic() + grace
        for thread in threads:
            thread.join(max(deadline - time.monotonic(), 0.0))
        for conn in connections:  # a request still running past the grace: cut off
            _shutdown(conn)


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
