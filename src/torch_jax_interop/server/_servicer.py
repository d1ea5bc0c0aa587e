"""The ``JaxWorkerService`` gRPC service: sessions, regions, calls, backward, release.

Methods raise the project's exceptions; the server's interceptors (``_interceptors.py``)
check the token first and map exceptions to status codes (Note [Status codes of the
worker]).
"""

from __future__ import annotations

import inspect
import logging
import os
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import jax

from .. import _pytree, _wire
from .._errors import (
    FunctionNotFoundError,
    InteropError,
    InvalidArgumentError,
    ProtocolVersionError,
    RemoteExecutionError,
    ResourceExhaustedError,
)
from .._names import (
    DEFAULT_MAX_COMPILED_SIGNATURES,
    DEFAULT_MAX_LEAVES,
    DEFAULT_MAX_RESIDUAL_BYTES,
    DEFAULT_SPIN_US,
    check_spin_us,
)
from .._version import __version__
from ..proto.v1 import interop_pb2 as pb, interop_pb2_grpc as pb_grpc
from ..transport import DEFAULT_MAX_FRAME_BYTES, default_shm_dir
from ._codec import (
    InlineBudget,
    Limits,
    OutputWriter,
    decode_leaves,
    flatten_outputs,
    required_bytes,
)
from ._compiled import CompiledFunction
from ._session import (
    CudaIpcWorkerRegion,
    Residual,
    Session,
    SharedMemoryWorkerRegion,
    WorkerRegion,
)

log = logging.getLogger("torch_jax_interop.server")

_MAX_REMEMBERED_SIGNATURES = 4096  # per-signature answers kept; cleared when full
_MAX_NAME_SHOWN = 200  # characters of an unknown function's name quoted back

_TRANSPORT_NAMES = {pb.TRANSPORT_INLINE: "inline bytes",
                    pb.TRANSPORT_SHARED_MEMORY: "shared memory",
                    pb.TRANSPORT_CUDA_IPC: "CUDA IPC", pb.TRANSPORT_UNSPECIFIED: "unspecified"}


class WorkerConfig:
    """Limits and paths of one worker (the CLI flags; the Reliability page's "Memory and request
    bounds" lists them with their defaults and the memory each bounds).

    Args:
        max_sessions: Concurrent client sessions.
        max_residuals: vjp residuals kept per session (oldest dropped first).
        max_residual_bytes: Bytes of residuals kept per session (oldest dropped first; a
            forward whose residuals alone exceed it is refused).
        max_regions: Shared-memory regions each session may register.
        max_tensor_bytes: Bytes of one tensor (and, twice it, of one region).
        max_inline_bytes: Inline tensor bytes per request (summed) and per output.
        max_leaves: Tensors per request, checked before anything is decoded or compiled.
        max_compiled_signatures: Compiled programs per served function (least recently used
            dropped).
        inline_threshold: Outputs up to this many bytes travel inline.
        shm_dir: Where unsealed regions live (default ``/dev/shm`` or
            ``TORCH_JAX_INTEROP_SHM_DIR``).
        allow_unsealed_regions: Also map mode-0600 files of the same user (clients in
            another PID namespace); a local peer could then SIGBUS the worker.
    """

    def __init__(
        self,
        *,
        max_sessions: int = 64,
        max_residuals: int = 1024,
        max_residual_bytes: int = DEFAULT_MAX_RESIDUAL_BYTES,
        max_regions: int = 256,
        max_tensor_bytes: int = 4 << 30,
        max_inline_bytes: int = 64 << 20,
        max_leaves: int = DEFAULT_MAX_LEAVES,
        max_compiled_signatures: int = DEFAULT_MAX_COMPILED_SIGNATURES,
        inline_threshold: int = 64 << 10,
        shm_dir: str | None = None,
        allow_unsealed_regions: bool = False,
        metrics_listen: str | None = None,
        fast_path: bool = True,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        spin_us: int = DEFAULT_SPIN_US,
    ) -> None:
        _check_positive(max_sessions=max_sessions, max_residuals=max_residuals,
                        max_residual_bytes=max_residual_bytes, max_regions=max_regions,
                        max_tensor_bytes=max_tensor_bytes, max_inline_bytes=max_inline_bytes,
                        max_leaves=max_leaves, max_compiled_signatures=max_compiled_signatures)
        self.max_sessions = max_sessions
        self.max_residuals = max_residuals
        self.max_residual_bytes = max_residual_bytes  # per session
        self.max_regions = max_regions
        self.max_compiled_signatures = max_compiled_signatures  # per served function
        self.limits = Limits(max_tensor_bytes, max_inline_bytes, max_leaves)
        self.inline_threshold = inline_threshold
        self.shm_dir = shm_dir or default_shm_dir()
        # Note [Sealed regions] (transport/_shm.py): off, a peer cannot SIGBUS the worker.
        self.allow_unsealed_regions = allow_unsealed_regions
        # HOST:PORT of the Prometheus endpoint, or None: off (Note [What the metrics cost
        # and expose] in _metrics.py).
        self.metrics_listen = metrics_listen
        # Note [Same-host data plane] (transport/_data_plane.py): offered unless --no-fast-path.
        self.fast_path = fast_path
        _check_positive(max_frame_bytes=max_frame_bytes)
        self.max_frame_bytes = max_frame_bytes
        # Note [Spin, then sleep]: a connection polls this long for its next request.
        self.spin_us = check_spin_us(spin_us)


def _check_positive(**limits: int) -> None:
    """A limit below 1 would refuse every session or call: refuse the configuration."""
    for name, value in limits.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"WorkerConfig({name}={value!r}): must be a whole number of at "
                             f"least 1 (the CLI's --{name.replace('_', '-')})")


class JaxWorkerServicer(pb_grpc.JaxWorkerServiceServicer):
    """The worker's sessions and functions. Serve it with the interceptors of
    ``_interceptors.py`` (``create_server`` does): its methods raise, they do not abort."""

    def __init__(self, functions: dict[str, CompiledFunction], config: WorkerConfig) -> None:
        self.functions = functions
        self.config = config
        self.sessions: dict[str, Session] = {}
        self._lock = threading.Lock()
        self.shutting_down = threading.Event()
        self.metrics_server: Any = None  # a _metrics.MetricsServer when metrics are on
        self.boot_id = _wire.boot_id()
        self._signatures: dict[str, inspect.Signature | None] = {}
        self._accepted: set[tuple[str, int, tuple[str, ...]]] = set()  # argument shapes bound
        self._needs: dict[Any, int] = {}  # (function, signature, has_aux) -> arena bytes
        # A DataPlaneListener (server/_data_plane.py) when create_server started one.
        self.data_plane: Any = None

    # -- sessions -------------------------------------------------------------------------

    def OpenSession(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        _check_protocol_version(request.protocol_version)
        client = f"pid {request.client_pid} on {request.client_hostname or '?'}"
        with self._lock:
            if len(self.sessions) >= self.config.max_sessions:
                raise ResourceExhaustedError(
                    f"the worker is at its session cap ({self.config.max_sessions}, "
                    "--max-sessions); close other clients or start another worker"
                )
            session = Session(
                uuid.uuid4().hex, client, max_residuals=self.config.max_residuals,
                max_regions=self.config.max_regions,
                max_residual_bytes=self.config.max_residual_bytes,
            )
            self.sessions[session.id] = session
        ended = threading.Event()
        context.add_callback(ended.set)
        log.info("session %s opened by %s, transport: %s", session.id[:8], client,
                 _TRANSPORT_NAMES.get(request.transport, "unspecified"))
        try:
            yield pb.OpenSessionResponse(
                session_id=session.id, worker_pid=os.getpid(), boot_id=self.boot_id,
                shm_directory=self.config.shm_dir,
                max_inline_bytes=self.config.limits.max_inline_bytes,
                protocol_version=_wire.PROTOCOL_VERSION,
                data_plane=(self.data_plane.offer(session.id, request.client_pid)
                            if self.data_plane is not None else None),
            )
            while not ended.wait(0.5):
                if self.shutting_down.is_set():
                    break
        finally:
            self.end_session(session.id)

    def end_session(self, session_id: str) -> None:
        with self._lock:
            session = self.sessions.pop(session_id, None)
        if self.data_plane is not None:
            self.data_plane.forget(session_id)
        if session is not None:
            session.close()
            log.info("session %s ended: residuals and mappings dropped", session_id[:8])

    def _session(self, session_id: str) -> Session:
        session = self.sessions.get(session_id)
        if session is None:
            raise InvalidArgumentError(
                "unknown or ended session; open a session first (the client does this on "
                "connect and again after a reconnect)"
            )
        return session

    # -- regions --------------------------------------------------------------------------

    def RegisterRegion(self, request: Any, context: grpc.ServicerContext) -> Any:
        session = self._session(request.session_id)
        kind = request.WhichOneof("region")
        max_tensor_bytes = self.config.limits.max_tensor_bytes
        region: WorkerRegion
        if kind == "cuda_ipc":
            # Note [CUDA IPC ownership] in transport/cuda/__init__.py.
            cuda = request.cuda_ipc
            region = CudaIpcWorkerRegion.open(cuda.handle, cuda.size, cuda.device_uuid,
                                              max_tensor_bytes=max_tensor_bytes)
        elif kind == "shared_memory":
            shm = request.shared_memory
            region = SharedMemoryWorkerRegion.attach(shm.name, shm.size,
                                                     directory=self.config.shm_dir,
                                                     max_tensor_bytes=max_tensor_bytes,
                                                     session_tag=session.region_tag,
                                                     allow_unsealed=self.config.allow_unsealed_regions)
        else:
            raise InvalidArgumentError(
                "RegisterRegionRequest names no region: set `shared_memory` (name, size) or "
                "`cuda_ipc` (handle, size, device_uuid)"
            )
        region_id = session.add_region(region)
        if isinstance(region, CudaIpcWorkerRegion):
            log.info("session %s registered CUDA IPC region %d (%d bytes on %s, device %d)",
                     session.id[:8], region_id, region.size, region.mapping.uuid,
                     region.mapping.device_index)
        elif not session.transport_logged:
            session.transport_logged = True
            log.info("session %s uses shared memory in %s", session.id[:8], self.config.shm_dir)
        return pb.RegisterRegionResponse(region_id=region_id)

    def ReleaseRegion(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._session(request.session_id).release_region(request.region_id)
        return pb.ReleaseRegionResponse()

    # -- functions ------------------------------------------------------------------------

    def ListFunctions(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb.ListFunctionsResponse(functions=[
            pb.FunctionInfo(name=name, signature=f.signature, doc=f.doc, target=f.target)
            for name, f in sorted(self.functions.items())
        ])

    def _function(self, name: str) -> CompiledFunction:
        function = self.functions.get(name)
        if function is None:
            available = ", ".join(sorted(self.functions)) or "none"
            shown = name if len(name) <= _MAX_NAME_SHOWN else (
                f"{name[:_MAX_NAME_SHOWN]}... ({len(name)} characters)")
            raise FunctionNotFoundError(
                f"unknown function `{shown}`; this worker serves: {available}. Start the "
                f"worker with --function NAME=package.module:attr to serve it"
            )
        return function

    def Call(self, request: Any, context: grpc.ServicerContext) -> Any:
        session = self._session(request.session_id)
        function = self._function(request.function)
        limits = self.config.limits
        # Bounds first: nothing is decoded or compiled for a request over them.
        limits.check_leaves(len(request.args.leaves) + len(request.kwargs.leaves), "the call")
        budget = InlineBudget(limits.max_inline_bytes)
        leaves: list[Any] = []  # (dtype, shape) of each leaf, in order
        args_spec, arrays = decode_leaves(request.args, session, limits, budget, leaves)
        kwargs_spec = None
        if request.kwargs.nodes:
            kwargs_spec, kwargs_arrays = decode_leaves(request.kwargs, session, limits, budget,
                                                       leaves)
            arrays.extend(kwargs_arrays)
        response = pb.CallResponse()
        writer = OutputWriter(request.output_arena if request.HasField("output_arena") else None,
                              session, self.config.inline_threshold, limits)
        no_grad = _no_grad_leaves(request)
        diff = ((tuple(i for i in range(len(arrays)) if i not in no_grad) if no_grad
                 else tuple(range(len(arrays)))) if request.keep_residuals else ())
        # The input signature: the validated structures (decode_spec answers a structure
        # seen before with the same spec; a spec's hash is computed once) and the leaves'.
        key = (args_spec, kwargs_spec, tuple(leaves))
        program = function.program(key, args_spec, kwargs_spec, request.has_aux, diff)
        self._check_arguments(function, args_spec, kwargs_spec)
        with _served(request.function):
            shapes = function.describe(program, arrays)
        if session.num_regions:
            # the outputs' arena bytes follow from the signature: computed once per signature
            need_key = (request.function, key, request.has_aux)
            need = self._needs.get(need_key)
            if need is None:
                need = required_bytes(shapes, self.config.inline_threshold)
                if len(self._needs) >= _MAX_REMEMBERED_SIGNATURES:
                    self._needs.clear()
                self._needs[need_key] = need
            if need > writer.capacity:
                response.required_output_bytes = need
                return response
        with _served(request.function):
            if request.keep_residuals:
                out, aux, vjp_fn = function.call_with_vjp(program, arrays)
            else:
                out, aux = function.call(program, arrays)
        out_leaves, out_spec = flatten_outputs(out)
        with _served(request.function):  # errors of an asynchronous run surface here
            _wait_for(out_leaves)
        if not context.is_active():
            # The client gave up (deadline, cancel): keep no residual for it and write
            # nothing into its arena (Note [Arena slices after a deadline] in the client).
            context.abort(grpc.StatusCode.CANCELLED, "the client gave up on this call")
        writer.write_tree(out_leaves, out_spec, response.outputs)
        if request.has_aux:
            aux_leaves, aux_spec = flatten_outputs(aux)
            writer.write_tree(aux_leaves, aux_spec, response.aux)
        if request.keep_residuals:
            response.residual_id = session.residuals.put(
                Residual(function, vjp_fn, vjp_fn.residuals.nbytes))
        return response

    def Backward(self, request: Any, context: grpc.ServicerContext) -> Any:
        session = self._session(request.session_id)
        # Decode and check first: a refused request leaves the residuals in place (a retry
        # with the right cotangents succeeds).
        _, cotangents = decode_leaves(request.cotangents, session, self.config.limits)
        residual = session.residuals.get(
            request.residual_id, pop=not request.keep_residuals,
            check=lambda r: r.function.check_cotangents(r.vjp_fn, cotangents),
        )
        grad_args, grad_kwargs = residual.function.backward(
            residual.vjp_fn, cotangents, retain=request.keep_residuals
        )
        response = pb.BackwardResponse()
        writer = OutputWriter(request.output_arena if request.HasField("output_arena") else None,
                              session, self.config.inline_threshold, self.config.limits)
        for grads, out in ((grad_args, response.grad_args), (grad_kwargs, response.grad_kwargs)):
            leaves, spec = flatten_outputs(grads)  # inputs without gradient: None
            _wait_for(leaves)
            if not context.is_active():  # the client gave up: write nothing into its arena
                context.abort(grpc.StatusCode.CANCELLED, "the client gave up on this call")
            writer.write_tree(leaves, spec, out)
        return response

    def Release(self, request: Any, context: grpc.ServicerContext) -> Any:
        session = self._session(request.session_id)
        return pb.ReleaseResponse(released=session.residuals.release(list(request.residual_ids)))

    def _check_arguments(self, function: CompiledFunction, args_spec: _pytree.TreeSpec,
                         kwargs_spec: _pytree.TreeSpec | None) -> None:
        """Arguments the function's signature cannot take are an error of the request
        (INVALID_ARGUMENT), found before the function runs: only their number and keyword
        names matter, so the wire structures suffice."""
        if function.name not in self._signatures:
            try:
                self._signatures[function.name] = inspect.signature(function.fn)
            except (TypeError, ValueError):  # no signature to check against (a builtin)
                self._signatures[function.name] = None
        signature = self._signatures[function.name]
        if signature is None:
            return
        positional = len(args_spec.children)  # a tuple: ``function.program`` checked it
        keywords = list(kwargs_spec.meta[0]) if kwargs_spec is not None else []
        accepted = (function.name, positional, tuple(keywords))
        if accepted in self._accepted:  # bound once already: the same answer (hot path)
            return
        try:
            signature.bind(*[None] * positional, **dict.fromkeys(keywords))
            if len(self._accepted) < 4096:
                self._accepted.add(accepted)
        except TypeError as error:
            raise InvalidArgumentError(
                f"`{function.name}{signature}` cannot take {positional} positional arguments "
                f"and keyword arguments {sorted(keywords)}: {error}"
            ) from None


def _check_protocol_version(version: int) -> None:
    if version != _wire.PROTOCOL_VERSION:
        older = "client" if version < _wire.PROTOCOL_VERSION else "worker"
        raise ProtocolVersionError(
            f"the client speaks protocol v{version} but this worker (torch-jax-interop "
            f"{__version__}) speaks v{_wire.PROTOCOL_VERSION}; upgrade the {older} so that "
            "both sides run the same torch-jax-interop version"
        )


class _served:  # noqa: N801 - used as a function: ``with _served(name):``
    """Runs the served function: whatever it raises reaches the client as
    ``RemoteExecutionError`` (UNKNOWN) with its type and message; the project's own errors
    (a bad request found while tracing) keep their codes. A class, not a generator
    context manager: it wraps three steps of every call, and costs a tenth as much."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: Any) -> None:
        if error is None or not isinstance(error, Exception) or isinstance(error,
                                                                          InteropError):
            return  # raised on as it is
        log.info("`%s` raised %s: %s", self.name, type(error).__name__, error)
        raise RemoteExecutionError(
            f"`{self.name}` raised {type(error).__name__}: {error}") from None


def _wait_for(leaves: list[Any]) -> None:
    """``jax.block_until_ready`` of the JAX arrays among ``leaves``, without its tree walk:
    numpy inputs passed through need no wait (~2 us a call saved on small calls)."""
    for leaf in leaves:
        if isinstance(leaf, jax.Array):
            leaf.block_until_ready()


def _no_grad_leaves(request: Any) -> frozenset[int]:
    if not request.no_grad_leaves:
        return frozenset()
    no_grad = frozenset(request.no_grad_leaves)
    total = len(request.args.leaves) + len(request.kwargs.leaves)
    if no_grad and max(no_grad) >= total:
        raise InvalidArgumentError(
            f"no_grad_leaves names leaf {max(no_grad)}, but the call has {total} tensor "
            "leaves (numbered over args, then kwargs)"
        )
    return no_grad

