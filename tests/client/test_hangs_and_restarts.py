"""Hangs and slow failure: every wait has a deadline (the first session event included), a
dead worker fails calls at once, a restarted one is found within about a second, and a call
that ran past its deadline leaves neither its arena slice (client) nor its residuals (worker)
behind."""

from __future__ import annotations

import gc
import os
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
import torch
from support.workers import WorkerProcess, start_worker, stop_worker

from torch_jax_interop import WrappedJaxFunction
from torch_jax_interop._wire import PROTOCOL_VERSION
from torch_jax_interop.client import (
    DeadlineExceededError,
    WorkerUnavailableError,
    connect,
)
from torch_jax_interop.proto.v1 import interop_pb2 as pb, interop_pb2_grpc as pb_grpc


class _SilentWorker(pb_grpc.JaxWorkerServiceServicer):
    """Opens the first ``answered`` sessions (each ends when ``end_sessions`` is set), then
    accepts every later OpenSession and never answers it."""

    def __init__(self, answered: int) -> None:
        self.answered = answered
        self.opened = 0
        self.end_sessions = threading.Event()
        self.shutdown = threading.Event()

    def OpenSession(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        self.opened += 1
        if self.opened <= self.answered:
            yield pb.OpenSessionResponse(session_id=f"s{self.opened}", worker_pid=os.getpid(),
                                         protocol_version=PROTOCOL_VERSION)
            self.end_sessions.wait()
            return
        self.shutdown.wait()  # silent: never a first event


@pytest.fixture
def silent_worker() -> Iterator[tuple[_SilentWorker, str]]:
    with tempfile.TemporaryDirectory(prefix="tji", dir="/tmp") as tmp:
        servicer = _SilentWorker(answered=1)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        pb_grpc.add_JaxWorkerServiceServicer_to_server(servicer, server)
        address = f"unix://{tmp}/s.sock"
        assert server.add_insecure_port(address)
        server.start()
        try:
            yield servicer, address
        finally:
            servicer.end_sessions.set()
            servicer.shutdown.set()
            server.stop(None).wait(10)


def test_a_worker_that_never_opens_the_session_fails_connect_within_its_timeout(
        silent_worker: tuple[_SilentWorker, str]) -> None:
    servicer, address = silent_worker
    servicer.answered = 0
    start = time.monotonic()
    with pytest.raises(WorkerUnavailableError, match=r"did not open a session within 1\.5 s"):
        connect(address, timeout=1.5, transport="inline")
    assert time.monotonic() - start < 5


def test_a_worker_that_never_opens_the_session_fails_the_reconnect_within_the_timeout(
        silent_worker: tuple[_SilentWorker, str]) -> None:
    servicer, address = silent_worker
    with connect(address, timeout=1.5, transport="inline") as w:
        servicer.end_sessions.set()  # the first session ends; the next one is never answered
        deadline = time.monotonic() + 10
        while w._session is not None and w._session.alive.is_set():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        start = time.monotonic()
        with pytest.raises(WorkerUnavailableError, match="did not open a session"):
            w.transport  # noqa: B018 (reconnects)
        assert time.monotonic() - start < 5


def test_a_stopped_worker_fails_connect_within_its_timeout(
        fresh_worker: WorkerProcess) -> None:
    os.kill(fresh_worker.process.pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        with pytest.raises(WorkerUnavailableError, match="1.5 s"):
            connect(fresh_worker.address, timeout=1.5)
        assert time.monotonic() - start < 5
    finally:
        os.kill(fresh_worker.process.pid, signal.SIGCONT)
    with connect(fresh_worker.address, timeout=30) as w:  # and it serves once resumed
        assert torch.equal(w.function("add_one")(torch.zeros(2)), torch.ones(2))


def test_a_stopped_worker_fails_the_reconnect_within_the_timeout(
        fresh_worker: WorkerProcess) -> None:
    with connect(fresh_worker.address, timeout=30) as w:
        assert torch.equal(w.function("add_one")(torch.zeros(2)), torch.ones(2))  # compiled
        w.timeout = 1.5
        os.kill(fresh_worker.process.pid, signal.SIGSTOP)
        try:
            # The connection stays up while the worker is stopped; a session that ended
            # (as when its stream breaks) makes the next call open a new one on it.
            assert w._session is not None
            w._session.alive.clear()
            start = time.monotonic()
            with pytest.raises(WorkerUnavailableError, match=r"within 1\.5 s"):
                w.function("add_one")(torch.zeros(2))
            assert time.monotonic() - start < 5
        finally:
            os.kill(fresh_worker.process.pid, signal.SIGCONT)
        w.timeout = 30
        assert torch.equal(w.function("add_one")(torch.zeros(2)), torch.ones(2))


def test_a_worker_stopped_mid_session_times_calls_out_and_the_data_plane_comes_back(
        fresh_worker: WorkerProcess) -> None:
    """On the same-host data plane: a stopped worker (SIGSTOP) costs each call its deadline,
    synchronous or submitted, never more; resumed, it serves the session over the unix
    socket again (Note [Same-host data plane])."""
    with connect(fresh_worker.address, timeout=30) as w:
        add_one = w.function("add_one")
        assert torch.equal(add_one(torch.zeros(2)), torch.ones(2))  # compiled
        assert w.transport_info.calls == "unix socket"
        w.timeout = 1.0
        os.kill(fresh_worker.process.pid, signal.SIGSTOP)
        try:
            for call in (lambda: add_one(torch.zeros(2)),
                         lambda: add_one.submit(torch.zeros(2)).result(timeout=10)):
                start = time.monotonic()
                with pytest.raises(DeadlineExceededError):
                    call()
                assert 0.9 < time.monotonic() - start < 3
        finally:
            os.kill(fresh_worker.process.pid, signal.SIGCONT)
        w.timeout = 30
        deadline = time.monotonic() + 15
        while w.transport_info.calls != "unix socket":
            assert time.monotonic() < deadline, w.transport_info
            assert torch.equal(add_one(torch.zeros(2)), torch.ones(2))  # gRPC meanwhile
            time.sleep(0.1)
        assert torch.equal(add_one(torch.zeros(2)), torch.ones(2))


def test_calls_after_a_worker_died_fail_fast_and_a_restart_is_found_within_a_second(
        short_tmp: str) -> None:
    first = start_worker(short_tmp)
    with connect(first.address, timeout=30) as w:
        x = torch.randn(1 << 16)
        assert torch.equal(w.function("identity")(x), x)
        first.process.kill()
        first.process.wait()
        for i in range(3):  # the first call and every later one: no wait for the timeout
            start = time.monotonic()
            # The first may reach the dead connection before the session watch noticed.
            # Later ones wait for the channel (`reconnect_timeout`); for a moment after the
            # death gRPC may still report the channel ready, and opening the new session
            # then fails at once (UNAVAILABLE): either message says what to do.
            expected = "reconnect_timeout|Is the worker running" if i else "worker"
            with pytest.raises(WorkerUnavailableError, match=expected):
                w.function("identity")(x)
            assert time.monotonic() - start < 3
        second = start_worker(short_tmp)
        try:
            ready = time.monotonic()
            while True:  # found within about a second of listening (the backoff's cap)
                try:
                    assert torch.equal(w.function("identity")(x), x)
                    break
                except WorkerUnavailableError:
                    assert time.monotonic() - ready < 2.5, "restarted worker not found"
                    time.sleep(0.05)
            assert w.transport == "shared memory"
        finally:
            assert stop_worker(second) == 0


def test_reconnect_timeout_waits_for_a_restarting_worker(short_tmp: str) -> None:
    first = start_worker(short_tmp)
    with connect(first.address, timeout=30, reconnect_timeout=120) as w:
        assert torch.equal(w.function("add_one")(torch.zeros(2)), torch.ones(2))
        first.process.kill()
        first.process.wait()
        started: list[WorkerProcess] = []
        restart = threading.Thread(target=lambda: started.append(start_worker(short_tmp)))
        restart.start()
        try:
            time.sleep(0.5)  # the call below begins while no worker listens
            assert torch.equal(w.function("add_one")(torch.zeros(2)), torch.ones(2))
        finally:
            restart.join()
            for worker in started:
                assert stop_worker(worker) == 0


def test_an_expired_call_returns_its_arena_slice_and_leaves_no_residual(
        short_tmp: str) -> None:
    # --max-residuals 2: residuals kept for expired calls would evict the live one below.
    worker = start_worker(short_tmp, extra=["--max-residuals", "2"])
    try:
        with connect(worker.address, timeout=30, transport="shm") as w:
            x = torch.randn(1 << 16)  # larger than the inline threshold: arena outputs
            kept = WrappedJaxFunction(w.function("scale"), torch.tensor(3.0))(x)
            slow = WrappedJaxFunction(w.function("slow_scale"), torch.tensor(2.0))
            warm = slow(x)  # compiled, arena size known
            assert torch.equal(warm, 2 * x)
            warm.sum().backward()
            del warm
            gc.collect()
            assert torch.equal(w.function("add_one")(torch.zeros(2)), torch.ones(2))
            pool = w._session.pool
            assert pool is not None
            baseline = pool.used_bytes
            w.timeout = 0.5
            for _ in range(3):
                with pytest.raises(DeadlineExceededError):
                    slow(x)
            time.sleep(3)  # the expired calls finish in the worker
            w.timeout = 30
            assert torch.equal(w.function("add_one")(torch.zeros(2)), torch.ones(2))
            gc.collect()
            assert pool.used_bytes == baseline, "an expired call kept its arena slice"
            kept.sum().backward()  # its residual was not evicted by the expired calls'
    finally:
        assert stop_worker(worker) == 0
