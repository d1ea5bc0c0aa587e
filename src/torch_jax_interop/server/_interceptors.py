"""Server interceptors of the worker's gRPC service: the token check and the status mapping.

Both guard only ``JaxWorkerService`` methods; the standard health service stays open (a
probe needs no token). ``grpc.server(interceptors=[TokenAuthInterceptor(...),
StatusInterceptor()])`` runs them in that order, so a peer without the token learns nothing
else: it gets UNAUTHENTICATED even for bytes that are no valid request.

Note [Status codes of the worker]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
The servicer raises the project's exceptions; :class:`StatusInterceptor` turns them into
status codes, and ``client/_errors_map.py`` turns the codes back into the same exceptions:

=============================================  ===================  ======================
raised in the worker                           status               client gets
=============================================  ===================  ======================
``InvalidArgumentError``, ``TransportError``,  INVALID_ARGUMENT     InvalidArgumentError
``ValueError``, ``TypeError``, other
``InteropError`` (a bad request), bytes that
are no valid message
``FunctionNotFoundError``                      NOT_FOUND            FunctionNotFoundError
``ResourceExhaustedError``                     RESOURCE_EXHAUSTED   ResourceExhaustedError
``ProtocolVersionError``                       FAILED_PRECONDITION  ProtocolVersionError
``RemoteExecutionError`` (the served function  UNKNOWN              RemoteExecutionError
raised, whatever its type)
anything else (a bug of the worker, logged)    INTERNAL             RemoteError
=============================================  ===================  ======================

A client of another protocol version gets FAILED_PRECONDITION from OpenSession; every other
method names a session, so none runs for such a client.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from .. import _wire
from .._errors import (
    FunctionNotFoundError,
    InteropError,
    InvalidArgumentError,
    ProtocolVersionError,
    RemoteExecutionError,
    ResourceExhaustedError,
    TransportError,
)
from .._names import TOKEN_ENV

log = logging.getLogger("torch_jax_interop.server")

_SERVICE_PREFIX = f"/{_wire.SERVICE_NAME}/"
_CODES: tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], grpc.StatusCode],
              ...] = (
    (RemoteExecutionError, grpc.StatusCode.UNKNOWN),
    (FunctionNotFoundError, grpc.StatusCode.NOT_FOUND),
    (ResourceExhaustedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ProtocolVersionError, grpc.StatusCode.FAILED_PRECONDITION),
    ((InvalidArgumentError, TransportError, ValueError), grpc.StatusCode.INVALID_ARGUMENT),
)

Behavior = Callable[[Any, grpc.ServicerContext], Any]


def _rewrap(handler: grpc.RpcMethodHandler, wrap: Callable[[Behavior, bool], Behavior],
            request_deserializer: Any = None) -> grpc.RpcMethodHandler:
    """The same handler with its behavior wrapped (``wrap(behavior, streams_responses)``)
    and, if given, another request deserializer. The service has unary requests only."""
    deserialize = request_deserializer or handler.request_deserializer
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            wrap(handler.unary_unary, False), request_deserializer=deserialize,
            response_serializer=handler.response_serializer)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            wrap(handler.unary_stream, True), request_deserializer=deserialize,
            response_serializer=handler.response_serializer)
    raise TypeError("JaxWorkerService has no client-streaming method to intercept")


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """TCP peers must send ``authorization: Bearer <token>``; unix-socket peers are trusted
    through the socket file's mode (0600: the worker's user only).

    The token is compared in constant time. A call whose metadata carries the token goes
    through unwrapped. Any other call gets a handler that checks its peer's address *before
    reading the request*: the metadata arrives first, and gRPC hands a handler only the
    peer, not the metadata's transport, so the refusal reads the request as a stream and
    aborts before asking for its first message (Note [Unauthenticated peers cost little] in
    ``_server.py``).
    """

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()
        self._checked: dict[str, grpc.RpcMethodHandler] = {}

    def _has_token(self, metadata: Any) -> bool:
        sent = next((value for key, value in metadata or () if key == "authorization"), "")
        if isinstance(sent, str):
            sent = sent.encode()
        return hmac.compare_digest(sent, self._expected)

    def intercept_service(self, continuation: Callable[[Any], Any],
                          handler_call_details: grpc.HandlerCallDetails) -> Any:
        method = handler_call_details.method
        if not method.startswith(_SERVICE_PREFIX) or self._has_token(
                handler_call_details.invocation_metadata):
            return continuation(handler_call_details)
        checked = self._checked.get(method)
        if checked is None:
            handler = continuation(handler_call_details)
            if handler is None:
                return None
            checked = self._checked.setdefault(method, _peer_checked_before_reading(handler))
        return checked


def _trusted_without_token(context: grpc.ServicerContext) -> bool:
    """Peers that need no token: those on the unix socket (its mode admits only our user)."""
    return context.peer().startswith("unix")


def _refuse_untrusted(context: grpc.ServicerContext) -> None:
    if not _trusted_without_token(context):
        context.abort(
            grpc.StatusCode.UNAUTHENTICATED,
            "missing or wrong token: pass token=... (or token_file=...) to connect() or set "
            f"{TOKEN_ENV} to the worker's token",
        )


def _only_request(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
    request = next(requests, None)
    if request is None:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                      "the call sent no request message; every method takes one")
    return request


def _peer_checked_before_reading(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """``handler`` (unary request) served as a request-streaming handler that refuses an
    untrusted peer before it reads the request; a trusted peer's one request message is
    then read, decoded with the handler's own deserializer, and passed on unchanged. The
    HTTP/2 framing of a unary and a streaming request is the same, so clients see no
    difference."""
    deserialize, serialize = handler.request_deserializer, handler.response_serializer
    if handler.unary_unary is not None:
        unary = handler.unary_unary

        def unary_checked(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            _refuse_untrusted(context)
            return unary(_only_request(requests, context), context)

        return grpc.stream_unary_rpc_method_handler(
            unary_checked, request_deserializer=deserialize, response_serializer=serialize)
    if handler.unary_stream is not None:
        streaming = handler.unary_stream

        def stream_checked(requests: Iterator[Any],
                           context: grpc.ServicerContext) -> Iterator[Any]:
            _refuse_untrusted(context)
            yield from streaming(_only_request(requests, context), context)

        return grpc.stream_stream_rpc_method_handler(
            stream_checked, request_deserializer=deserialize, response_serializer=serialize)
    raise TypeError("JaxWorkerService has no client-streaming method to intercept")


class UndecodableRequest:
    """Stands in for request bytes that are not a valid protobuf message.

    grpcio answers a request it cannot deserialize with INTERNAL ("Exception deserializing
    request!") and logs a traceback; a malformed request is the peer's fault, so
    :class:`StatusInterceptor` deserializes leniently and answers INVALID_ARGUMENT.
    """

    def __init__(self, method: str, error: Exception) -> None:
        self.method = method
        self.error = error

    def refusal(self) -> str:
        return (
            f"the request to {self.method} is not a valid protobuf message of "
            f"{_wire.SERVICE_NAME} protocol v{_wire.PROTOCOL_VERSION} ({self.error}); use the "
            "client of the same torch-jax-interop version as the worker"
        )


class PerMethodInterceptor(grpc.ServerInterceptor):
    """Wraps each ``JaxWorkerService`` method's handler once (``_wrap``) and serves the
    wrapped handler from then on; other services pass through untouched."""

    def __init__(self) -> None:
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        raise NotImplementedError

    def intercept_service(self, continuation: Callable[[Any], Any],
                          handler_call_details: grpc.HandlerCallDetails) -> Any:
        method = handler_call_details.method
        if not method.startswith(_SERVICE_PREFIX):
            return continuation(handler_call_details)
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            handler = continuation(handler_call_details)
            if handler is None:
                return None
            wrapped = self._wrapped.setdefault(method, self._wrap(method, handler))
        return wrapped


class StatusInterceptor(PerMethodInterceptor):
    """Maps the servicer's exceptions to status codes (Note [Status codes of the worker])
    and refuses undecodable request bytes with INVALID_ARGUMENT; the worker keeps serving.
    Wrapped handlers are built once per method."""

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        decode = handler.request_deserializer

        def lenient(data: bytes) -> Any:
            try:
                return decode(data)
            except Exception as error:  # DecodeError, and anything protobuf adds later
                return UndecodableRequest(method, error)

        return _rewrap(handler, _mapping_errors(method), lenient)


def _mapping_errors(method: str) -> Callable[[Behavior, bool], Behavior]:
    name = method.rsplit("/", 1)[-1]

    def wrap(behavior: Behavior, streams: bool) -> Behavior:
        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            if isinstance(request, UndecodableRequest):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.refusal())
            try:
                return behavior(request, context)
            except Exception as error:
                _abort(context, name, error)

        def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            if isinstance(request, UndecodableRequest):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.refusal())
            try:
                yield from behavior(request, context)
            except Exception as error:
                _abort(context, name, error)

        return stream if streams else unary

    return wrap


def _abort(context: grpc.ServicerContext, method: str, error: Exception) -> None:
    if context.code() is not None:  # the servicer aborted the call itself
        raise error
    for kinds, code in _CODES:
        if isinstance(error, kinds):
            context.abort(code, str(error))
    if isinstance(error, (TypeError, InteropError)):
        # A value of the request the worker cannot use (a structure, a dtype).
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{type(error).__name__}: {error}")
    log.exception("%s failed", method)
    context.abort(grpc.StatusCode.INTERNAL,
                  f"the worker failed on {method} ({type(error).__name__}: {error}); this is a "
                  "bug of torch-jax-interop: please report it with the worker's log")
