"""Asynchronous calls in library mode: ``WrappedJaxFunction.submit`` / ``forward_async`` on
a JAX function in this process, and ``submit`` on ``connect("inproc")``'s functions.

Overlap is proven without timing: the JAX function waits (in a host callback) for an
event that the test sets only after ``submit`` returned."""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import threading
from typing import Any

import jax
import jax.numpy as jnp
import pytest
import torch

from torch_jax_interop import WrappedJaxFunction
from torch_jax_interop._async import CallExecutor
from torch_jax_interop.client import connect
from torch_jax_interop.errors import CallQueueFullError

GATE_LIMIT_S = 60.0


class Gate:
    """A JAX function ``tanh(x @ w + b)`` that blocks inside the computation until
    ``open()``; ``entered`` is set once the computation is inside."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.opened = threading.Event()

    def wait(self, value: Any) -> Any:
        self.entered.set()
        if not self.opened.wait(GATE_LIMIT_S):
            raise TimeoutError("the test never opened the gate")
        return value

    def __call__(self, params: dict[str, jax.Array], x: jax.Array) -> jax.Array:
        # a zero from a callback that no input feeds: x stays differentiable
        zero = jnp.zeros((), x.dtype)
        x = x + jax.pure_callback(self.wait, jax.ShapeDtypeStruct((), x.dtype), zero)
        return jnp.tanh(x @ params["w"] + params["b"])

    def open(self) -> None:
        self.opened.set()


def _params() -> dict[str, jax.Array]:
    return {"w": jnp.arange(6.0).reshape(3, 2) / 6, "b": jnp.array([0.1, -0.2])}


def test_submit_overlaps_and_gradients_equal_the_synchronous_call() -> None:
    gate = Gate()
    module = WrappedJaxFunction(gate, _params())
    x = torch.randn(4, 3, requires_grad=True)
    future = module.submit(x)
    assert gate.entered.wait(GATE_LIMIT_S)
    torch_stage = torch.randn(32, 32).relu().sum()  # runs while JAX waits
    assert not future.done()
    gate.open()
    out = future.result(timeout=GATE_LIMIT_S)
    (out * torch.arange(8.0).reshape(4, 2)).sum().backward()
    got = {n: p.grad.clone() for n, p in module.named_parameters()}, x.grad.clone()
    module.zero_grad()
    x.grad = None
    (module(x) * torch.arange(8.0).reshape(4, 2)).sum().backward()
    for name, p in module.named_parameters():
        torch.testing.assert_close(got[0][name], p.grad)
    torch.testing.assert_close(got[1], x.grad)
    assert torch.isfinite(torch_stage)


def test_forwards_in_flight_backwards_in_any_order_and_dropped_futures_free_residuals() -> None:
    gate = Gate()
    module = WrappedJaxFunction(gate, _params())
    engine = module.backend.engine  # type: ignore[attr-defined]
    xs = [torch.randn(4, 3) for _ in range(4)]
    futures = [module.submit(x) for x in xs]
    assert gate.entered.wait(GATE_LIMIT_S) and not any(f.done() for f in futures)
    gate.open()
    outs = [f.result(timeout=GATE_LIMIT_S) for f in futures[:3]]
    concurrent.futures.wait(futures, timeout=GATE_LIMIT_S)
    assert engine.live_residuals == 4
    for index in (2, 0, 1):
        outs[index].sum().backward()
    assert engine.live_residuals == 1  # the unread fourth future still holds its graph
    del futures, outs
    gc.collect()
    assert engine.live_residuals == 0
    grads = {n: p.grad.clone() for n, p in module.named_parameters()}
    module.zero_grad()
    for x in xs[:3]:
        module(x).sum().backward()
    for name, p in module.named_parameters():
        torch.testing.assert_close(grads[name], p.grad)


def test_errors_surface_from_result_with_the_synchronous_type() -> None:
    def not_a_pair(params: jax.Array, x: jax.Array) -> jax.Array:
        return params * x

    module = WrappedJaxFunction(not_a_pair, jnp.ones(3), has_aux=True)
    with pytest.raises(TypeError, match="has_aux=True") as sync:
        module(torch.ones(3))
    with pytest.raises(TypeError, match="has_aux=True") as got:
        module.submit(torch.ones(3)).result(timeout=GATE_LIMIT_S)
    assert type(got.value) is type(sync.value)


def test_torch_thread_state_is_carried_into_the_call() -> None:
    module = WrappedJaxFunction(lambda p, x: p * x, jnp.ones(3))
    seen: list[tuple[bool, bool, bool, torch.dtype]] = []
    module.register_forward_pre_hook(lambda *_: seen.append((
        torch.is_grad_enabled(), torch.is_inference_mode_enabled(),
        torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))))
    x = torch.ones(3)
    with torch.no_grad():
        assert module.submit(x).result(timeout=GATE_LIMIT_S).grad_fn is None
    with torch.inference_mode():
        assert module.submit(x).result(timeout=GATE_LIMIT_S).is_inference()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        module.submit(x).result(timeout=GATE_LIMIT_S)
    assert module.submit(x).result(timeout=GATE_LIMIT_S).grad_fn is not None
    assert seen[0][:3] == (False, False, False)
    assert seen[1][:2] == (False, True)
    assert seen[2][2:] == (True, torch.bfloat16)
    assert seen[3][:3] == (True, False, False)


def test_in_place_writes_while_in_flight_fail_the_call() -> None:
    gate = Gate()
    module = WrappedJaxFunction(gate, _params())
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    future = module.submit(torch.randn(4, 3))
    assert gate.entered.wait(GATE_LIMIT_S)
    for p in module.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()  # before the result was read: the call saw old or new values
    gate.open()
    with pytest.raises(RuntimeError, match="modified in place while the call was in flight"):
        future.result(timeout=GATE_LIMIT_S)


def test_forward_async_and_inproc_functions() -> None:
    gate = Gate()
    module = WrappedJaxFunction(gate, _params())

    async def main() -> torch.Tensor:
        task = asyncio.ensure_future(module.forward_async(torch.ones(4, 3)))
        while not gate.entered.is_set():
            await asyncio.sleep(0.01)
        assert not task.done()
        gate.open()
        return await task

    out = asyncio.run(main())
    torch.testing.assert_close(out, module(torch.ones(4, 3)))
    with connect("inproc", functions={"add_one": lambda x: x + 1}) as w:
        fn = w.function("add_one")
        torch.testing.assert_close(fn.submit(torch.zeros(2)).result(timeout=GATE_LIMIT_S),
                                   torch.ones(2))
        torch.testing.assert_close(asyncio.run(fn.call_async(torch.zeros(2))), torch.ones(2))


def test_the_executor_bounds_its_queue_and_refuses_at_once() -> None:
    executor = CallExecutor(max_async_calls=1, max_queued_calls=1)
    release = threading.Event()
    try:
        first = executor.submit(release.wait, (GATE_LIMIT_S,), {})
        second = executor.submit(release.wait, (GATE_LIMIT_S,), {})
        with pytest.raises(CallQueueFullError, match="1 running, 1 queued"):
            executor.submit(release.wait, (GATE_LIMIT_S,), {})
        release.set()
        assert first.result(timeout=GATE_LIMIT_S) and second.result(timeout=GATE_LIMIT_S)
        assert executor.submit(lambda: 3, (), {}).result(timeout=GATE_LIMIT_S) == 3
    finally:
        release.set()
        executor.shutdown()
    with pytest.raises(RuntimeError, match="closed"):
        executor.submit(lambda: 3, (), {})
    with pytest.raises(ValueError, match="max_async_calls"):
        CallExecutor(max_async_calls=0)


def test_inproc_connections_take_their_bounds_from_connect() -> None:
    gate = Gate()
    with connect("inproc", functions={"gated": gate}, max_async_calls=1,
                 max_queued_calls=0) as w:
        fn = w.function("gated")
        module = WrappedJaxFunction(fn, _params())
        first = module.submit(torch.ones(4, 3))  # the module uses the connection's executor
        assert gate.entered.wait(GATE_LIMIT_S)
        with pytest.raises(CallQueueFullError, match="0 queued"):
            fn.submit(_params(), torch.ones(4, 3))
        gate.open()
        torch.testing.assert_close(first.result(timeout=GATE_LIMIT_S),
                                   module(torch.ones(4, 3)))
    with pytest.raises(ValueError, match="max_queued_calls"):
        connect("inproc", functions={"gated": gate}, max_queued_calls=-1)
