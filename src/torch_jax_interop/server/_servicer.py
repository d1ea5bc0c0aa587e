"""The ``JaxWorker`` gRPC service: sessions, regions, calls, backward, release."""

from __future__ import annotations

import hmac
import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import jax

from .. import _wire
from .._errors import (
    InteropError,
    InvalidArgumentError,
    RemoteError,
    ResourceExhaustedError,
    TransportError,
)
from ..proto.v1 import interop_pb2 as pb
from ..proto.v1 import interop_pb2_grpc as pb_grpc
from ..transport import SHM_PREFIX, default_shm_dir
from ._codec import (
    Limits,
    OutputWriter,
    decode_leaves,
    flatten_outputs,
    required_bytes,
    signature_key,
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

_TRANSPORT_NAMES = {pb.INLINE: "inline bytes", pb.SHARED_MEMORY: "shared memory",
                    pb.CUDA_IPC: "CUDA IPC", pb.TRANSPORT_UNSPECIFIED: "unspecified"}


class WorkerConfig:
    """Limits and paths of one worker (the CLI flags)."""

    def __init__(
        self,
        *,
        max_sessions: int = 64,
        max_residuals: int = 1024,
        max_regions: int = 256,
        max_tensor_bytes: int = 4 << 30,
        max_inline_bytes: int = 64 << 20,
        inline_threshold: int = 64 << 10,
        shm_dir: str | None = None,
    ) -> None:
        self.max_sessions = max_sessions
        self.max_residuals = max_residuals
        self.max_regions = max_regions
        self.limits = Limits(max_tensor_bytes, max_inline_bytes)
        self.inline_threshold = inline_threshold
        self.shm_dir = shm_dir or default_shm_dir()


_SERVICE_PREFIX = "/torch_jax_interop.v1.JaxWorker/"


class UndecodableRequest:
    """Stands in for a request whose bytes are not a valid protobuf message.

    grpcio answers a request it cannot deserialize with INTERNAL ("Exception deserializing
    request!") and logs a traceback; a malformed request is the peer's fault, so
    :class:`LenientHandlers` hands the servicer this object instead, and the servicer
    answers INVALID_ARGUMENT (after the token check).
    """

    def __init__(self, method: str, error: Exception) -> None:
        self.method = method
        self.error = error

    def abort(self, context: grpc.ServicerContext) -> None:
        context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"the request to {self.method} is not a valid protobuf message of "
            f"torch_jax_interop.v1 protocol v{_wire.PROTOCOL_VERSION} ({self.error}); "
            "use the client of the same torch-jax-interop version as the worker",
        )


class LenientHandlers(grpc.GenericRpcHandler):
    """The generated JaxWorker handlers, with deserializers that never raise: undecodable
    request bytes become ``UndecodableRequest``. Built once per method (a server
    interceptor would do the same work on every call)."""

    def __init__(self, servicer: Any) -> None:
        captured: list[Any] = []

        class _Capture:
            def add_generic_rpc_handlers(self, handlers: Any) -> None:
                captured.extend(handlers)

            def add_registered_method_handlers(self, *args: Any) -> None:
                pass

        pb_grpc.add_JaxWorkerServicer_to_server(servicer, _Capture())
        self._generated = captured
        self._cache: dict[str, Any] = {}

    def service(self, details: Any) -> Any:
        method = details.method
        handler = self._cache.get(method)
        if handler is None:
            for generated in self._generated:
                handler = generated.service(details)
                if handler is not None:
                    break
            if handler is None:
                return None
            decode = handler.request_deserializer

            def lenient(data: bytes, decode: Any = decode) -> Any:
                try:
                    return decode(data)
                except Exception as error:  # DecodeError, and anything protobuf adds later
                    return UndecodableRequest(method, error)

            handler = handler._replace(request_deserializer=lenient)
            self._cache[method] = handler
        return handler


def _handler(method: Callable[..., Any]) -> Callable[..., Any]:
    """Map the project's exceptions to gRPC status codes; the worker keeps serving."""

    def wrapper(self: JaxWorkerServicer, request: Any, context: grpc.ServicerContext) -> Any:
        self.authorize(context)
        if isinstance(request, UndecodableRequest):
            request.abort(context)
        try:
            return method(self, request, context)
        except InvalidArgumentError as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        except ResourceExhaustedError as error:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))
        except _NotFound as error:
            context.abort(grpc.StatusCode.NOT_FOUND, str(error))
        except (TransportError, ValueError) as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        except (TypeError, InteropError) as error:
            # Raised while tracing the user's function: wrong arity, dtype or shape.
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{type(error).__name__}: {error}")
        except Exception as error:  # the function itself failed at run time
            log.exception("%s failed", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"{type(error).__name__}: {error}")

    wrapper.__name__ = method.__name__
    return wrapper


class _NotFound(RemoteError):
    pass


class JaxWorkerServicer(pb_grpc.JaxWorkerServicer):
    def __init__(
        self, functions: dict[str, CompiledFunction], config: WorkerConfig,
        token: str | None = None,
    ) -> None:
        self.functions = functions
        self._token = f"Bearer {token}".encode() if token else None
        self.config = config
        self.sessions: dict[str, Session] = {}
        self._lock = threading.Lock()
        self.shutting_down = threading.Event()
        self.hostname = socket.gethostname()
        self.boot_id = _wire.boot_id()

    def authorize(self, context: grpc.ServicerContext) -> None:
        """TCP peers must send ``authorization: Bearer <token>``. Unix-socket peers are
        trusted through the socket file's mode (0600: same user only)."""
        if self._token is None or context.peer().startswith("unix"):
            return
        sent = dict(context.invocation_metadata()).get("authorization", "")
        if not hmac.compare_digest(sent.encode(), self._token):
            context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or wrong token: pass token=... to connect() or set "
                "TORCH_JAX_INTEROP_TOKEN to the worker's token",
            )

    # -- sessions -------------------------------------------------------------------------

    def OpenSession(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        self.authorize(context)
        if isinstance(request, UndecodableRequest):
            request.abort(context)
        client = f"pid {request.client_pid} on {request.client_hostname or '?'}"
        with self._lock:
            if len(self.sessions) >= self.config.max_sessions:
                context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the worker is at its session cap ({self.config.max_sessions}, "
                    "--max-sessions); close other clients or start another worker",
                )
            session = Session(
                uuid.uuid4().hex, client, max_residuals=self.config.max_residuals,
                max_regions=self.config.max_regions,
            )
            self.sessions[session.id] = session
        ended = threading.Event()
        context.add_callback(ended.set)
        log.info("session %s opened by %s, transport: %s", session.id[:8], client,
                 _TRANSPORT_NAMES.get(request.transport, "unspecified"))
        try:
            yield pb.SessionEvent(
                session_id=session.id, worker_pid=os.getpid(), worker_hostname=self.hostname,
                boot_id=self.boot_id, shm_directory=self.config.shm_dir,
                max_inline_bytes=self.config.limits.max_inline_bytes,
                max_tensor_bytes=self.config.limits.max_tensor_bytes,
                protocol_version=_wire.PROTOCOL_VERSION, shm_prefix=SHM_PREFIX,
            )
            while not ended.wait(0.5):
                if self.shutting_down.is_set():
                    break
        finally:
            self.end_session(session.id)

    def end_session(self, session_id: str) -> None:
        with self._lock:
            session = self.sessions.pop(session_id, None)
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

    @_handler
    def RegisterRegion(self, request: Any, context: grpc.ServicerContext) -> Any:
        session = self._session(request.session_id)
        max_tensor_bytes = self.config.limits.max_tensor_bytes
        region: WorkerRegion
        if request.kind == pb.CUDA_IPC:
            # Note [CUDA IPC ownership] in transport/cuda/__init__.py.
            region = CudaIpcWorkerRegion.open(request.cuda_ipc_handle, request.size,
                                              request.device_uuid,
                                              max_tensor_bytes=max_tensor_bytes)
        elif request.kind in (pb.SHARED_MEMORY, pb.TRANSPORT_UNSPECIFIED):
            region = SharedMemoryWorkerRegion.attach(request.name, request.size,
                                                     directory=self.config.shm_dir,
                                                     max_tensor_bytes=max_tensor_bytes)
        else:
            raise InvalidArgumentError("this worker registers shared-memory regions only")
        region_id, generation = session.add_region(region)
        if isinstance(region, CudaIpcWorkerRegion):
            log.info("session %s registered CUDA IPC region %d (%d bytes on %s, device %d)",
                     session.id[:8], region_id, region.size, region.mapping.uuid,
                     region.mapping.device_index)
        elif not session.transport_logged:
            session.transport_logged = True
            log.info("session %s uses shared memory in %s", session.id[:8], self.config.shm_dir)
        return pb.RegisterRegionResponse(region_id=region_id, generation=generation)

    @_handler
    def ReleaseRegion(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._session(request.session_id).release_region(request.region_id)
        return pb.ReleaseRegionResponse()

    # -- functions ------------------------------------------------------------------------

    @_handler
    def ListFunctions(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb.ListFunctionsResponse(functions=[
            pb.FunctionInfo(name=name, signature=f.signature, doc=f.doc, target=f.target)
            for name, f in sorted(self.functions.items())
        ])

    def _function(self, name: str) -> CompiledFunction:
        function = self.functions.get(name)
        if function is None:
            available = ", ".join(sorted(self.functions)) or "none"
            raise _NotFound(
                f"unknown function `{name}`; this worker serves: {available}. Start the "
                f"worker with --function {name}=package.module:attr to serve it"
            )
        return function

    @_handler
    def Call(self, request: Any, context: grpc.ServicerContext) -> Any:
        session = self._session(request.session_id)
        function = self._function(request.function)
        limits = self.config.limits
        args_spec, arrays = decode_leaves(request.args, session, limits)
        kwargs_spec = None
        if request.kwargs.nodes:
            kwargs_spec, kwargs_arrays = decode_leaves(request.kwargs, session, limits)
            arrays.extend(kwargs_arrays)
        response = pb.CallResponse()
        writer = OutputWriter(request.output_arena if request.HasField("output_arena") else None,
                              session, self.config.inline_threshold, limits)
        no_grad = _no_grad_leaves(request)
        diff = (tuple(i for i in range(len(arrays)) if i not in no_grad)
                if request.keep_residuals else ())
        program = function.program(signature_key(request.args, request.kwargs, None),
                                   args_spec, kwargs_spec, request.has_aux, diff)
        shapes = function.describe(program, arrays)
        if session.num_regions:
            need = required_bytes(shapes, self.config.inline_threshold)
            if need > writer.capacity:
                response.required_output_bytes = need
                return response
        if request.keep_residuals:
            out, aux, vjp_fn = function.call_with_vjp(program, arrays)
        else:
            out, aux = function.call(program, arrays)
        out_leaves, out_spec = flatten_outputs(out)
        jax.block_until_ready(out_leaves)
        writer.write_tree(out_leaves, out_spec, response.outputs)
        if request.has_aux:
            aux_leaves, aux_spec = flatten_outputs(aux)
            writer.write_tree(aux_leaves, aux_spec, response.aux)
        if request.keep_residuals:
            response.residual_id = session.residuals.put(Residual(function, vjp_fn))
        return response

    @_handler
    def Backward(self, request: Any, context: grpc.ServicerContext) -> Any:
        session = self._session(request.session_id)
        # Decode first: a malformed request is refused without consuming the residuals.
        _, cotangents = decode_leaves(request.cotangents, session, self.config.limits)
        residual = session.residuals.get(request.residual_id, pop=not request.keep_residuals)
        grad_args, grad_kwargs = residual.function.backward(
            residual.vjp_fn, cotangents, retain=request.keep_residuals
        )
        response = pb.BackwardResponse()
        writer = OutputWriter(request.output_arena if request.HasField("output_arena") else None,
                              session, self.config.inline_threshold, self.config.limits)
        for grads, out in ((grad_args, response.grad_args), (grad_kwargs, response.grad_kwargs)):
            leaves, spec = flatten_outputs(grads)  # inputs without gradient: None
            jax.block_until_ready(leaves)
            writer.write_tree(leaves, spec, out)
        return response

    @_handler
    def Release(self, request: Any, context: grpc.ServicerContext) -> Any:
        session = self._session(request.session_id)
        return pb.ReleaseResponse(released=session.residuals.release(list(request.residual_ids)))


def _no_grad_leaves(request: Any) -> frozenset[int]:
    no_grad = frozenset(request.no_grad_leaves)
    total = len(request.args.leaves) + len(request.kwargs.leaves)
    if no_grad and max(no_grad) >= total:
        raise InvalidArgumentError(
            f"no_grad_leaves names leaf {max(no_grad)}, but the call has {total} tensor "
            "leaves (numbered over args, then kwargs)"
        )
    return no_grad

