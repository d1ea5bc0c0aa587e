"""Asynchronous calls through a real worker: ``submit`` / ``call_async`` on a served
function and ``WrappedJaxFunction.submit`` / ``forward_async``.

Overlap is proven without timing: the served function waits for a gate file that the test
creates only after ``submit`` returned (``support/served_async.py``)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import os
import tempfile
import time
from collections.abc import Iterator

import pytest
import torch
from support.served_async import GATE_DIR_ENV
from support.workers import WorkerProcess, start_worker, stop_worker

from torch_jax_interop import WrappedJaxFunction
from torch_jax_interop.client import RemoteExecutionError, WorkerUnavailableError, connect
from torch_jax_interop.errors import CallQueueFullError

GATED = ["--function", "gated_scale=support.served_async:gated_scale"]


def _gated(tmp: str) -> Iterator[WorkerProcess]:
    process = start_worker(tmp, extra=GATED, env={GATE_DIR_ENV: tmp})
    try:
        yield process
    finally:
        if process.process.poll() is None:
            assert stop_worker(process) == 0, process.log()


@pytest.fixture(scope="module")
def gated_worker() -> Iterator[WorkerProcess]:
    """One worker for the module that serves ``gated_scale``, its gates in its folder
    (each test uses its own gate numbers)."""
    with tempfile.TemporaryDirectory(prefix="tji", dir="/tmp") as tmp:
        yield from _gated(tmp)


@pytest.fixture
def killable_worker(short_tmp: str) -> Iterator[WorkerProcess]:
    """A gated worker of its own, for the test that kills it."""
    yield from _gated(short_tmp)


def _gates(worker: WorkerProcess) -> str:
    return os.path.dirname(worker.socket_path or "")


def _open(worker: WorkerProcess, key: int) -> None:
    with open(os.path.join(_gates(worker), f"gate-{key}"), "w"):
        pass


def _started(worker: WorkerProcess, key: int) -> bool:
    return os.path.exists(os.path.join(_gates(worker), f"started-{key}"))


def _wait_started(worker: WorkerProcess, key: int, limit: float = 60.0) -> None:
    deadline = time.monotonic() + limit
    while not _started(worker, key):
        assert time.monotonic() < deadline, f"the worker never started call {key}"
        time.sleep(0.01)


def _x(key: int) -> torch.Tensor:
    return torch.tensor([float(key), 1.0, 2.0])


def test_submit_returns_while_the_worker_computes_and_gradients_equal_sync(
        gated_worker: WorkerProcess) -> None:
    with connect(gated_worker.address, timeout=60) as w:
        module = WrappedJaxFunction(w.function("gated_scale"), torch.tensor([2.0, 3.0, 4.0]))
        future = module.submit(_x(7))
        assert isinstance(future, concurrent.futures.Future)
        _wait_started(gated_worker, 7)
        # the worker is inside the call and cannot finish before the gate opens: torch
        # work done here overlaps it
        torch_stage = torch.randn(64, 64) @ torch.randn(64, 64)
        assert not future.done()
        _open(gated_worker, 7)
        out = future.result(timeout=60)
        assert out.grad_fn is not None and torch_stage.shape == (64, 64)
        (out * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
        asynchronous = module.params[0].grad.clone()
        module.zero_grad()
        (module(_x(7)) * torch.tensor([1.0, 2.0, 3.0])).sum().backward()  # gate 7 is open
        torch.testing.assert_close(asynchronous, module.params[0].grad)
        torch.testing.assert_close(out.detach(), torch.tensor([2.0, 3.0, 4.0]) * _x(7))


def test_several_forwards_in_flight_and_backwards_in_any_order(
        gated_worker: WorkerProcess) -> None:
    with connect(gated_worker.address, timeout=60, max_async_calls=3) as w:
        module = WrappedJaxFunction(w.function("gated_scale"), torch.tensor([1.0, 1.0, 1.0]))
        futures = [module.submit(_x(key)) for key in (1, 2, 3)]
        # The session's calls take turns on its data-plane connection, in whichever order
        # their threads get it (and JAX on the worker's CPU runs one at a time): wait for
        # one of them to be inside the worker, whichever it is.
        deadline = time.monotonic() + 60
        while not any(_started(gated_worker, key) for key in (1, 2, 3)):
            assert time.monotonic() < deadline, "the worker never started any of the calls"
            time.sleep(0.01)
        assert not any(f.done() for f in futures)
        for key in (3, 2, 1):
            _open(gated_worker, key)
        outs = [f.result(timeout=60) for f in futures]
        for index in (2, 0, 1):
            outs[index].sum().backward()
        expected = _x(1) + _x(2) + _x(3)
        torch.testing.assert_close(module.params[0].grad, expected)
        assert not w._pending_release  # backward without retain_graph freed each


def test_a_dropped_future_frees_its_residuals(gated_worker: WorkerProcess) -> None:
    with connect(gated_worker.address, timeout=60) as w:
        module = WrappedJaxFunction(w.function("gated_scale"), torch.tensor([2.0, 2.0, 2.0]))
        _open(gated_worker, 5)
        read_never = module.submit(_x(5))
        concurrent.futures.wait([read_never], timeout=60)
        assert read_never.result().grad_fn is not None
        del read_never
        gc.collect()
        assert len(w._pending_release) == 1  # the graph went, its residuals are queued
        # dropped while still pending: freed once the call ends
        _open(gated_worker, 6)
        module.submit(_x(6))
        with torch.no_grad():
            out = module.submit(_x(5)).result(timeout=60)  # one thread: runs after it
        assert out.grad_fn is None
        gc.collect()
        # the no_grad call sent the first release; the second future's was queued
        # before that call ran (its work item is dropped before the next one starts)
        assert not w._pending_release
        with torch.no_grad():
            module(_x(5))
        assert not w._pending_release


def test_a_worker_error_surfaces_from_result_with_the_sync_type(
        gated_worker: WorkerProcess) -> None:
    with connect(gated_worker.address, timeout=60) as w:
        fn = w.function("rejects_input")
        with pytest.raises(RemoteExecutionError) as sync:
            fn(torch.ones(2))
        future = fn.submit(torch.ones(2))
        with pytest.raises(RemoteExecutionError, match="rejects_input takes no input") as got:
            future.result(timeout=60)
        assert type(got.value) is type(sync.value)
        assert isinstance(future.exception(), RemoteExecutionError)


def test_worker_killed_while_a_future_is_pending_fails_it_within_the_deadline(
        killable_worker: WorkerProcess) -> None:
    gated_worker = killable_worker
    with connect(gated_worker.address, timeout=20) as w:
        future = w.function("gated_scale").submit(torch.ones(3), _x(9))
        _wait_started(gated_worker, 9)
        gated_worker.process.kill()
        gated_worker.process.wait()
        start = time.monotonic()
        with pytest.raises(WorkerUnavailableError, match="worker"):
            future.result(timeout=60)
        assert time.monotonic() - start < 20
        # the connection's next asynchronous call fails the same way, without hanging
        with pytest.raises(WorkerUnavailableError):
            w.function("identity").submit(torch.ones(2)).result(timeout=60)


def test_cancel_stops_a_queued_call_before_it_reaches_the_worker(
        gated_worker: WorkerProcess) -> None:
    with connect(gated_worker.address, timeout=60) as w:  # one thread: B waits behind A
        fn = w.function("gated_scale")
        a = fn.submit(torch.ones(3), _x(11))
        b = fn.submit(torch.ones(3), _x(12))
        _wait_started(gated_worker, 11)
        assert b.cancel()
        assert not a.cancel()  # running: it finishes
        _open(gated_worker, 11)
        _open(gated_worker, 12)
        torch.testing.assert_close(a.result(timeout=60), _x(11))
        assert b.cancelled()
        with pytest.raises(concurrent.futures.CancelledError):
            b.result()
        fn(torch.ones(3), _x(13 - 2))  # a later call, after which B would have run
        assert not _started(gated_worker, 12)


def test_the_queue_is_bounded_and_close_cancels_what_waits(
        gated_worker: WorkerProcess) -> None:
    w = connect(gated_worker.address, timeout=60, max_async_calls=1, max_queued_calls=1)
    try:
        fn = w.function("gated_scale")
        running = fn.submit(torch.ones(3), _x(21))
        queued = fn.submit(torch.ones(3), _x(22))
        with pytest.raises(CallQueueFullError, match="max_queued_calls"):
            fn.submit(torch.ones(3), _x(23))
        _wait_started(gated_worker, 21)
        _open(gated_worker, 21)
        torch.testing.assert_close(running.result(timeout=60), _x(21))
        _wait_started(gated_worker, 22)
        _open(gated_worker, 22)
        torch.testing.assert_close(queued.result(timeout=60), _x(22))
        # room again
        late = fn.submit(torch.ones(3), _x(24))
        waiting = fn.submit(torch.ones(3), _x(25))
        _wait_started(gated_worker, 24)
        _open(gated_worker, 24)
    finally:
        w.close()  # waits for the running call, cancels the waiting one
    torch.testing.assert_close(late.result(timeout=0), _x(24))
    assert waiting.cancelled() and not _started(gated_worker, 25)
    with pytest.raises(RuntimeError, match="closed"):
        fn.submit(torch.ones(3), _x(26))


@pytest.mark.parametrize("bounds", [{"max_async_calls": 0}, {"max_queued_calls": -1},
                                    {"max_async_calls": 1.5}])
def test_bad_bounds_are_refused_naming_the_keyword(gated_worker: WorkerProcess,
                                                   bounds: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(bounds))):
        connect(gated_worker.address, timeout=60, **bounds)


def test_an_in_place_write_while_in_flight_fails_the_call(gated_worker: WorkerProcess) -> None:
    with connect(gated_worker.address, timeout=60) as w:
        module = WrappedJaxFunction(w.function("gated_scale"), torch.tensor([2.0, 2.0, 2.0]))
        optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
        future = module.submit(_x(31))
        _wait_started(gated_worker, 31)
        module.params[0].grad = torch.ones(3)
        optimizer.step()  # too early: the call may have read old or new values
        _open(gated_worker, 31)
        with pytest.raises(RuntimeError, match="modified in place while the call was in"):
            future.result(timeout=60)


def test_grad_and_inference_mode_are_carried_into_the_call(
        gated_worker: WorkerProcess) -> None:
    with connect(gated_worker.address, timeout=60) as w:
        module = WrappedJaxFunction(w.function("gated_scale"), torch.tensor([2.0, 2.0, 2.0]))
        _open(gated_worker, 41)
        with torch.no_grad():
            future = module.submit(_x(41))
        out = future.result(timeout=60)  # read outside no_grad: the mode of submit counts
        assert out.grad_fn is None and not out.requires_grad
        with torch.inference_mode():
            future = module.submit(_x(41))
            expected = module(_x(41)).is_inference()
        assert future.result(timeout=60).is_inference() == expected
        assert future.result().grad_fn is None
        assert module.submit(_x(41)).result(timeout=60).grad_fn is not None


def test_asyncio_forms(gated_worker: WorkerProcess) -> None:
    with connect(gated_worker.address, timeout=60) as w:
        module = WrappedJaxFunction(w.function("gated_scale"), torch.tensor([3.0, 3.0, 3.0]))
        fn = w.function("add_one")

        async def main() -> tuple[torch.Tensor, torch.Tensor]:
            remote = asyncio.ensure_future(module.forward_async(_x(51)))
            await asyncio.sleep(0)  # the call is submitted
            while not _started(gated_worker, 51):
                await asyncio.sleep(0.01)
            assert not remote.done()
            _open(gated_worker, 51)
            return await remote, await fn.call_async(torch.zeros(2))

        out, plus_one = asyncio.run(main())
        torch.testing.assert_close(out.detach(), 3.0 * _x(51))
        torch.testing.assert_close(plus_one, torch.ones(2))

        async def cancelled() -> bool:
            blocker = asyncio.ensure_future(module.forward_async(_x(52)))
            queued = asyncio.ensure_future(module.forward_async(_x(53)))
            while not _started(gated_worker, 52):
                await asyncio.sleep(0.01)
            queued.cancel()  # cancels the call behind the blocker
            _open(gated_worker, 52)
            await blocker
            with pytest.raises(asyncio.CancelledError):
                await queued
            return True

        assert asyncio.run(cancelled())
        module(_x(51))  # a later call on the one thread: 53 would have run before it
        assert not _started(gated_worker, 53)
