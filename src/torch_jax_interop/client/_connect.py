"""``connect()``: a torch process calling JAX functions served by a worker.

Imports torch and grpc, never JAX (except for ``connect("inproc", ...)``, which runs the
functions in this process and therefore needs JAX).
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, overload

import grpc
import numpy as np
import torch

from .. import _wire
from .._async import (
    DEFAULT_MAX_ASYNC_CALLS,
    DEFAULT_MAX_QUEUED_CALLS,
    CallExecutor,
    check_async_bounds,
    in_async_call,
)
from .._call import Call
from .._errors import (
    DeadlineExceededError,
    InvalidArgumentError,
    ProtocolVersionError,
    RemoteError,
    SharedMemoryFullError,
    TransportError,
    WorkerUnavailableError,
)
from .._names import (
    DEFAULT_SPIN_US,
    TOKEN_ENV,
    check_data_plane,
    check_spin_us,
    check_transport,
)
from .._ranks import rank_address
from .._targets import FunctionInfo as FunctionInfo
from .._tls import TlsConfig, is_loopback, is_tcp, read_token_file
from .._version import __version__
from ..proto.v1 import interop_pb2 as pb, interop_pb2_grpc as pb_grpc
from ..transport import (
    SharedMemoryPool,
    check_socket_path,
    default_shm_dir,
    refuse_abstract,
    region_tag,
    sealing_supported,
    unix_socket_path,
)
from ..transport.cuda import CudaIpcChannel
from ._codec import TORCH_TO_NAME, Decoder, Encoder, align_grads, wire_specs
from ._data_plane import DataPlaneConnection, DataPlaneRefused, Reconnect
from ._errors_map import to_remote_error
from ._remote import RemoteBackend as RemoteBackend, RemoteFunction as RemoteFunction
from ._state import INLINE_THRESHOLD, ResidualHandle, TransferStats, TransportInfo, _Session

if TYPE_CHECKING:  # the bridge, imported at run time only by connect("inproc")
    from ..interop_core._inproc import InprocWorker

log = logging.getLogger("torch_jax_interop.client")

_MESSAGE_OVERHEAD = 16 << 20
DEFAULT_MAX_ARENA_BYTES = 1 << 30
"""The most output-arena bytes a worker may ask this client for, per call, by default."""
_RECONNECT_ATTEMPT_S = 1.5
"""How long a call looks for a worker that went away when no reconnect window is set: long
enough to find one that is already back (the backoff below retries every half second, and a
loaded machine needs some room for the connection itself), short enough that a dead worker
fails the call at once rather than after the whole timeout."""
_CHANNEL_OPTIONS = [
    # A restarted worker is found within a second: gRPC's default backoff (1 s growing to
    # 120 s) would take 5-7 s or more after a few failed attempts. An attempt every half
    # second costs a dead worker's address nothing worth counting.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 500),
]


class Worker:
    """A connection to one JAX worker: one session, opened by ``connect``.

    Use it as a context manager (``with connect(address) as worker: ...``) or call
    ``close()``. ``worker.function(name)`` returns a ``RemoteFunction``; ``worker.transport``
    says how this session moves tensors and ``worker.stats`` counts what it moved. It is
    safe to call functions from several threads. Construct it through ``connect``, which
    documents the arguments.

    Raises:
        WorkerUnavailableError: (on any call) the worker is gone; a restarted worker is
            found within about a second (or ``reconnect_timeout``).
        DeadlineExceededError: (on any call) the call ran past ``timeout``.
    """

    def __init__(self, address: str, *, timeout: float, transport: str,
                 token: str | None, token_file: str | None = None,
                 tls: TlsConfig | None = None, reconnect_timeout: float = 0.0,
                 max_arena_bytes: int = DEFAULT_MAX_ARENA_BYTES,
                 max_async_calls: int = DEFAULT_MAX_ASYNC_CALLS,
                 max_queued_calls: int = DEFAULT_MAX_QUEUED_CALLS,
                 data_plane: str = "auto", spin_us: int = DEFAULT_SPIN_US,
                 max_pool_bytes: int | None = None) -> None:
        check_transport(transport)
        check_async_bounds(max_async_calls, max_queued_calls)
        check_data_plane(data_plane)
        if token is not None and token_file is not None:
            raise ValueError("give token= or token_file=, not both")
        if tls is not None and not is_tcp(address):
            raise ValueError(f"tls= is for TCP addresses (host:port), not `{address}`: a unix "
                             "socket is guarded by its file mode; drop tls= for it")
        if reconnect_timeout < 0:
            raise ValueError(f"reconnect_timeout={reconnect_timeout!r} must be >= 0 (seconds)")
        if max_arena_bytes < 0:
            raise ValueError(f"max_arena_bytes={max_arena_bytes!r} must be >= 0")
        if max_pool_bytes is not None and (isinstance(max_pool_bytes, bool) or not isinstance(
                max_pool_bytes, int) or max_pool_bytes < 1):
            raise ValueError(f"max_pool_bytes={max_pool_bytes!r} must be None (no limit but "
                             "the memory) or a whole number of bytes >= 1")
        check_spin_us(spin_us)
        _check_unix_peer(address)  # after the arguments: a wrong keyword is the first thing to say
        self.address = address
        self.timeout = timeout
        self.reconnect_timeout = reconnect_timeout
        self.max_arena_bytes = max_arena_bytes
        self.max_pool_bytes = max_pool_bytes
        self.requested_transport = transport
        self.requested_data_plane = data_plane
        self.spin_us = spin_us
        if token_file is not None:
            token = read_token_file(token_file)
        token = token if token is not None else os.environ.get(TOKEN_ENV)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        if token and tls is None and is_tcp(address) and not is_loopback(address):
            log.warning("sending the token to %s without TLS: anyone on the path can read it "
                        "and every tensor; pass tls=TlsConfig(...) to connect()", address)
        limit = 256 << 20
        self._max_message_bytes = limit + _MESSAGE_OVERHEAD  # received, either carrier
        options = [
            ("grpc.max_receive_message_length", limit + _MESSAGE_OVERHEAD),
            ("grpc.max_send_message_length", limit + _MESSAGE_OVERHEAD),
            *_CHANNEL_OPTIONS,
        ]
        if tls is not None:
            self._channel = grpc.secure_channel(address, tls.channel_credentials(),
                                                options=[*options, *tls.channel_options()])
        else:
            self._channel = grpc.insecure_channel(address, options=options)
        self._stub = pb_grpc.JaxWorkerServiceStub(self._channel)
        self._lock = threading.Lock()
        self._session: _Session | None = None
        # Residuals to release, sent with the next call. A deque, appended to (finalizers,
        # any thread) and drained by popleft (any calling thread): both atomic, so a release
        # queued while another thread flushes is sent by that flush or the next, never lost.
        self._pending_release: deque[tuple[_Session, int]] = deque()
        self._arena_sizes: dict[Any, int] = {}
        self._closed = False
        self.stats = TransferStats()
        # asynchronous calls (submit / call_async): the synchronous calls, in these threads
        self._executor = CallExecutor(max_async_calls, max_queued_calls,
                                      name="tji-async-call")
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            self._channel.close()
            tls_hint = (" (over TLS: check that the worker serves TLS and that tls= names "
                        "the CA that signed its certificate, and the client certificate "
                        "if the worker requires one)" if tls is not None else "")
            raise WorkerUnavailableError(
                f"no worker answered at {address} within {timeout:g} s{tls_hint}. Start one "
                "with `torch-jax-interop worker --listen ADDRESS --function "
                "NAME=module:attr`, or check the address"
            ) from None
        try:
            self._open_session()
        except BaseException:  # refused (session cap, token) or failed: no channel left open
            self._channel.close()
            raise

    # -- session --------------------------------------------------------------------------

    def _rpc(self, method: Callable[..., Any], request: Any, what: str, *,
             timeout: float | None = None) -> Any:
        try:
            return method(request, timeout=self.timeout if timeout is None else timeout,
                          metadata=self._metadata)
        except grpc.RpcError as error:
            exc = to_remote_error(error, what, self.address)
            if isinstance(exc, WorkerUnavailableError) and self._session is not None:
                self._session.alive.clear()
            raise exc from None

    def _open_session(self) -> _Session:
        stream = self._stub.OpenSession(pb.OpenSessionRequest(
            client_pid=os.getpid(), client_hostname=socket.gethostname(),
            transport={"inline": pb.TRANSPORT_INLINE, "cuda_ipc": pb.TRANSPORT_CUDA_IPC}.get(
                self.requested_transport, pb.TRANSPORT_SHARED_MEMORY),
            protocol_version=_wire.PROTOCOL_VERSION,
        ), metadata=self._metadata)
        # The stream stays open for the session's life (no deadline on it), but its first
        # event is awaited with one: a stopped or silent worker accepts the connection and
        # never answers (Note [Session stream reader]).
        events: queue.Queue[Any] = queue.Queue(maxsize=1)
        alive = threading.Event()
        alive.set()
        threading.Thread(target=self._watch, args=(stream, events, alive), daemon=True,
                         name="tji-session-watch").start()
        try:
            first = events.get(timeout=self.timeout)
        except queue.Empty:
            stream.cancel()
            raise WorkerUnavailableError(
                f"the worker at {self.address} accepted the connection but did not open a "
                f"session within {self.timeout:g} s (stopped, overloaded or not a "
                "torch-jax-interop worker); check it, or raise connect(timeout=...)"
            ) from None
        if isinstance(first, grpc.RpcError):
            raise to_remote_error(first, "opening a session", self.address) from None
        if first is None:
            raise WorkerUnavailableError(
                f"the worker at {self.address} ended the session before opening it"
            )
        if first.protocol_version != _wire.PROTOCOL_VERSION:
            stream.cancel()
            older = "worker" if first.protocol_version < _wire.PROTOCOL_VERSION else "client"
            raise ProtocolVersionError(
                f"the worker at {self.address} speaks protocol v{first.protocol_version} but "
                f"this client (torch-jax-interop {__version__}) speaks "
                f"v{_wire.PROTOCOL_VERSION}; upgrade the {older} so that both sides run the "
                "same torch-jax-interop version"
            )
        session = _Session(first.session_id, stream, None, first.max_inline_bytes, alive,
                           "inline")
        self._session = session
        session.pool, session.transport = self._choose_transport(session, first)
        if self.requested_transport in ("auto", "cuda_ipc"):
            # Decides per GPU at the first CUDA tensor: nothing touches CUDA before that.
            session.cuda = CudaIpcChannel(
                self.requested_transport,
                register=lambda buffer: self._register_cuda(session, buffer),
                release=lambda region_id: self._release_region(session, region_id),
                same_host=bool(first.boot_id) and first.boot_id == _wire.boot_id(),
                worker_pid=first.worker_pid,
            )
        self._negotiate_data_plane(session, first)
        log.info("connected to %s (worker pid %d), transport: %s, calls over %s",
                 self.address, first.worker_pid, session.transport,
                 "the same-host unix socket" if session.data_plane else "gRPC")
        return session

    def _negotiate_data_plane(self, session: _Session, event: Any) -> None:
        """Note [Same-host data plane] (transport/_data_plane.py): connect to the worker's
        private socket, or say once why calls use gRPC."""
        same_host = bool(event.boot_id) and event.boot_id == _wire.boot_id()
        if self.requested_data_plane == "grpc":
            reason = "connect(data_plane='grpc') asked for it"
        elif not event.HasField("data_plane"):
            reason = ("the worker offers no same-host data plane (it runs with "
                      "--no-fast-path, or could not listen on a private socket)")
        elif not same_host:
            reason = "the worker runs on another host (different boot id)"
        else:
            try:
                session.data_plane = self._data_plane_connection(
                    session, event.data_plane, event.worker_pid, self.timeout)
                session.data_plane_offer = (event.data_plane, event.worker_pid)
                return
            except DataPlaneRefused as error:
                reason = f"the same-host data plane cannot be used: {error}"
        session.data_plane_reason = reason
        if self.requested_data_plane == "unix_socket":
            raise TransportError(f"data_plane='unix_socket' is not possible: {reason}")
        log.info("calls to %s use gRPC: %s", self.address, reason)

    def _data_plane_connection(self, session: _Session, offer: Any, worker_pid: int,
                               timeout: float) -> DataPlaneConnection:
        return DataPlaneConnection(
            offer, session.id, worker_pid=worker_pid, timeout=timeout, address=self.address,
            max_response_bytes=self._max_message_bytes, spin_us=self.spin_us)

    def _reconnect_data_plane(self, session: _Session) -> DataPlaneConnection | None:
        """After a deadline closed the data plane: connect again when it is due (the worker
        accepts once it has finished the abandoned call); None meanwhile."""
        retry, (offer, worker_pid) = session.data_plane_retry, session.data_plane_offer
        plane = retry.attempt(lambda: self._data_plane_connection(
            session, offer, worker_pid, min(self.timeout, retry.HELLO_TIMEOUT_S)))
        if plane is None:
            return None
        session.data_plane, session.data_plane_retry = plane, None
        session.data_plane_reason = ""
        log.info("calls to %s use the same-host data plane again", self.address)
        return plane

    def _session_rpc(self, session: _Session, name: str, request: Any, what: str) -> Any:
        """``Call`` / ``Backward`` / ``Release`` over the session's data plane, or gRPC."""
        plane = session.data_plane
        if plane is None and session.data_plane_retry is not None:
            plane = self._reconnect_data_plane(session)
        if plane is None:
            return self._rpc(getattr(self._stub, name), request, what)
        try:
            return plane.request(name, request, self.timeout, what, spin=not in_async_call())
        except DataPlaneRefused:  # over the worker's frame limit: this one goes by gRPC
            return self._rpc(getattr(self._stub, name), request, what)
        except WorkerUnavailableError:
            session.alive.clear()  # as for gRPC's UNAVAILABLE: the next call reconnects
            raise
        except DeadlineExceededError:
            # The connection is closed (the worker writes nothing for the call); the
            # session's next calls use gRPC, whose calls can overlap a stuck one, until the
            # worker takes a new connection (it does once the abandoned call has ended).
            session.data_plane = None
            session.data_plane_reason = (
                "a call ran past its deadline on the same-host data plane, which then "
                "closed; the client connects again once the worker has finished that call")
            if session.data_plane_offer is not None:
                session.data_plane_retry = Reconnect()
            log.warning("calls to %s use gRPC for now: %s", self.address,
                        session.data_plane_reason)
            raise

    @staticmethod
    def _watch(stream: Any, events: queue.Queue[Any], alive: threading.Event) -> None:
        """Note [Session stream reader]: one thread per session reads its stream. The
        first event (or the error that ended the stream, or None) goes to ``events`` for
        ``_open_session``, which waits with a deadline and cancels the stream on timeout,
        ending this thread. Later events mean nothing; the stream's end clears ``alive``."""
        first = True
        try:
            for event in stream:
                if first:
                    events.put(event)
                    first = False
        except grpc.RpcError as error:
            if first:
                events.put(error)
                first = False
        finally:
            if first:
                events.put(None)
            alive.clear()

    def _choose_transport(self, session: _Session, event: Any) -> tuple[Any, str]:
        if self.requested_transport == "inline":
            return None, "inline"
        same_host = bool(event.boot_id) and event.boot_id == _wire.boot_id()
        if not same_host:
            reason = "the worker runs on another host (different boot id)"
        else:
            # Only this process's own setting decides where its tensors go: a worker naming
            # a directory (on disk, or another user's) could otherwise make them persist.
            directory = default_shm_dir()
            # Sealed regions first (Note [Sealed regions] in transport/_shm.py); a worker in
            # another PID namespace cannot see them and may accept file regions instead.
            for sealed in (True, False) if sealing_supported() else (False,):
                pool = SharedMemoryPool(
                    lambda region: self._register(session, region), directory=directory,
                    min_region_bytes=8 << 20, tag=region_tag(session.id), sealed=sealed,
                    max_total_bytes=self.max_pool_bytes,
                    limit_name="connect(max_pool_bytes=...)",
                    unregister=lambda region_id: self._release_region(session, region_id),
                )
                try:
                    pool.allocate(64).release()  # creates and registers a first region: a probe
                    if not sealed:
                        log.warning("using unsealed shared-memory regions (the worker runs "
                                    "with --allow-unsealed-regions): %s",
                                    reason if sealing_supported()
                                    else "this platform cannot seal regions")
                    return pool, "shared memory"
                except (RemoteError, TransportError, OSError) as error:
                    pool.close()
                    if isinstance(error, SharedMemoryFullError):
                        reason = f"this process cannot create shared memory ({error})"
                        break
                    reason = f"the worker cannot map this process's shared memory ({error})"
        if self.requested_transport == "shm":
            raise TransportError(f"transport='shm' is not possible: {reason}")
        log.warning("falling back to inline bytes: %s", reason)
        return None, "inline"

    def _register(self, session: _Session, region: Any) -> int:
        response = self._rpc(self._stub.RegisterRegion, pb.RegisterRegionRequest(
            session_id=session.id,
            shared_memory=pb.SharedMemoryRegion(name=region.name, size=region.size),
        ), "registering a shared-memory region")
        return int(response.region_id)

    def _register_cuda(self, session: _Session, buffer: Any) -> int:
        response = self._rpc(self._stub.RegisterRegion, pb.RegisterRegionRequest(
            session_id=session.id,
            cuda_ipc=pb.CudaIpcRegion(handle=buffer.handle, size=buffer.size,
                                      device_uuid=buffer.device_uuid),
        ), "registering a CUDA IPC region")
        return int(response.region_id)

    def _release_region(self, session: _Session, region_id: int) -> None:
        """The worker unmaps one of the session's regions: one the shared-memory pool
        dropped to stay under ``max_pool_bytes``, or each CUDA IPC region while the session
        is dropped (best effort there: the caller ignores a failure). Short deadline."""
        self._rpc(self._stub.ReleaseRegion, pb.ReleaseRegionRequest(
            session_id=session.id, region_id=region_id), "releasing a region",
            timeout=min(self.timeout, 2.0))

    def _current(self) -> _Session:
        if self._closed:
            raise RemoteError("this connection is closed")
        with self._lock:
            session = self._session
            if session is None or not session.alive.is_set():
                if session is not None:
                    self._drop_session(session)
                    log.warning("session with %s ended; reconnecting", self.address)
                wait = min(self.timeout, max(self.reconnect_timeout, _RECONNECT_ATTEMPT_S))
                try:
                    grpc.channel_ready_future(self._channel).result(timeout=wait)
                except grpc.FutureTimeoutError:
                    raise WorkerUnavailableError(
                        f"the worker at {self.address} is gone and did not come back within "
                        f"{wait:g} s; restart it, or give connect(reconnect_timeout=SECONDS) "
                        "to wait longer for a restart"
                    ) from None
                session = self._open_session()
            return session

    def _drop_session(self, session: _Session) -> None:
        self._release_quarantined(session)  # the session's calls end with it
        if session.data_plane is not None:
            session.data_plane.close()
        if session.cuda is not None:  # the worker unmaps before this process frees
            session.cuda.close(release_regions=session.alive.is_set())
        session.alive.clear()
        session.stream.cancel()
        if session.pool is not None:
            session.pool.close()
        self._session = None

    @property
    def transport(self) -> str:
        """``"shared memory"`` or ``"inline"``: what this session moves tensors with."""
        return self._current().transport

    @property
    def transport_info(self) -> TransportInfo:
        """How calls travel now: ``calls`` is ``"unix socket"`` (the same-host data plane)
        or ``"grpc"``, with the ``reason``; ``tensors`` is :attr:`transport`."""
        session = self._current()
        if session.data_plane is not None:
            return TransportInfo("unix socket", session.transport, "")
        return TransportInfo("grpc", session.transport, session.data_plane_reason)

    # -- API ------------------------------------------------------------------------------

    def functions(self) -> list[FunctionInfo]:
        """Names, signatures and docs of the functions the worker serves.

        Returns:
            One ``FunctionInfo`` (``name``, ``signature``, ``doc``, ``target``) per function.
        """
        response = self._rpc(self._stub.ListFunctions, pb.ListFunctionsRequest(),
                             "listing functions")
        return [FunctionInfo(f.name, f.signature, f.doc, f.target) for f in response.functions]

    def function(self, name: str) -> RemoteFunction:
        """A callable running ``name`` in the worker (taking and returning torch tensors).

        Args:
            name: A name the worker serves (see ``functions()``); not checked until the
                first call, which raises ``FunctionNotFoundError`` listing the names.

        Returns:
            A ``RemoteFunction``; wrap it in ``WrappedJaxFunction`` to train through it.
        """
        return RemoteFunction(self, name)

    def close(self) -> None:
        """End the session (the worker drops its mappings and residuals) and disconnect."""
        if self._closed:
            return
        self._executor.shutdown()  # queued calls are cancelled, running ones finish
        with self._lock:
            if self._session is not None:
                self._drop_session(self._session)
            self._closed = True
        self._channel.close()

    def call_executor(self) -> CallExecutor:
        """The threads that run this connection's asynchronous calls (``submit``)."""
        return self._executor

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- tensors born in shared memory ----------------------------------------------------

    def empty(self, *shape: int | Sequence[int], dtype: torch.dtype = torch.float32
              ) -> torch.Tensor:
        """An uninitialised CPU tensor allocated in this session's shared-memory pool.

        A call that takes it (contiguous, whole or from its start) copies nothing on the way
        in: the worker reads these very bytes (Note [Tensors born in shared memory]). The
        tensor SHARES memory with the worker while a call (or the residuals of a forward)
        uses it; its pool slice is reserved until the tensor and every view of it are
        garbage-collected. Views at an unaligned offset, non-contiguous views and tensors
        from a session that has since ended are copied as usual.

        Args:
            shape: sizes, as ``empty(2, 3)`` or ``empty((2, 3))``.
            dtype: any dtype the wire carries (default float32).

        Raises:
            TransportError: the session moves tensors inline (``transport="inline"``, or
                the worker cannot map this process's shared memory): there is no pool.
        """
        dims = tuple(shape[0]) if len(shape) == 1 and not isinstance(shape[0], int) else shape
        size = torch.Size(dims)  # type: ignore[arg-type]  # checks they are ints
        if any(d < 0 for d in size):
            raise ValueError(f"shape {tuple(size)} has a negative size")
        if dtype not in TORCH_TO_NAME:
            raise TypeError(f"dtype `{dtype}` cannot be sent; supported: "
                            f"{', '.join(sorted(map(str, TORCH_TO_NAME)))}")
        session = self._current()
        if session.pool is None:
            raise TransportError(
                f"this session moves tensors {session.transport}: it has no shared-memory "
                "pool to allocate in. Connect with transport='auto' or 'shm' on the worker's "
                "host, or use torch.empty")
        itemsize = torch.empty((), dtype=dtype).element_size()
        nbytes = size.numel() * itemsize
        piece = session.pool.allocate(nbytes)
        raw = piece.numpy(np.uint8, (nbytes,))
        piece.release_when_collected(raw)  # the slice lives while any view of it does
        return torch.from_numpy(raw).view(dtype).view(size)

    def empty_like(self, t: torch.Tensor) -> torch.Tensor:
        """``empty(t.shape, dtype=t.dtype)``: see :meth:`empty` (the values are not copied)."""
        return self.empty(tuple(t.shape), dtype=t.dtype)

    def zeros(self, *shape: int | Sequence[int], dtype: torch.dtype = torch.float32
              ) -> torch.Tensor:
        """:meth:`empty`, filled with zeros."""
        return self.empty(*shape, dtype=dtype).zero_()

    # -- calls (used by RemoteFunction / RemoteBackend) -----------------------------------

    def _flush_releases(self, session: _Session) -> None:
        pending = self._pending_release
        ids = []
        while pending:
            try:
                owner, residual_id = pending.popleft()
            except IndexError:  # another thread took the last one
                break
            if owner is session:  # an ended session's residuals went with it
                ids.append(residual_id)
        if ids:
            self._session_rpc(session, "Release",
                              pb.ReleaseRequest(session_id=session.id, residual_ids=ids),
                              "releasing residuals")

    def call(self, name: str, call: Call, tensors: list[torch.Tensor], *,
             keep_residuals: bool) -> tuple[list[torch.Tensor], Any, Any,
                                            ResidualHandle | None]:
        """One forward in the worker: ``(outputs, output structure, aux, residuals)``.
        ``tensors``: one per slot of ``call``, parameters first (the flat protocol)."""
        args_spec, kwargs_spec = wire_specs(call, name)
        session = self._current()
        self._flush_releases(session)
        encoder = Encoder(session.pool, INLINE_THRESHOLD, session.max_inline_bytes,
                          cuda=session.cuda)
        request = pb.CallRequest(session_id=session.id, function=name,
                                 keep_residuals=keep_residuals, has_aux=call.has_aux)
        if keep_residuals:  # the worker differentiates only what needs a gradient
            request.no_grad_leaves.extend(
                i for i, t in enumerate(tensors) if not t.requires_grad
            )
        handle = None
        decoder: Decoder | None = None
        try:
            num_args = args_spec.num_leaves
            encoder.tree(tensors[:num_args], args_spec, request.args)
            encoder.tree(tensors[num_args:], kwargs_spec, request.kwargs)
            key = (name, call.has_aux, args_spec, kwargs_spec,
                   tuple((t.dtype, t.shape) for t in tensors))
            decoder = self._with_arena(session, request, self._arena_sizes.get(key, 0),
                                       encoder)
            response = self._call_rpc(session, decoder, request, f"calling `{name}`")
            if response.required_output_bytes:
                self._check_arena_ask(response.required_output_bytes, name)
                decoder.finish()
                self._arena_sizes[key] = response.required_output_bytes
                decoder = None
                decoder = self._with_arena(session, request, response.required_output_bytes,
                                           encoder)
                response = self._call_rpc(session, decoder, request, f"calling `{name}`")
            out_spec, outputs = decoder.leaves(response.outputs)
            aux = decoder.tree(response.aux) if call.has_aux else None
            decoder.finish()
            decoder = None
            self.stats.add(encoder)
            if response.residual_id:
                # The worker's residuals may view the input slices: keep them until release.
                handle = ResidualHandle(session, response.residual_id, encoder.leases,
                                        out_spec, (args_spec, kwargs_spec), tensors)
                encoder.leases = []
        finally:
            if decoder is not None:  # failed: outputs decoded so far are dropped with it
                decoder.abandon()
            encoder.release()
        return outputs, out_spec, aux, handle

    def _check_arena_ask(self, nbytes: int, name: str) -> None:
        if nbytes > self.max_arena_bytes:
            raise TransportError(
                f"the worker asked for a {nbytes}-byte output arena to call `{name}`, more "
                f"than this client allows ({self.max_arena_bytes} bytes); if the outputs "
                "are really that large, raise connect(max_arena_bytes=...)"
            )

    def _call_rpc(self, session: _Session, decoder: Decoder, request: Any, name: str,
                  method: str = "Call") -> Any:
        """``Call`` with the arena in ``decoder``. Note [Arena slices after a deadline]: a
        call that ran past its deadline (or was cancelled) may still be running in the
        worker, which could write its outputs into the arena later. Its slice goes back to
        the pool only after the worker answered a later call of this session (the worker
        writes nothing for a call whose client has gone: ``Call`` checks its context
        before writing), so that a late write never lands in another call's outputs."""
        try:
            response = self._session_rpc(session, method, request, name)
        except (DeadlineExceededError, WorkerUnavailableError):
            if decoder.arena is not None:
                session.quarantined.append(decoder.arena)
                decoder.arena = None
            raise
        self._release_quarantined(session)
        return response

    @staticmethod
    def _release_quarantined(session: _Session) -> None:
        # Several threads may drain at once (asynchronous calls): each slice is taken once.
        quarantined = session.quarantined
        while True:
            try:
                arena = quarantined.popleft()
            except IndexError:
                return
            arena.release()

    def _with_arena(self, session: _Session, request: Any, nbytes: int,
                    encoder: Encoder | None = None) -> Decoder:
        device = encoder.device if encoder is not None else None
        if encoder is not None and encoder.cuda_pool is not None and nbytes:
            # CUDA IPC inputs: the worker writes outputs into a device slot of this process.
            cuda_arena = encoder.cuda_pool.allocate(nbytes)
            cuda_arena.fill(request.output_arena.cuda_ipc)
            return Decoder(cuda_arena, device)
        if session.pool is None or nbytes == 0:
            request.ClearField("output_arena")
            return Decoder(None, device)
        arena = session.pool.allocate(nbytes)
        arena.fill(request.output_arena.shm)
        return Decoder(arena, device)

    def backward(self, handle: ResidualHandle, cotangents: Any, *,
                 retain: bool) -> list[torch.Tensor | None]:
        """Cotangents (one per output) -> one gradient per input tensor of the forward."""
        session = handle.session
        if not session.alive.is_set() or session is not self._session:
            raise WorkerUnavailableError(
                "the worker session that ran this forward has ended (worker restarted?); "
                "its residuals are gone: run the forward again"
            )
        handle.check_inputs_unchanged()
        encoder = Encoder(session.pool, INLINE_THRESHOLD, session.max_inline_bytes,
                          cuda=session.cuda)
        request = pb.BackwardRequest(session_id=session.id, residual_id=handle.residual_id,
                                     keep_residuals=retain)
        decoder: Decoder | None = None
        try:
            encoder.tree(list(cotangents), handle.out_spec, request.cotangents)
            decoder = self._with_arena(session, request, handle.grad_bytes, encoder)
            response = self._call_rpc(session, decoder, request, "backward", "Backward")
            grads = [*decoder.gradients(response.grad_args, handle.in_specs[0]),
                     *decoder.gradients(response.grad_kwargs, handle.in_specs[1])]
            decoder.finish()
            decoder = None
            self.stats.add(encoder)
        finally:
            if decoder is not None:
                decoder.abandon()
            encoder.release()
        if not retain:
            handle.done = True
            handle.drop_leases()
        return align_grads(handle.layout, grads)

    def release(self, handle: ResidualHandle) -> None:
        """Queue the residuals for release (sent with the next call); safe from finalizers."""
        if handle.done:
            return
        handle.done = True
        self._pending_release.append((handle.session, handle.residual_id))
        handle.drop_leases()


def _check_unix_peer(address: str) -> None:
    """Before anything is sent: a unix socket must be one only this user (or root) could
    have made (Note [Whom a unix socket reaches] in ``transport/_unix_socket.py``)."""
    refuse_abstract(address)
    socket_path = unix_socket_path(address)
    if socket_path is not None:
        check_socket_path(socket_path)


@overload
def connect(
    address: str,
    *,
    timeout: float = ...,
    transport: str = ...,
    token: str | None = ...,
    token_file: str | None = ...,
    tls: TlsConfig | None = ...,
    functions: Mapping[str, Callable[..., Any] | str],
    reconnect_timeout: float = ...,
    max_arena_bytes: int = ...,
    max_async_calls: int = ...,
    max_queued_calls: int = ...,
    data_plane: str = ...,
    spin_us: int = ...,
    max_pool_bytes: int | None = ...,
) -> InprocWorker: ...


@overload
def connect(
    address: str,
    *,
    timeout: float = ...,
    transport: str = ...,
    token: str | None = ...,
    token_file: str | None = ...,
    tls: TlsConfig | None = ...,
    functions: None = ...,
    reconnect_timeout: float = ...,
    max_arena_bytes: int = ...,
    max_async_calls: int = ...,
    max_queued_calls: int = ...,
    data_plane: str = ...,
    spin_us: int = ...,
    max_pool_bytes: int | None = ...,
) -> Worker: ...


def connect(
    address: str,
    *,
    timeout: float = 60.0,
    transport: str = "auto",
    token: str | None = None,
    token_file: str | None = None,
    tls: TlsConfig | None = None,
    functions: Mapping[str, Callable[..., Any] | str] | None = None,
    reconnect_timeout: float = 0.0,
    max_arena_bytes: int = DEFAULT_MAX_ARENA_BYTES,
    max_async_calls: int = DEFAULT_MAX_ASYNC_CALLS,
    max_queued_calls: int = DEFAULT_MAX_QUEUED_CALLS,
    data_plane: str = "auto",
    spin_us: int = DEFAULT_SPIN_US,
    max_pool_bytes: int | None = None,
) -> Worker | InprocWorker:
    """Connect to a JAX worker; use as ``with connect(address) as worker: ...``.

    The session is opened here (a first request within ``timeout``) and closed by
    ``worker.close()`` or the end of the ``with`` block. ``worker.function(name)`` is a
    callable taking and returning torch tensors; tensors it returns **share memory** with the
    client's output arena (released when the last of them is garbage-collected).

    Args:
        address: ``unix:///path/worker.sock`` (the socket and its directory must belong to
            this user or root and be writable by nobody else; ``unix-abstract:`` is
            refused), ``host:port`` (needs the worker's ``token``, or
            ``TORCH_JAX_INTEROP_TOKEN``), or ``"inproc"`` to run ``functions`` in this
            process through the zero-copy core: the same API, so switching modes is one
            string. May be a template with ``{local_rank}`` (or ``{rank}``,
            ``{world_size}``, ``{local_world_size}``), filled from the variables ``torchrun``
            sets in each rank, so one training script reaches one worker per rank:
            ``connect("unix:///run/tji/worker-{local_rank}.sock")`` (see ``rank_address``;
            ``torch-jax-interop worker --ranks N`` starts those workers).
        timeout: Bounds the connection, the session opening and every call (a deadline, in
            seconds).
        transport: ``"auto"`` uses shared memory when the worker can map this process's
            segments (same host and IPC namespace) and inline bytes otherwise, logging why;
            CUDA tensors travel by CUDA IPC (device to device, no host copy) when the worker
            can open this process's handles (same host, shared IPC and PID namespaces, the
            GPU visible to the worker, cupy on both sides), else through the host path,
            logging why once per GPU. ``"cuda_ipc"`` is ``"auto"`` that raises instead of
            falling back for CUDA tensors; ``"shm"`` insists on shared memory; ``"inline"``
            never uses it. Outputs of a call with CUDA inputs come back on the first CUDA
            input's device.
        token: The bearer token of a TCP worker.
        token_file: Read the token from this file (e.g. ``/run/secrets/tji``) instead.
        tls: Reach a TCP worker over TLS, e.g.
            ``connect("host:5005", tls=TlsConfig(ca_file="ca.pem"), token_file=...)``; add
            ``cert_file``/``key_file`` when the worker requires client certificates (mTLS),
            and ``server_name`` when its certificate names another host than ``address``. A
            worker on a non-loopback address serves TCP only over TLS unless started with
            ``--insecure``.
        functions: Only with ``"inproc"``: name -> JAX callable or
            ``"package.module:attr"``.
        reconnect_timeout: After the worker went away, how long (seconds) the next call
            waits for it to come back before failing. The default ``0`` fails fast (a
            restarted worker that is already listening is still found: the client retries
            within a second).
        max_arena_bytes: The most shared memory (bytes) a worker may ask this client to set
            aside for one call's outputs (default 1 GiB).
        max_async_calls: How many asynchronous calls (``fn.submit(...)``,
            ``await fn.call_async(...)``, ``WrappedJaxFunction.submit``) of this connection
            run at once, each in its own thread (default 1: in submission order).
        max_queued_calls: How many more may wait for a thread (default 64); one more raises
            ``CallQueueFullError`` at once. ``close()`` cancels the waiting ones.
        data_plane: How calls travel. ``"auto"`` (default): over the worker's private
            same-host unix socket when it offers one and this process can reach it (same
            host, same user, same PID namespace), else over gRPC, logging why once;
            ``"unix_socket"`` raises ``TransportError`` instead of falling back; ``"grpc"``
            never uses the socket. ``worker.transport_info`` says which path calls take
            (docs/same-host.md).
        spin_us: On the same-host data plane, how long (microseconds) a synchronous call
            polls for its response before sleeping (default 200): a sleeping process is
            woken in tens of microseconds, a polling one at once. ``0`` sleeps at once (use
            it when cores are scarcer than latency matters); asynchronous calls never poll.
        max_pool_bytes: The most shared memory (bytes) this session's pool holds: input
            copies, output arenas and ``worker.empty`` tensors together (default: no limit
            but the memory, Note [Regions are memory]). Past it a call or ``empty`` raises
            ``PoolExhaustedError`` until tensors of the pool are collected.

    Returns:
        A ``Worker`` (an ``InprocWorker`` with the same interface for ``"inproc"``, which
        needs ``functions``).

    Raises:
        ValueError: ``functions`` given for a worker address, or missing for ``"inproc"``;
            an unknown ``transport``.
        UntrustedSocketError: The unix socket or its directory may be written by another
            user.
        WorkerUnavailableError: Nothing answers at ``address``.
        DeadlineExceededError: The session was not opened within ``timeout``.
        AuthenticationError: The worker refused the token.
        ProtocolVersionError: The worker speaks another protocol version.
        TransportError: ``transport="shm"`` and the worker cannot map this process's
            shared memory; later, a worker asking for more than ``max_arena_bytes``.
    """
    address = rank_address(address)  # a plain address comes back unchanged
    if address == "inproc" or address.startswith("inproc:"):
        from ..interop_core._inproc import InprocWorker  # the bridge: imports JAX

        if not functions:
            raise ValueError("connect('inproc') needs functions={name: jax_function, ...}")
        check_async_bounds(max_async_calls, max_queued_calls)
        custom = (max_async_calls, max_queued_calls) != (DEFAULT_MAX_ASYNC_CALLS,
                                                          DEFAULT_MAX_QUEUED_CALLS)
        return InprocWorker(functions, CallExecutor(max_async_calls, max_queued_calls,
                                                    name="tji-async-inproc")
                            if custom else None)
    if functions is not None:
        raise ValueError("functions= is only for connect('inproc'); a worker serves its own")
    return Worker(address, timeout=timeout, transport=transport, token=token,
                  token_file=token_file, tls=tls, reconnect_timeout=reconnect_timeout,
                  max_arena_bytes=max_arena_bytes, max_async_calls=max_async_calls,
                  max_queued_calls=max_queued_calls, data_plane=data_plane, spin_us=spin_us,
                  max_pool_bytes=max_pool_bytes)

__all__ = ["FunctionInfo", "InvalidArgumentError", "RemoteFunction", "TlsConfig", "Worker",
           "connect"]
