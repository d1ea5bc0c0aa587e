"""A served function as torch sees it: ``RemoteFunction`` to call, ``RemoteBackend`` to train
through with ``WrappedJaxFunction``."""

from __future__ import annotations

from typing import Any, Protocol

import torch

from .._async import AsyncCallable, CallExecutor
from .._call import Call, tensor_args_template
from .._pytree import TreeTemplate


class Worker(Protocol):
    """What a served function needs of its connection (``_connect.Worker``; a protocol here,
    so that this module does not import the connection's)."""

    address: str

    def call(self, name: str, call: Call, tensors: list[torch.Tensor], *,
             keep_residuals: bool) -> tuple[list, Any, Any, Any]: ...

    def backward(self, handle: Any, cotangents: Any, *, retain: bool) -> list[Any]: ...

    def release(self, handle: Any) -> None: ...

    def call_executor(self) -> CallExecutor: ...


class RemoteBackend:
    """``VjpBackend`` of ``WrappedJaxFunction`` for a function served by a worker: the call
    plan and the flat tensors go to the worker as they are (parameters whose structure the
    wire cannot describe as a flat list: Note [Registered pytree nodes in service mode] in
    ``server/_compiled.py``)."""

    def __init__(self, worker: Worker, name: str) -> None:
        self.worker = worker
        self.name = name

    def flat_call(self, call: Call, tensors: list[torch.Tensor]) -> tuple[list, Any, Any]:
        outputs, out_spec, aux, _ = self.worker.call(self.name, call, tensors,
                                                     keep_residuals=False)
        return outputs, out_spec, aux

    def flat_forward(self, call: Call, tensors: list[torch.Tensor]
                     ) -> tuple[list, Any, Any, Any]:
        return self.worker.call(self.name, call, tensors, keep_residuals=True)

    def flat_backward(self, handle: Any, cotangents: Any, *, retain: bool) -> list[Any]:
        return self.worker.backward(handle, cotangents, retain=retain)

    def release(self, handle: Any) -> None:
        self.worker.release(handle)

    def call_executor(self) -> CallExecutor:
        """Where ``WrappedJaxFunction.submit`` runs calls: the connection's executor."""
        return self.worker.call_executor()


class RemoteFunction(AsyncCallable):
    """A JAX function served by a worker, called with pytrees of torch tensors.

    ``fn.submit(*args)`` starts the same call in the background and returns a
    ``concurrent.futures.Future``; ``await fn.call_async(*args)`` is its asyncio form (in
    the connection's executor: ``connect(max_async_calls=, max_queued_calls=)``).

    Calling it returns new tensors (outputs in shared memory are *shared* with the pool
    until they are garbage-collected; they are never overwritten while alive). Gradients do
    not flow through a plain call: wrap it, ``WrappedJaxFunction(worker.function(name),
    params)``, to train through it (forward and backward then run in the worker).

    Calling it takes the function's arguments as pytrees of torch tensors (leaves that are
    not tensors are sent as static values) and returns its outputs as the same pytree of
    torch tensors; with an input that requires grad under grad mode it runs as
    ``WrappedJaxFunction`` would, without parameters.

    Raises:
        FunctionNotFoundError: The worker serves no function of this name (the message
            lists those it serves).
        InvalidArgumentError: The arguments do not fit the function (arity, dtype, shape).
        ResourceExhaustedError: A worker limit was reached (the message names it).
        RemoteExecutionError: The JAX function raised in the worker (the message names the
            exception's type).
        WorkerUnavailableError: The worker is gone.
        DeadlineExceededError: The call ran past the connection's ``timeout``.
    """

    def __init__(self, worker: Worker, name: str) -> None:
        self.worker = worker
        self.name = name
        self.__name__ = name
        self._backend = RemoteBackend(worker, name)  # stateless: one serves every call
        # templates of tensor-only calls, by their number (`tensor_args_template`): the hot
        # path skips flattening (~7 us a call)
        self._tensor_args: dict[int, TreeTemplate] = {}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        backend = self._backend
        inputs = tensor_args_template(self._tensor_args, args, kwargs)
        if inputs is not None:
            call, tensors = Call(backend, False, None, inputs), list(args)
        else:
            call, tensors = Call.of(backend, False, args, kwargs)
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            from .._wrapped import apply_backend

            return apply_backend(backend, args, kwargs)
        outputs, out_spec, _ = backend.flat_call(call, tensors)
        return out_spec.unflatten(outputs)

    def __torch_jax_interop_backend__(self) -> RemoteBackend:
        return RemoteBackend(self.worker, self.name)

    def _call_executor(self) -> CallExecutor:
        return self.worker.call_executor()

    def __repr__(self) -> str:
        return f"RemoteFunction({self.name!r} on {self.worker.address})"
