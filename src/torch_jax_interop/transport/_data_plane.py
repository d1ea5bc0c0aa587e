"""Frames of the same-host data plane: a private unix socket carrying the protocol's own
messages. No framework, no protobuf: both ends' halves (``server/_data_plane.py``,
``client/_data_plane.py``) build on these helpers.

Note [Same-host data plane]
===========================

gRPC is the control plane (sessions, regions, auth, health) and the path across hosts. On
one host a Python gRPC unary call costs ~270 us, most of it in the HTTP/2 stack and its
thread hand-offs, while a unix socketpair ping-pong between two Python processes costs
~21 us. So a session whose client runs on the worker's host (same boot id) may carry its
``Call``, ``Backward`` and ``Release`` requests over a private unix socket instead:

* **Offer.** The worker listens on one socket, ``data.sock``, in a directory it creates
  with mode 0700 (next to its gRPC unix socket, or in the temporary directory); the socket
  file is 0600. ``OpenSession``'s response carries a ``DataPlaneOffer``: the path, a random
  32-byte secret for this session, and the largest frame the worker reads.
* **Hello.** The client connects and sends ``DataPlaneHello(session_id, secret)``. The
  worker refuses (an ERROR frame, then it closes the connection; the worker stays up)
  unless the peer's ``SO_PEERCRED`` uid is its own uid, the pid is the one that opened the
  session (``OpenSessionRequest.client_pid``: a client in another PID namespace is refused
  and uses gRPC), the secret matches (constant-time compare) and the session has no
  connection yet. So only the session's own client can use it: another user cannot enter
  the directory, another process of the same user lacks the secret (it travelled over the
  session's gRPC stream), and a second connection is refused.
* **Frames.** A 12-byte header (:data:`HEADER`: kind, request id, body length; little
  endian) and a body: the serialized request or response message of the protocol, or a
  ``DataPlaneStatus`` for an error (the gRPC status code and message, mapped to the same
  client exceptions as over gRPC). Bodies over ``max_frame_bytes`` (worker:
  ``--max-frame-bytes``) are refused before they are read: the peer is cut off.
* **Same code.** The worker's connection thread calls the servicer's ``Call`` /
  ``Backward`` / ``Release`` with a context object standing in for gRPC's, and maps their
  exceptions with the interceptor's own mapping: every bounds check is the same code.
* **Faults.** A dead peer on either side is an EOF on the socket, seen at once: the client
  raises ``WorkerUnavailableError`` as for a dead worker over gRPC; the worker frees the
  connection and leaves the session to its gRPC stream (the usual grace). The client waits
  for a response with the call's deadline as the socket timeout; past it the client closes
  the connection (the worker's ``context.is_active()`` then reads false, so it writes no
  outputs and keeps no residuals), raises ``DeadlineExceededError``, and the session's
  later calls use gRPC until the worker has finished the abandoned call and accepts the
  client's new connection (``client/_data_plane.py``, ``Reconnect``). A session's end
  closes its connection.

Note [Spin, then sleep]
=======================

A process blocked in ``recv`` sleeps in the kernel, and waking it is the dearest part of a
round trip: on this project's 2-core KVM machine a unix socketpair ping-pong between two
Python processes costs ~125 us when each side sleeps, ~7-10 us when each side first polls
the socket without sleeping (``poll`` with a zero timeout, in a loop). The sender's
``send`` then only copies bytes: no sleeping task to wake, no inter-processor interrupt (a
VM exit on a hypervisor). So both ends spin for a bounded time before they block:

* the client, after sending a request from a synchronous call, polls for the response for
  at most ``connect(spin_us=)`` (an asynchronous call's thread does not spin: it would take
  the GIL and a core from the torch work it is meant to overlap);
* the worker's connection thread, after answering, polls for the session's next request for
  at most ``--spin-us`` (a training loop's backward follows its forward within microseconds
  to milliseconds).

A wait longer than the spin costs what it cost before plus the spin (bounded: 200 us by
default); ``0`` on either side turns it off. The spin adapts: after
``Spinner.MISSES_BEFORE_BACKOFF`` spins with no hit between them that end without the
peer's frame (the worker computes for milliseconds, or the machine's cores are busy with
other processes, so that spinning takes the very CPU the peer needs), the next
``Spinner.BACKOFF_WAITS`` waits sleep at once; then it tries again. A spin that ends
without the frame first sleeps up to ``Spinner.NEAR_MISS_MS`` in ``poll``: a frame that
comes then is a near miss (the peer is only a little slower than the spin: a slower
machine, a busy moment) and does not count, so small calls on a slow machine keep spinning
(measured on a 2-vCPU VM where the worker answered a 16-float call in ~110-160 us: misses
sent 16 % of calls into backoff, and the mean call took 386 us; with near misses not
counted, none, and 301 us). A training step whose forward takes milliseconds thus spins a
few times per hundred calls, and a loaded machine sees the sleeping behaviour.
Deadlines and the dead-peer checks are unchanged: a peer's close makes ``poll`` return at
once.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import stat
import struct
import tempfile
import time

from .._names import DEFAULT_MAX_FRAME_BYTES as DEFAULT_MAX_FRAME_BYTES

HEADER = struct.Struct("<BxxxII")
"""Frame header: kind (a ``DataPlaneFrameKind``), 3 pad bytes, request id, body length."""
HELLO_MAX_BYTES = 4096
"""A hello frame is a session id and a 32-byte secret: anything longer is refused."""
SOCKET_NAME = "data.sock"
_SOCKET_PATH_LIMIT = 107


class FrameTooLargeError(OSError):
    """A peer announced a frame body over the limit; the connection must be dropped."""

    def __init__(self, message: str, request_id: int) -> None:
        super().__init__(message)
        self.request_id = request_id


def send_frame(sock: socket.socket, kind: int, request_id: int, body: bytes) -> None:
    """One frame; small bodies go in one ``send`` with their header."""
    header = HEADER.pack(kind, request_id, len(body))
    if len(body) <= 1 << 16:
        sock.sendall(header + body)
    else:
        sock.sendall(header)
        sock.sendall(body)


def _recv_exactly(sock: socket.socket, nbytes: int) -> bytearray:
    buffer = bytearray(nbytes)
    view = memoryview(buffer)
    got = 0
    while got < nbytes:
        n = sock.recv_into(view[got:])
        if n == 0:
            raise EOFError("the peer closed the data-plane connection")
        got += n
    return buffer


def recv_frame(sock: socket.socket, max_body: int) -> tuple[int, int, bytes]:
    """``(kind, request_id, body)`` of the next frame. Raises ``EOFError`` when the peer
    closed the connection, :class:`FrameTooLargeError` for a body over ``max_body``, and
    ``TimeoutError`` when the socket's timeout passes."""
    kind, request_id, length = HEADER.unpack(_recv_exactly(sock, HEADER.size))
    if length > max_body:
        raise FrameTooLargeError(
            f"a data-plane frame of {length} bytes exceeds the limit of {max_body} bytes",
            request_id)
    return kind, request_id, bytes(_recv_exactly(sock, length)) if length else b""


class Spinner:
    """Polls one socket for readability without sleeping, for a bounded time, and stops
    polling for a while when polling keeps failing (Note [Spin, then sleep])."""

    MISSES_BEFORE_BACKOFF = 4
    """Spins that end without the peer's frame (near misses aside), with no hit in between,
    before the spinner backs off ..."""
    BACKOFF_WAITS = 64
    """... for this many waits (each returns at once: the caller sleeps in ``recv``)."""
    NEAR_MISS_MS = 1
    """After a spin that missed, a sleep this long (milliseconds, ``poll``'s unit) tells a
    near miss (the frame came in it: not counted) from a miss."""

    __slots__ = ("_misses", "_poll", "_skip", "spin")

    def __init__(self, sock: socket.socket, spin_us: int) -> None:
        self.spin = spin_us * 1e-6
        self._poll = select.poll()
        self._poll.register(sock, select.POLLIN)
        self._misses = 0
        self._skip = 0

    @property
    def backing_off(self) -> bool:
        """Whether the next waits return at once because the last spins all missed."""
        return self._skip > 0

    def wait(self) -> None:
        """Return once the socket is readable (data, EOF or an error), or after this
        spinner's ``spin`` seconds plus at most :data:`NEAR_MISS_MS` of sleep (a frame
        that comes in that sleep is a near miss, which does not count towards backing
        off); never longer, and without reading anything."""
        spin = self.spin
        if spin <= 0:
            return
        if self._skip:
            self._skip -= 1
            return
        poll, clock = self._poll.poll, time.perf_counter
        end = clock() + spin
        # No sched_yield in the loop: on a loaded machine it hands the core to another
        # process for a whole time slice (milliseconds), far longer than the spin.
        while not poll(0):
            if clock() >= end:
                if poll(self.NEAR_MISS_MS):
                    # A near miss: the peer answers a little slower than the spin (a
                    # slower machine, a busy moment). Sleeping here costs what sleeping in
                    # `recv` would; backing off would make the next calls sleep too.
                    return
                # The peer is much slower than the spin (a long computation), or this
                # machine's cores are busy and the spin takes the peer's CPU: after a few
                # such misses with no hit between them, sleep at once for a while, then
                # try again.
                self._misses += 1
                if self._misses >= self.MISSES_BEFORE_BACKOFF:
                    self._misses = 0
                    self._skip = self.BACKOFF_WAITS
                return
        self._misses = 0


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """``(pid, uid, gid)`` of a unix socket's peer (``SO_PEERCRED``, Linux)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


class HangupWatch:
    """Whether a socket's peer has closed (or reset) the connection: one ``poll`` with a
    zero timeout, never blocking. Unread bytes (a pipelined request) do not count."""

    __slots__ = ("_poll",)

    def __init__(self, sock: socket.socket) -> None:
        self._poll = select.poll()
        # POLLHUP and POLLERR are always reported; POLLRDHUP: the peer closed its end.
        self._poll.register(sock, select.POLLRDHUP)

    def closed(self) -> bool:
        return bool(self._poll.poll(0))


def private_socket_path(near: str | None) -> str:
    """A fresh ``data.sock`` path in a new 0700 directory: beside ``near`` (the worker's
    gRPC unix socket, so that a container sharing that socket's volume reaches it too) when
    that leaves the path short enough, else in the temporary directory. Directories that a
    killed worker left there are removed first (:func:`remove_stale_socket_dirs`)."""
    parents = [os.path.dirname(near)] if near else []
    parents.append(tempfile.gettempdir())
    for parent in parents:
        remove_stale_socket_dirs(parent)
        # mkdtemp makes the directory 0700: nobody else can reach the socket inside.
        candidate = os.path.join(parent, "tji-dp-XXXXXXXX", SOCKET_NAME)
        if len(candidate.encode()) > _SOCKET_PATH_LIMIT:
            continue
        with contextlib.suppress(OSError):
            return os.path.join(tempfile.mkdtemp(prefix="tji-dp-", dir=parent), SOCKET_NAME)
    raise OSError("no directory with a short enough path for the data-plane socket")


# A directory without a socket is a worker killed between mkdtemp and bind: left alone this
# long, so that a worker starting at this moment is never disturbed.
STALE_EMPTY_DIR_AGE = 60.0


def remove_stale_socket_dirs(parent: str) -> list[str]:
    """Remove the ``tji-dp-*`` directories in ``parent`` that a killed worker left behind;
    return their paths.

    A clean stop removes its directory; a SIGKILLed worker cannot. Only this user's
    directories (not links) are considered, and one is stale when connecting to its socket
    is refused (``ECONNREFUSED``: a socket file with no listener) or when it has no socket
    and is older than :data:`STALE_EMPTY_DIR_AGE`. Liveness is asked of the socket, not of a
    pid, so workers in other PID namespaces sharing the directory (compose's socket volume)
    are never mistaken for dead. A live worker sees one connection that sends nothing and
    closes at once (it is dropped like any silent peer).
    """
    removed: list[str] = []
    uid = os.getuid()
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith("tji-dp-"):
            continue
        try:
            info = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != uid:
            continue
        path = os.path.join(entry.path, SOCKET_NAME)
        if os.path.lexists(path):
            if not _refused(path):
                continue
        elif time.time() - info.st_mtime < STALE_EMPTY_DIR_AGE:
            continue
        remove_socket_path(path)
        if not os.path.exists(entry.path):
            removed.append(entry.path)
    return removed


def _refused(path: str) -> bool:
    """Whether nothing listens on the unix socket at ``path`` (a connection is refused)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        return True
    except OSError:
        return False  # not a socket we can judge (a timeout: a busy listener): leave it
    finally:
        probe.close()
    return False


def remove_socket_path(path: str) -> None:
    """Remove the socket file and its private directory (idempotent)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    with contextlib.suppress(OSError):
        os.rmdir(os.path.dirname(path))
