"""The client's half of the same-host data plane (Note [Same-host data plane] in
``transport/_data_plane.py``): one connection per session, one request at a time."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc

from .._errors import (
    DeadlineExceededError,
    MalformedReplyError,
    RemoteError,
    WorkerUnavailableError,
)
from ..proto.v1 import interop_pb2 as pb
from ..transport import _data_plane as frames
from ._errors_map import error_for_status

_KINDS = {"Call": pb.DATA_PLANE_FRAME_KIND_CALL,
          "Backward": pb.DATA_PLANE_FRAME_KIND_BACKWARD,
          "Release": pb.DATA_PLANE_FRAME_KIND_RELEASE}
_RESPONSES = {"Call": pb.CallResponse, "Backward": pb.BackwardResponse,
              "Release": pb.ReleaseResponse}
_CODES = {code.value[0]: code for code in grpc.StatusCode}


class DataPlaneRefused(Exception):
    """The data plane cannot be used for this session; the message says why."""


class DataPlaneConnection:
    """A session's bound connection to the worker's data-plane socket."""

    def __init__(self, offer: Any, session_id: str, *, worker_pid: int, timeout: float,
                 address: str, max_response_bytes: int, spin_us: int = 0) -> None:
        self.address = address
        self.max_response_bytes = max_response_bytes  # as gRPC's receive limit
        self.path = offer.socket_path
        self.max_frame_bytes = offer.max_frame_bytes
        self._lock = threading.Lock()
        self._next_id = 1
        self.closed = False
        self.pid = os.getpid()  # a forked child must not write into the parent's stream
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            try:
                sock.connect(offer.socket_path)
            except OSError as error:
                raise DataPlaneRefused(
                    f"cannot connect to its socket {offer.socket_path} ({error.strerror or error}"
                    "; another mount namespace?)") from None
            pid, uid, _ = frames.peer_credentials(sock)
            # Whom we talk to (Note [Whom a unix socket reaches]): the worker's own process.
            if uid not in (os.getuid(), 0) or (worker_pid and pid != worker_pid):
                raise DataPlaneRefused(
                    f"its socket {offer.socket_path} is served by pid {pid} (uid {uid}), not "
                    f"by the worker (pid {worker_pid}, another PID namespace?)")
            hello = pb.DataPlaneHello(session_id=session_id, secret=offer.secret)
            try:
                frames.send_frame(sock, pb.DATA_PLANE_FRAME_KIND_HELLO, 0,
                                  hello.SerializeToString())
                kind, _, body = frames.recv_frame(sock, frames.HELLO_MAX_BYTES)
            except (EOFError, OSError) as error:
                raise DataPlaneRefused(f"the hello on {offer.socket_path} failed ({error})"
                                       ) from None
            if kind != pb.DATA_PLANE_FRAME_KIND_OK:
                status = _status(body)
                raise DataPlaneRefused(f"the worker refused the connection: {status.message}")
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._spinner = frames.Spinner(sock, spin_us)

    def request(self, name: str, request: Any, timeout: float, what: str, *,
                spin: bool = True) -> Any:
        """Send one request and wait (at most ``timeout`` seconds, counted from now) for
        its response, polling first for up to ``spin_us`` when ``spin`` (Note [Spin, then
        sleep]). Raises the exception gRPC's status would have mapped to; on a dead
        worker or a deadline the connection is closed (the caller stops using it).
        Raises :class:`DataPlaneRefused`, sending nothing, for a request over the worker's
        frame limit or from a forked child (the caller sends that one over gRPC)."""
        if os.getpid() != self.pid:
            raise DataPlaneRefused("this process is a fork of the one that connected: the "
                                   "connection belongs to the parent")
        body = request.SerializeToString()
        if len(body) > self.max_frame_bytes:
            raise DataPlaneRefused(f"the request ({len(body)} bytes) is larger than the "
                                   f"worker's --max-frame-bytes ({self.max_frame_bytes})")
        deadline = time.monotonic() + timeout
        if not self._lock.acquire(timeout=timeout):
            raise DeadlineExceededError(
                f"{what} on worker {self.address} failed (DEADLINE_EXCEEDED): another call "
                f"of this session held the data plane for {timeout:g} s. Raise `timeout=` "
                "in connect() if the function is slow.")
        try:
            if self.closed:
                raise WorkerUnavailableError(
                    f"{what} on worker {self.address} failed: the data-plane connection is "
                    "closed")
            request_id = self._next_id
            self._next_id = (self._next_id + 1) & 0xFFFFFFFF or 1
            try:
                self._sock.settimeout(max(deadline - time.monotonic(), 1e-3))
                frames.send_frame(self._sock, _KINDS[name], request_id, body)
                if spin:
                    self._spinner.wait()
                self._sock.settimeout(max(deadline - time.monotonic(), 1e-3))
                kind, answered, body = frames.recv_frame(self._sock, self.max_response_bytes)
            except TimeoutError:
                self.close()
                raise DeadlineExceededError(
                    f"{what} on worker {self.address} failed (DEADLINE_EXCEEDED): no answer "
                    f"within {timeout:g} s on the same-host data plane. Raise `timeout=` in "
                    "connect() if the function is slow.") from None
            except (EOFError, OSError) as error:
                self.close()
                raise WorkerUnavailableError(
                    f"{what} on worker {self.address} failed (UNAVAILABLE): the worker "
                    f"closed the same-host data plane ({error}). Is the worker running "
                    "(`torch-jax-interop health ADDRESS`)?") from None
            if answered != request_id:
                self.close()
                raise MalformedReplyError(
                    f"the worker answered request {answered} on the data plane, expected "
                    f"{request_id}")
            if kind == pb.DATA_PLANE_FRAME_KIND_ERROR:
                status = _status(body)
                code = _CODES.get(status.code, grpc.StatusCode.UNKNOWN)
                raise error_for_status(code, status.message, what, self.address)
            if kind != pb.DATA_PLANE_FRAME_KIND_OK:
                self.close()
                raise MalformedReplyError(f"unknown data-plane frame kind {kind}")
            response = _RESPONSES[name]()
            try:
                response.ParseFromString(body)
            except Exception as error:  # DecodeError
                raise MalformedReplyError(
                    f"the worker's {name} response is no valid message ({error})") from None
            return response
        finally:
            self._lock.release()

    def close(self) -> None:
        """Close the connection (the worker frees its side at once; idempotent)."""
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()


class Reconnect:
    """When to connect a session's data plane again after a deadline closed it (Note
    [Same-host data plane]): the worker takes a new connection for the session once it has
    finished the abandoned call. First after :data:`FIRST_S`, then at doubling intervals up
    to :data:`MAX_S`; one thread tries at a time, the others' calls meanwhile use gRPC."""

    FIRST_S = 1.0
    MAX_S = 60.0
    HELLO_TIMEOUT_S = 0.5
    """The most a call waits for the worker's answer to a new hello (a stopped worker)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._wait = self.FIRST_S
        self._at = time.monotonic() + self._wait
        self.attempts = 0

    def attempt(self, connect: Callable[[], DataPlaneConnection]
                ) -> DataPlaneConnection | None:
        """``connect()`` when an attempt is due and no other thread makes one; None (the
        call goes by gRPC) when not due, busy, or refused."""
        if time.monotonic() < self._at or not self._lock.acquire(blocking=False):
            return None
        try:
            if time.monotonic() < self._at:
                return None
            self.attempts += 1
            try:
                return connect()
            except DataPlaneRefused:
                self._wait = min(self._wait * 2, self.MAX_S)
                self._at = time.monotonic() + self._wait
                return None
        finally:
            self._lock.release()


def _status(body: bytes) -> Any:
    status = pb.DataPlaneStatus()
    try:
        status.ParseFromString(body)
    except Exception as error:  # DecodeError
        raise RemoteError(f"the worker's data-plane error frame is no valid message ({error})"
                          ) from None
    return status
