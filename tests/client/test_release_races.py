"""The client's shared queues under threads (asynchronous calls add them): a residual
release queued while another thread flushes is sent, never lost; arena slices quarantined
after a deadline are released once each when several threads drain them at once.

Both races are forced, not waited for: the queue is swapped for a subclass of its own type
whose method blocks at the racy moment, so the tests need no timing."""

from __future__ import annotations

import threading
from typing import Any

import torch
from support.workers import WorkerProcess

from torch_jax_interop._call import Call
from torch_jax_interop.client import connect
from torch_jax_interop.client._connect import Worker
from torch_jax_interop.client._state import _Session
from torch_jax_interop.proto.v1 import interop_pb2 as pb


def _forward(w: Any, x: torch.Tensor) -> Any:
    """One forward of ``scale`` that keeps its residuals on the worker: the handle."""
    backend = w.function("scale").__torch_jax_interop_backend__()
    call, tensors = Call.of(backend, False, (torch.tensor(2.0, requires_grad=True), x), {})
    handle = w.call("scale", call, tensors, keep_residuals=True)[3]
    assert handle is not None
    return handle


def test_a_release_queued_during_a_flush_reaches_the_worker(worker: WorkerProcess) -> None:
    with connect(worker.address, timeout=60) as w:
        first, second = _forward(w, torch.ones(3)), _forward(w, torch.ones(4))
        w.release(first)
        entered, flushed = threading.Event(), threading.Event()

        class AppendsAfterTheFlush(type(w._pending_release)):  # type: ignore[misc]
            """A release that reached the queue object just before a flush took its
            contents, and appends only after that flush ended."""

            blocked = True

            def append(self, item: Any) -> None:
                if self.blocked:
                    self.blocked = False
                    entered.set()
                    assert flushed.wait(60)
                super().append(item)

        w._pending_release = AppendsAfterTheFlush(w._pending_release)
        releasing = threading.Thread(target=w.release, args=(second,))
        releasing.start()
        assert entered.wait(60)
        session = w._current()
        w._flush_releases(session)  # sends `first`
        flushed.set()
        releasing.join(60)
        w._flush_releases(session)  # must send `second`
        response = w._session_rpc(session, "Release", pb.ReleaseRequest(
            session_id=session.id, residual_ids=[first.residual_id, second.residual_id]),
            "releasing")
        assert response.released == 0, "a residual stayed on the worker"


class _Arena:
    def __init__(self) -> None:
        self.releases = 0

    def release(self) -> None:
        self.releases += 1


def test_two_threads_draining_the_quarantine_release_each_slice_once() -> None:
    session = _Session("s", None, None, 0, threading.Event(), "inline")
    arena = _Arena()
    both_looked = threading.Barrier(2)

    class BothSeeOneLeft(type(session.quarantined)):  # type: ignore[misc]
        """Each thread finds the last slice still there before either takes it."""

        def __len__(self) -> int:
            n = super().__len__()
            if n and not getattr(threading.current_thread(), "looked", False):
                threading.current_thread().looked = True  # type: ignore[attr-defined]
                both_looked.wait(60)
            return n

    session.quarantined = BothSeeOneLeft([arena])
    errors: list[BaseException] = []

    def drain() -> None:
        try:
            Worker._release_quarantined(session)
        except BaseException as error:  # noqa: BLE001 - the race's IndexError, reported below
            errors.append(error)

    threads = [threading.Thread(target=drain) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert arena.releases == 1
