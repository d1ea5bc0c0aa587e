"""The call plan and the one backend protocol of ``WrappedJaxFunction`` (torch side).

Imports torch only, never JAX. A *backend* runs the JAX function somewhere: in this process
(``interop_core/_local_backend.py``) or in a worker (``client/_connect.py``). Every backend
gets the same thing: a ``Call`` (how the arguments are built from flat tensors, which leaves
are static) and the flat list of tensors, parameters first; it returns flat outputs with
their structure, and in backward one gradient per tensor.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from ._pytree import LEAF_SPEC, TreeTemplate

__all__ = ["Call", "VjpBackend", "is_tensor", "tensor_args_template"]

_Tensor = torch.Tensor


def is_tensor(value: Any) -> bool:
    return isinstance(value, _Tensor)


def tensor_args_template(cache: dict[int, TreeTemplate], args: tuple,
                         kwargs: dict) -> TreeTemplate | None:
    """The template of ``(args, kwargs)`` when they are positional tensors only (the hot
    path of a call): its structure depends on their number alone, so it is made once per
    number and kept in ``cache``. ``None`` for any other arguments (``Call.of`` then)."""
    if kwargs:
        return None
    for a in args:
        if not isinstance(a, _Tensor):
            return None
    inputs = cache.get(len(args))
    if inputs is None:
        inputs = cache[len(args)] = TreeTemplate.of((args, {}), is_tensor)[0]
    return inputs


class Call:
    """One forward call: how to rebuild ``(params, *args), kwargs`` from the flat tensors.

    ``params`` is the template of the wrapped function's parameters (``None`` for a
    function without parameters); ``inputs`` the template of ``(args, kwargs)``: its slots
    are the tensors, its other leaves static values (part of a backend's compilation key).
    ``out_spec`` and ``aux`` are filled in by the forward pass.
    """

    __slots__ = ("aux", "backend", "has_aux", "inputs", "num_params", "out_spec", "params")

    def __init__(self, backend: VjpBackend, has_aux: bool, params: TreeTemplate | None,
                 inputs: TreeTemplate) -> None:
        self.backend = backend
        self.has_aux = has_aux
        self.params = params
        self.num_params = 0 if params is None else params.num_slots
        self.inputs = inputs
        self.out_spec: Any = LEAF_SPEC  # anything with `.unflatten(leaves)`
        self.aux: Any = None

    @classmethod
    def of(cls, backend: VjpBackend, has_aux: bool, args: tuple, kwargs: dict,
           params: TreeTemplate | None = None) -> tuple[Call, list[torch.Tensor]]:
        """The call of ``(args, kwargs)`` (any pytrees) and its tensors, in leaf order."""
        inputs, tensors = TreeTemplate.of((args, kwargs), is_tensor)
        return cls(backend, has_aux, params, inputs), tensors

    @property
    def key(self) -> tuple[Any, ...]:
        """Structure and static values: with the tensors' layout, a compilation key."""
        return (self.params, self.inputs, self.has_aux)

    def arguments(self, values: Any) -> tuple[tuple, dict]:
        """``(args, kwargs)`` rebuilt from ``values`` (one per tensor of the call, params
        first; any leaf type, e.g. JAX tracers)."""
        num_params = self.num_params
        user_args, kwargs = self.inputs.fill(values[num_params:])
        if self.params is None:
            return tuple(user_args), kwargs
        return (self.params.fill(values[:num_params]), *user_args), kwargs


@runtime_checkable
class VjpBackend(Protocol):
    """Where a wrapped JAX function runs: in this process, or in a JAX worker.

    ``tensors`` holds one torch tensor per slot of ``call`` (parameters first). A backend
    differentiates only the tensors that require grad and are floating point or complex.
    """

    def flat_call(self, call: Call, tensors: list[torch.Tensor]) -> tuple[list, Any, Any]:
        """Run without keeping residuals: ``(output tensors, output structure, aux)``."""
        ...

    def flat_forward(self, call: Call, tensors: list[torch.Tensor]
                     ) -> tuple[list, Any, Any, Any]:
        """Run and keep residuals: ``(output tensors, output structure, aux, handle)``."""
        ...

    def flat_backward(self, handle: Any, cotangents: Any, *, retain: bool) -> list[Any]:
        """Cotangents (one per output tensor) -> one gradient per input tensor (``None``
        where there is none). With ``retain=False`` the residuals may be freed."""
        ...

    def release(self, handle: Any) -> None:
        """The torch graph was freed without (another) backward: drop the residuals.

        Called from a finalizer: must be cheap and must not raise.
        """
        ...
