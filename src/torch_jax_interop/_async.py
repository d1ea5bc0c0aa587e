"""Asynchronous calls: ``submit`` / ``call_async`` / ``forward_async`` on top of the
synchronous call path (torch side: imports torch, never JAX).

A call made asynchronously is the same synchronous call (whatever carries it: shared memory,
inline bytes, a same-host data plane, or JAX in this process), run by a ``CallExecutor``: a
small pool of threads with two bounds, how many calls run at once and how many may wait.

# Note [Asynchronous calls and autograd]

The call runs in an executor thread under the torch state of the thread that submitted it
(``TorchState``: grad mode, inference mode, autocast), so the future's result is exactly
what the synchronous call would have returned in the submitting thread: with gradients on,
a tensor in the autograd graph (its node built in the executor thread; torch's graph does
not belong to a thread). What follows from building on the synchronous call:

* *residuals* live on the autograd node (Note [Residuals and the torch graph] in
  ``_wrapped.py``): a future whose result is never read, or dropped, frees them when the
  result is garbage-collected, as for a synchronous call; backward passes may run in any
  order, each with its own residuals;
* *errors* are the synchronous call's exceptions, raised by ``Future.result()`` with the
  same type; a worker killed while a call is pending fails the call within its deadline
  (the synchronous call's own bound) with ``WorkerUnavailableError``;
* *cancellation*: ``Future.cancel()`` (or cancelling the awaiting asyncio task) stops a call
  that has not started; a call already running finishes and its result is dropped;
* *inputs in flight*: the tensors of a call (a module's parameters included) are read while
  the call runs, after ``submit`` returned. Their version counters are recorded at
  ``submit`` and checked when the call ends: a tensor modified in place in between (say,
  ``optimizer.step()`` before the future's result was read) fails the call with
  ``RuntimeError`` rather than returning a result that may mix old and new values.
  Inference tensors (made under ``torch.inference_mode()``) have no version counter: torch
  refuses their in-place writes outside inference mode, but inside it nothing can check;
* *order*: with one thread (the default) calls run in the order they were submitted; with
  more, in any order. A call never waits for another future inside the executor.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from ._compat._torch import version_counter
from ._errors import CallQueueFullError
from ._pytree import TreeTemplate

__all__ = [
    "DEFAULT_MAX_ASYNC_CALLS",
    "DEFAULT_MAX_QUEUED_CALLS",
    "AsyncCallable",
    "CallExecutor",
    "TorchState",
    "check_async_bounds",
    "library_executor",
]

DEFAULT_MAX_ASYNC_CALLS = 1
"""Calls of one connection (or of library mode) that run at once, by default: one keeps
them in submission order and is enough to overlap torch's work with JAX's."""
DEFAULT_MAX_QUEUED_CALLS = 64
"""Submitted calls that may wait for a thread, by default; one more is refused."""
_AUTOCAST_DEVICES = ("cpu", "cuda")


class TorchState:
    """The thread-local torch state a call depends on, captured in the submitting thread
    and applied in the executor thread (Note [Asynchronous calls and autograd])."""

    __slots__ = ("autocast", "autocast_cache", "grad", "inference")

    def __init__(self) -> None:
        self.grad = torch.is_grad_enabled()
        self.inference = torch.is_inference_mode_enabled()
        self.autocast = [
            (device, torch.get_autocast_dtype(device))
            for device in _AUTOCAST_DEVICES
            if torch.is_autocast_enabled(device)
        ]
        self.autocast_cache = torch.is_autocast_cache_enabled()

    def applied(self) -> contextlib.ExitStack:
        """A context that sets this state in the current thread (and restores it)."""
        stack = contextlib.ExitStack()
        if self.inference:
            stack.enter_context(torch.inference_mode())
        stack.enter_context(torch.set_grad_enabled(self.grad))
        for device, dtype in self.autocast:
            stack.enter_context(
                torch.autocast(device, dtype=dtype, cache_enabled=self.autocast_cache)
            )
        return stack


def check_async_bounds(max_async_calls: int, max_queued_calls: int) -> None:
    """ValueError naming the keyword when a bound is not a positive / non-negative int."""
    if not isinstance(max_async_calls, int) or max_async_calls < 1:
        raise ValueError(f"max_async_calls={max_async_calls!r} must be an int >= 1 (threads "
                         "that run asynchronous calls at once)")
    if not isinstance(max_queued_calls, int) or max_queued_calls < 0:
        raise ValueError(f"max_queued_calls={max_queued_calls!r} must be an int >= 0 "
                         "(submitted calls that may wait for a thread)")


class CallExecutor:
    """Runs calls in up to ``max_async_calls`` threads, with at most ``max_queued_calls``
    more waiting; ``submit`` beyond that raises ``CallQueueFullError`` at once (it never
    blocks). Threads start on the first ``submit``."""

    def __init__(self, max_async_calls: int = DEFAULT_MAX_ASYNC_CALLS,
                 max_queued_calls: int = DEFAULT_MAX_QUEUED_CALLS, *,
                 name: str = "tji-async") -> None:
        check_async_bounds(max_async_calls, max_queued_calls)
        self.max_async_calls = max_async_calls
        self.max_queued_calls = max_queued_calls
        self._name = name
        self._slots = threading.BoundedSemaphore(max_async_calls + max_queued_calls)
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._closed = False

    def submit(self, fn: Callable[..., Any], args: tuple, kwargs: dict, *,
               watch: Sequence[torch.Tensor] = ()) -> Future[Any]:
        """Run ``fn(*args, **kwargs)`` in a thread under this thread's torch state; the
        tensors in ``watch`` must not be modified in place until it ends."""
        state = TorchState()
        watch = [t for t in watch if not t.is_inference()]  # torch keeps no counter there
        versions = [version_counter(t) for t in watch]
        if not self._slots.acquire(blocking=False):
            raise CallQueueFullError(
                f"{self.max_async_calls + self.max_queued_calls} asynchronous calls are "
                f"already pending ({self.max_async_calls} running, {self.max_queued_calls} "
                "queued): read some results (future.result()) before submitting more, or "
                "raise the bound (connect(max_async_calls=..., max_queued_calls=...))"
            )
        try:
            with self._lock:
                if self._closed:
                    raise RuntimeError("this connection is closed: no call can be submitted")
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(self.max_async_calls,
                                                    thread_name_prefix=self._name,
                                                    initializer=_mark_thread)
                future = self._pool.submit(_run, state, fn, args, kwargs, watch, versions)
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(self._release_slot)
        return future

    def _release_slot(self, _: Future[Any]) -> None:
        self._slots.release()

    def shutdown(self) -> None:
        """Cancel the calls that have not started and wait for the running ones (each
        bounded by its own deadline)."""
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


_thread = threading.local()


def _mark_thread() -> None:
    _thread.async_call = True


def in_async_call() -> bool:
    """Whether this thread is a :class:`CallExecutor`'s (it runs asynchronous calls)."""
    return getattr(_thread, "async_call", False)


def _run(state: TorchState, fn: Callable[..., Any], args: tuple, kwargs: dict,
         watch: Sequence[torch.Tensor], versions: list[int | None]) -> Any:
    with state.applied():
        result = fn(*args, **kwargs)
    for tensor, version in zip(watch, versions, strict=True):
        if version is None or version_counter(tensor) != version:
            raise RuntimeError(
                f"a {tuple(tensor.shape)} {tensor.dtype} tensor of an asynchronous call was "
                "modified in place while the call was in flight (version "
                f"{version} at submit, {version_counter(tensor)} after the call), so its "
                "result may mix old and new values. Read the future's result "
                "(future.result()) before modifying the call's inputs or the module's "
                "parameters in place (optimizer.step(), zero_(), ...), or pass a .clone()."
            )
    return result


_library: CallExecutor | None = None
_library_lock = threading.Lock()


def library_executor() -> CallExecutor:
    """The executor of asynchronous calls run by JAX in this process (library mode):
    ``DEFAULT_MAX_ASYNC_CALLS`` threads, ``DEFAULT_MAX_QUEUED_CALLS`` waiting."""
    global _library
    with _library_lock:
        if _library is None:
            _library = CallExecutor(name="tji-async-library")
        return _library


class AsyncCallable:
    """``submit`` and ``call_async`` for a callable with a ``_call_executor()``: a remote
    or in-process function (Note [Asynchronous calls and autograd])."""

    def _call_executor(self) -> CallExecutor:
        raise NotImplementedError

    def submit(self, *args: Any, **kwargs: Any) -> Future[Any]:
        """Start ``self(*args, **kwargs)`` in the background and return its
        ``concurrent.futures.Future`` at once.

        The call runs under this thread's grad mode, inference mode and autocast state;
        ``future.result()`` returns what the synchronous call returns (a tensor in the
        autograd graph when an input requires grad) or raises the same exception. Input
        tensors must not be modified in place before the call ends (checked: the call then
        raises ``RuntimeError``).

        Raises:
            CallQueueFullError: too many calls pending (see ``connect(max_queued_calls=)``).
        """
        call: Callable[..., Any] = self  # type: ignore[assignment]  # subclasses are callable
        return self._call_executor().submit(call, args, kwargs,
                                            watch=_tensors_in((args, kwargs)))

    async def call_async(self, *args: Any, **kwargs: Any) -> Any:
        """``await fn.call_async(x)``: ``submit`` for asyncio (the call starts when the
        coroutine first runs; cancelling the task cancels a call that has not started)."""
        return await asyncio.wrap_future(self.submit(*args, **kwargs))


def _tensors_in(tree: Any) -> list[torch.Tensor]:
    return TreeTemplate.of(tree, _is_tensor)[1]


def _is_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor)
