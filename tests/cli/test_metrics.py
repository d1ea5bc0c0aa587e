"""The worker's Prometheus endpoint (``--metrics-listen``): a real worker process, real
calls over gRPC and shared memory, the endpoint scraped over HTTP; each counter, histogram
and gauge moves by exactly what the calls did (Note [What the metrics cost and expose] in
``server/_metrics.py``)."""

from __future__ import annotations

import gc
import json
import os
import tempfile
import time
import urllib.request
from collections.abc import Iterator

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from support.workers import WorkerProcess, start_worker, stop_worker

from torch_jax_interop.client import connect
from torch_jax_interop.errors import FunctionNotFoundError, RemoteExecutionError

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(scope="module")
def metrics_worker() -> Iterator[tuple[WorkerProcess, str]]:
    """A worker with metrics on an ephemeral loopback port (and a compile cache of one
    signature per function, to see evictions); ``(worker, "127.0.0.1:PORT")``."""
    with tempfile.TemporaryDirectory(prefix="tji", dir="/tmp") as tmp:
        process = start_worker(tmp, extra=["--metrics-listen", "127.0.0.1:0",
                                           "--max-compiled-signatures", "1"])
        try:
            with open(os.path.join(tmp, "ready.json")) as f:
                address = json.load(f)["metrics"]
            yield process, address
        finally:
            assert stop_worker(process) == 0, process.log()


def scrape(address: str) -> Samples:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=30) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def scrape_after_session_end(address: str, before: Samples, timeout: float = 10.0) -> Samples:
    """A scrape once the worker has counted the end of the session opened since ``before``.

    The worker counts a session's ``OpenSession`` stream, and drops it from the sessions
    gauge, on its own threads when the stream ends: after the client's ``close()`` has
    returned, a moment later on a slow machine. Scraped at once, the counters could still
    miss it (seen: 1 run in 6 on a 2-vCPU VM, before and after this session's changes)."""
    deadline = time.monotonic() + timeout
    while True:
        after = scrape(address)
        ended = sum(delta(before, after, "torch_jax_interop_rpcs_total", method="OpenSession",
                          code=code) for code in ("OK", "CANCELLED"))
        if (ended and value(after, "torch_jax_interop_sessions")
                == value(before, "torch_jax_interop_sessions")) or time.monotonic() > deadline:
            return after
        time.sleep(0.05)


def test_counters_and_histograms_move_by_what_the_calls_did(
        metrics_worker: tuple[WorkerProcess, str]) -> None:
    worker, address = metrics_worker
    before = scrape(address)
    params = torch.ones(4, requires_grad=True)
    x = torch.arange(4, dtype=torch.float32)
    with connect(worker.address, transport="inline") as remote:
        out = remote.function("scale")(params, x)  # 32 bytes in, 16 out
        out.sum().backward()  # 16 bytes of cotangent in, 16 of gradient out
        with pytest.raises(RemoteExecutionError, match="always fails"):
            remote.function("fails")(x)  # 16 bytes in
        with pytest.raises(FunctionNotFoundError):
            remote.function("no_such_function")(x)  # 16 bytes in
        during = scrape(address)
    after = scrape_after_session_end(address, before)
    torch.testing.assert_close(params.grad, x)

    assert delta(before, after, "torch_jax_interop_calls_total", function="scale",
                 code="OK") == 1
    assert delta(before, after, "torch_jax_interop_backward_calls_total", function="scale",
                 code="OK") == 1
    assert delta(before, after, "torch_jax_interop_calls_total", function="fails",
                 code="UNKNOWN") == 1
    # A made-up name is counted, under a bounded label (a peer cannot grow the registry).
    assert delta(before, after, "torch_jax_interop_calls_total", function="(unknown)",
                 code="NOT_FOUND") == 1
    assert not any("no_such_function" in str(labels) for _, labels in after)
    assert delta(before, after, "torch_jax_interop_errors_total", method="Call",
                 function="fails", code="UNKNOWN") == 1
    assert delta(before, after, "torch_jax_interop_errors_total", method="Call",
                 function="(unknown)", code="NOT_FOUND") == 1
    assert delta(before, after, "torch_jax_interop_rpcs_total", method="Call", code="OK") == 1
    assert delta(before, after, "torch_jax_interop_rpcs_total", method="Backward",
                 code="OK") == 1
    assert delta(before, after, "torch_jax_interop_rpcs_total", method="OpenSession",
                 code="CANCELLED") + delta(before, after, "torch_jax_interop_rpcs_total",
                                           method="OpenSession", code="OK") == 1

    for histogram, function in (("call", "scale"), ("backward", "scale"), ("call", "fails")):
        name = f"torch_jax_interop_{histogram}_duration_seconds"
        assert delta(before, after, f"{name}_count", function=function) == 1
        assert delta(before, after, f"{name}_sum", function=function) > 0
        assert delta(before, after, f"{name}_bucket", function=function, le="+Inf") == 1

    assert delta(before, after, "torch_jax_interop_tensor_bytes_total", transport="inline",
                 direction="in") == 32 + 16 + 16 + 16
    assert delta(before, after, "torch_jax_interop_tensor_bytes_total", transport="inline",
                 direction="out") == 16 + 16
    assert delta(before, after, "torch_jax_interop_tensor_bytes_total", transport="shm",
                 direction="in") == 0

    assert value(during, "torch_jax_interop_sessions") == value(before,
                                                                "torch_jax_interop_sessions") + 1
    assert value(after, "torch_jax_interop_sessions") == value(before,
                                                               "torch_jax_interop_sessions")
    assert value(after, "torch_jax_interop_compile_cache_entries", function="scale") == 1


def test_shared_memory_bytes_residuals_and_evictions(
        metrics_worker: tuple[WorkerProcess, str]) -> None:
    worker, address = metrics_worker
    nbytes = 1 << 20
    before = scrape(address)
    with connect(worker.address, transport="shm") as remote:
        x = torch.randn(nbytes // 4)
        torch.testing.assert_close(remote.function("identity")(x), x)
        params = torch.ones(nbytes // 4, requires_grad=True)
        out = remote.function("scale")(params, x)  # residuals held until backward
        holding = scrape(address)
        assert value(holding, "torch_jax_interop_residuals") == 1
        assert value(holding, "torch_jax_interop_residual_bytes") > 0
        assert value(holding, "torch_jax_interop_regions") >= 1
        del out
        gc.collect()
        remote.function("identity")(torch.randn(3))  # a second signature: evicts the first
        after = scrape(address)
    released = scrape_after_session_end(address, before)  # the session's residuals go with it
    assert delta(before, after, "torch_jax_interop_tensor_bytes_total", transport="shm",
                 direction="in") == 3 * nbytes
    out_bytes = sum(delta(before, after, "torch_jax_interop_tensor_bytes_total", transport=t,
                          direction="out") for t in ("shm", "inline"))
    assert out_bytes == 2 * nbytes + 3 * 4
    assert value(after, "torch_jax_interop_compile_cache_entries", function="identity") == 1
    assert delta(before, after, "torch_jax_interop_compile_cache_evictions_total",
                 function="identity") == 1
    assert value(released, "torch_jax_interop_residuals") == 0
    assert value(released, "torch_jax_interop_residual_bytes") == 0


def test_the_endpoint_binds_only_where_told(metrics_worker: tuple[WorkerProcess, str]) -> None:
    """Listening sockets of the worker's metrics port: 127.0.0.1 only, as given."""
    _, address = metrics_worker
    port = int(address.rsplit(":", 1)[1])
    listening = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in list(f)[1:]:
                fields = line.split()
                local, state = fields[1], fields[3]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                    listening.append((table, local.rsplit(":", 1)[0]))
    assert listening == [("/proc/net/tcp", "0100007F")], listening
