"""Prometheus metrics of one worker (``--metrics-listen HOST:PORT``, ``WorkerConfig(
metrics_listen=...)``): off unless asked for; docs/metrics.md lists every metric.

Note [What the metrics cost and expose]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
* Each worker has its own ``CollectorRegistry`` (never prometheus_client's global one), so
  several workers in one process (tests) keep separate counts.
* Per RPC, :class:`MetricsInterceptor` (installed only when metrics are on) reads the
  status code the status interceptor set, the elapsed time and the sizes the request and
  response messages already state (``Tensor.location``: inline bytes, or a shared-memory /
  CUDA IPC slice's ``nbytes``): no tensor is touched. Label lookups are cached; what is
  left is a few microseconds per RPC and about one per tensor leaf (a fraction of what
  decoding that leaf costs). Sessions, residuals and compile caches
  are read when Prometheus scrapes (:class:`_WorkerStateCollector`), so the serving path
  updates nothing for them.
* Label values are bounded: ``function`` is a served function's name or ``(unknown)`` (a
  peer cannot grow the registry by calling made-up names), ``code`` a gRPC status name,
  ``transport`` a ``Tensor.location`` field name.
* Calls refused by the token check are not counted: they never reach this interceptor. A
  Call answered with ``required_output_bytes`` (the client's output arena was too small;
  it sends the call again) counts in ``rpcs_total`` only, so a call counts once.
* The HTTP server (prometheus_client's, a daemon thread) binds exactly the address it is
  given and serves only the exposition: no token, no TLS. It reveals served function names,
  call counts and sizes, so bind a loopback or private address (docs/metrics.md).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import grpc

from .._cli_args import parse_metrics_listen
from ._interceptors import Behavior, PerMethodInterceptor, _rewrap

if TYPE_CHECKING:
    from ._servicer import JaxWorkerServicer

log = logging.getLogger("torch_jax_interop.server")

PREFIX = "torch_jax_interop"
UNKNOWN_FUNCTION = "(unknown)"
"""The ``function`` label of a call naming no served function."""
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                   0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Seconds: a small call over shared memory takes well under a millisecond."""

_REQUEST_TREES = {"Call": ("args", "kwargs"), "Backward": ("cotangents",)}
_RESPONSE_TREES = {"Call": ("outputs", "aux"), "Backward": ("grad_args", "grad_kwargs")}
_INLINE = "inline_data"  # Tensor.location's inline field; its label is "inline"


class WorkerMetrics:
    """The metrics of one worker and the registry that holds them (docs/metrics.md)."""

    def __init__(self, servicer: JaxWorkerServicer) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector

        self.servicer = servicer
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}  # bounded: see the Note
        self.registry = CollectorRegistry()
        registry = self.registry
        self.rpcs = Counter(f"{PREFIX}_rpcs", "RPCs of JaxWorkerService handled, by method "
                            "and gRPC status code", ["method", "code"], registry=registry)
        self.errors = Counter(f"{PREFIX}_errors", "RPCs that ended with a status other than "
                              "OK, by method, served function (Call and Backward) and code",
                              ["method", "function", "code"], registry=registry)
        self.calls = Counter(f"{PREFIX}_calls", "Call RPCs (forward passes), by served "
                             "function and gRPC status code", ["function", "code"],
                             registry=registry)
        self.backwards = Counter(f"{PREFIX}_backward_calls", "Backward RPCs, by served "
                                 "function and gRPC status code", ["function", "code"],
                                 registry=registry)
        self.call_seconds = Histogram(f"{PREFIX}_call_duration_seconds", "Time the worker "
                                      "spent on a Call RPC (decode, run, write outputs)",
                                      ["function"], buckets=LATENCY_BUCKETS, registry=registry)
        self.backward_seconds = Histogram(f"{PREFIX}_backward_duration_seconds", "Time the "
                                          "worker spent on a Backward RPC", ["function"],
                                          buckets=LATENCY_BUCKETS, registry=registry)
        self.tensor_bytes = Counter(f"{PREFIX}_tensor_bytes", "Tensor bytes of Call and "
                                    "Backward requests (in) and responses (out), by how they "
                                    "travelled: shm, cuda_ipc or inline",
                                    ["transport", "direction"], registry=registry)
        registry.register(_WorkerStateCollector(servicer))
        ProcessCollector(registry=registry)  # the worker's CPU, memory, open descriptors

    def function_label(self, name: str) -> str:
        return name if name in self.servicer.functions else UNKNOWN_FUNCTION

    def backward_function(self, request: Any) -> str:
        """The function whose residuals a Backward request names (looked up before the
        servicer pops them), or ``(unknown)``."""
        session = self.servicer.sessions.get(getattr(request, "session_id", ""))
        residual = (session.residuals.peek(getattr(request, "residual_id", 0))
                    if session is not None else None)
        return residual.function.name if residual is not None else UNKNOWN_FUNCTION

    def count_bytes(self, message: Any, trees: Iterable[str], direction: str) -> None:
        shm = cuda_ipc = inline = 0
        other: dict[str, int] = {}
        for tree in trees:  # one pass, no allocation per leaf: ~1 us per tensor leaf
            for leaf in getattr(message, tree).leaves:
                kind = leaf.WhichOneof("location")
                if kind == "shm":
                    shm += leaf.shm.nbytes
                elif kind == _INLINE:
                    inline += len(leaf.inline_data)
                elif kind == "cuda_ipc":
                    cuda_ipc += leaf.cuda_ipc.nbytes
                elif kind is not None:  # a location added to the protocol later
                    other[kind] = other.get(kind, 0) + getattr(getattr(leaf, kind), "nbytes", 0)
        for transport, nbytes in (("shm", shm), ("inline", inline), ("cuda_ipc", cuda_ipc),
                                  *other.items()):
            if nbytes:
                self._child(self.tensor_bytes, transport, direction).inc(nbytes)

    def _child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, cached (prometheus_client's lookup takes a lock and
        builds a tuple each time)."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children.setdefault(key, metric.labels(*labels))
        return child

    def observe(self, method: str, function: str, request: Any, response: Any, code: str,
                seconds: float) -> None:
        """One RPC's counts (what :class:`MetricsInterceptor` calls when it ends)."""
        child = self._child
        child(self.rpcs, method, code).inc()
        if getattr(response, "required_output_bytes", 0):
            return  # not run: the client's output arena was too small, and it calls again
        if code != "OK":
            child(self.errors, method, function, code).inc()
        if method == "Call":
            child(self.calls, function, code).inc()
            child(self.call_seconds, function).observe(seconds)
        elif method == "Backward":
            child(self.backwards, function, code).inc()
            child(self.backward_seconds, function).observe(seconds)
        else:
            return
        if hasattr(request, "session_id"):  # not an undecodable request
            self.count_bytes(request, _REQUEST_TREES[method], "in")
        if response is not None:
            self.count_bytes(response, _RESPONSE_TREES[method], "out")


class _WorkerStateCollector:
    """Gauges read from the servicer when Prometheus scrapes (nothing on the serving path)."""

    def __init__(self, servicer: JaxWorkerServicer) -> None:
        self.servicer = servicer

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        sessions = list(self.servicer.sessions.values())  # one atomic copy under the GIL
        yield GaugeMetricFamily(f"{PREFIX}_sessions", "Client sessions open",
                                value=len(sessions))
        yield GaugeMetricFamily(f"{PREFIX}_residuals", "vjp residual sets held for a later "
                                "Backward, over all sessions",
                                value=sum(len(s.residuals) for s in sessions))
        yield GaugeMetricFamily(f"{PREFIX}_residual_bytes", "Bytes of vjp residuals held "
                                "(what --max-residual-bytes bounds per session), over all "
                                "sessions", value=sum(s.residuals.nbytes for s in sessions))
        yield GaugeMetricFamily(f"{PREFIX}_regions", "Shared-memory and CUDA IPC regions "
                                "mapped, over all sessions",
                                value=sum(s.num_regions for s in sessions))
        entries = GaugeMetricFamily(f"{PREFIX}_compile_cache_entries", "Compiled input "
                                    "signatures cached (--max-compiled-signatures bounds "
                                    "them per function)", labels=["function"])
        evictions = CounterMetricFamily(f"{PREFIX}_compile_cache_evictions", "Compiled "
                                        "input signatures dropped from the cache (least "
                                        "recently used first)", labels=["function"])
        for name, function in sorted(self.servicer.functions.items()):
            entries.add_metric([name], len(function.engine.programs))
            evictions.add_metric([name], function.engine.evictions)
        yield entries
        yield evictions


class MetricsInterceptor(PerMethodInterceptor):
    """Counts every ``JaxWorkerService`` RPC into :class:`WorkerMetrics`. Sits between the
    token check and the status interceptor, so it sees the status code the latter set
    (Note [What the metrics cost and expose])."""

    def __init__(self, metrics: WorkerMetrics) -> None:
        super().__init__()
        self.metrics = metrics

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        return _rewrap(handler, _counting(self.metrics, method.rsplit("/", 1)[-1]))


def _code(context: grpc.ServicerContext, failed: bool) -> str:
    code = context.code()
    if code is None:
        return "UNKNOWN" if failed else "OK"
    return code.name if isinstance(code, grpc.StatusCode) else str(code)


def _counting(metrics: WorkerMetrics, method: str) -> Callable[[Behavior, bool], Behavior]:
    def function_of(request: Any) -> str:
        if method == "Call":
            return metrics.function_label(getattr(request, "function", ""))
        if method == "Backward":
            return metrics.backward_function(request)
        return ""

    def wrap(behavior: Behavior, streams: bool) -> Behavior:
        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            function = function_of(request)
            start = time.perf_counter()
            response, failed = None, True
            try:
                response = behavior(request, context)
                failed = False
                return response
            finally:
                metrics.observe(method, function, request, response, _code(context, failed),
                                time.perf_counter() - start)

        def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            start, failed = time.perf_counter(), True
            try:
                yield from behavior(request, context)
                failed = False
            finally:
                metrics.observe(method, "", request, None, _code(context, failed),
                                time.perf_counter() - start)

        return stream if streams else unary

    return wrap


class MetricsServer:
    """prometheus_client's HTTP exposition of one worker's registry, on ``host:port``."""

    def __init__(self, metrics: WorkerMetrics, host: str, port: int) -> None:
        from prometheus_client import start_http_server

        self.metrics = metrics
        self._httpd, self._thread = start_http_server(port, addr=host,
                                                      registry=metrics.registry)
        bound_port = self._httpd.server_address[1]
        self.address = f"[{host}]:{bound_port}" if ":" in host else f"{host}:{bound_port}"
        log.info("Prometheus metrics on http://%s/metrics", self.address)

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)


def start_metrics(metrics: WorkerMetrics, address: str) -> MetricsServer:
    """Serve ``metrics`` on ``address`` (``HOST:PORT``); raises ``ValueError`` for a
    malformed address and ``OSError`` when it cannot be bound."""
    host, port = parse_metrics_listen(address)
    try:
        return MetricsServer(metrics, host, port)
    except OSError as error:
        raise OSError(error.errno, f"cannot serve metrics on {address} (--metrics-listen): "
                                   f"{error.strerror or error}") from None


__all__ = ["MetricsInterceptor", "MetricsServer", "WorkerMetrics", "start_metrics"]
