"""``connect("inproc", functions=...)``: the client API, with the functions run in-process.

Tensors cross through the zero-copy DLPack core instead of a transport, so switching between
a worker and in-process execution is one string. Part of the bridge (imports torch and JAX,
never the worker): ``client.connect`` imports it only for ``connect("inproc")``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import jax
import torch

from .._async import AsyncCallable, CallExecutor, library_executor
from .._errors import FunctionNotFoundError
from .._targets import FunctionInfo, load_function
from ._convert import jax_to_torch, torch_to_jax


class InprocFunction(AsyncCallable):
    """A JAX function called with torch tensors in this process (memory is shared).

    ``submit`` / ``call_async`` as a worker's function, in the library executor."""

    def __init__(self, name: str, fn: Callable[..., Any], target: str,
                 executor: CallExecutor | None = None) -> None:
        self.executor = executor if executor is not None else library_executor()
        self.name = name
        self.fn = fn
        self.target = target
        self.__name__ = name
        self._jitted = jax.jit(fn)
        self._backend: Any = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled() and any(
            isinstance(t, torch.Tensor) and t.requires_grad
            for t in jax.tree_util.tree_leaves((args, kwargs))
        ):
            from .._wrapped import apply_backend

            return apply_backend(self.__torch_jax_interop_backend__(), args, kwargs)
        jax_args, jax_kwargs = torch_to_jax((args, kwargs))
        return jax_to_torch(self._jitted(*jax_args, **jax_kwargs))

    def __torch_jax_interop_backend__(self) -> Any:
        if self._backend is None:
            from ._local_backend import LocalJaxBackend

            self._backend = LocalJaxBackend(self.fn, self.executor)
        return self._backend

    def _call_executor(self) -> CallExecutor:
        return self.executor

    def __repr__(self) -> str:
        return f"InprocFunction({self.name!r})"


class InprocWorker:
    """Same interface as ``Worker``, running the functions in this process."""

    transport = "inproc"
    address = "inproc"

    def __init__(self, functions: Mapping[str, Callable[..., Any] | str],
                 executor: CallExecutor | None = None) -> None:
        # asynchronous calls: the connection's own executor when connect() set bounds
        self._executor = executor
        self._functions: dict[str, InprocFunction] = {}
        for name, fn in functions.items():
            target = ""
            if isinstance(fn, str):
                _, fn, target = load_function(f"{name}={fn}")
            self._functions[name] = InprocFunction(name, fn, target, executor)

    def functions(self) -> list[FunctionInfo]:
        out = []
        for name, f in sorted(self._functions.items()):
            try:
                signature = str(inspect.signature(f.fn))
            except (TypeError, ValueError):
                signature = "(...)"
            doc = (inspect.getdoc(f.fn) or "").split("\n\n")[0]
            out.append(FunctionInfo(name, signature, doc, f.target))
        return out

    def function(self, name: str) -> InprocFunction:
        try:
            return self._functions[name]
        except KeyError:
            raise FunctionNotFoundError(
                f"unknown function `{name}`; in-process functions: "
                f"{', '.join(sorted(self._functions)) or 'none'}"
            ) from None

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown()

    def __enter__(self) -> InprocWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
