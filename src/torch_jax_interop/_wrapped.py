"""``WrappedJaxFunction``: a JAX function with learnable parameters, as a ``torch.nn.Module``.

This module imports torch only, never JAX: a torch process without JAX wraps a remote
function (``WrappedJaxFunction(worker.function("mlp"), params)``) with the same class. The
JAX side is a *backend* (the flat ``VjpBackend`` protocol of ``_call.py``): ``LocalJaxBackend``
runs the function in this process; a remote function supplies its own backend through a
``__torch_jax_interop_backend__()`` method.

# Note [Residuals and the torch graph]

With gradients on, the forward pass runs ``jax.vjp`` and the backend keeps the residuals
under a handle. The handle lives in a ``_Residuals`` object stored on the autograd node's
``ctx``, so it lives exactly as long as the torch graph does:

* ``backward`` without ``retain_graph`` asks the backend to free the residuals
  (``retain=False``); with ``retain_graph=True`` they stay for the next backward;
* a graph dropped without (another) backward frees the ``ctx``, whose ``_Residuals``
  finalizer calls ``backend.release(handle)`` (cheap: a remote backend only queues the id);
* under ``torch.no_grad()``, or when no parameter or input requires grad, the backend runs
  the plain function and keeps nothing.

# Note [state_dict keys of torch-jax-interop 0.0.8]

0.0.8 kept the parameters in a ``torch.nn.ParameterList`` of ``jax.tree.flatten(jax_params)``,
so its ``state_dict`` keys are ``params.0``, ``params.1``, ... in JAX's leaf order; ours are
the pytree paths (``params.Dense_0.kernel``), also in JAX's leaf order (``_pytree``'s
``flatten`` follows ``jax.tree_util``, leaves that are not arrays included). A load
pre-hook (``_load_seed_state_dict``) therefore renames ``params.<i>`` to the path of leaf
``i``, when every ``params.`` key of the incoming dict is an integer and at least one of
them is not a key of ours (a single array or a flat list of arrays has the same keys in
both layouts, which need no renaming). It checks first that the number of leaves and each
shape agree, and raises otherwise: a leaf index of a different tree names a different leaf,
and loading by it would silently put values in the wrong places. 0.0.8 registered only
tensors (a ``ParameterList`` keeps other leaves as plain attributes), so an index that
names a leaf that is not an array here is an error too.
"""

from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import torch

from ._async import CallExecutor, library_executor
from ._call import Call, VjpBackend, tensor_args_template
from ._compat._torch import keep_graph, run_outside_dynamo
from ._errors import DoubleBackwardError, UnsupportedTensorError
from ._pytree import LEAF, NONE, TreeSpec, TreeTemplate, is_array_leaf

__all__ = ["VjpBackend", "WrappedJaxFunction", "WrappedJaxScalarFunction"]

_Tensor = torch.Tensor
_is_grad_enabled = torch.is_grad_enabled
_keep_graph: Callable[[], bool] = keep_graph


def _executor_of(backend: VjpBackend) -> CallExecutor:
    """Where ``backend``'s asynchronous calls run: its own executor (a connection's) or
    the library executor (JAX in this process)."""
    own = getattr(backend, "call_executor", None)
    return own() if own is not None else library_executor()


def _select_backend(jax_function: Any) -> VjpBackend:
    provider = getattr(jax_function, "__torch_jax_interop_backend__", None)
    if provider is not None:
        return provider()
    # imported here: the local backend is the bridge (it imports JAX), this module is not
    from .interop_core._local_backend import LocalJaxBackend

    return LocalJaxBackend(jax_function)


# ---------------------------------------------------------------------------------------
# Parameters: a pytree of arrays becomes nested modules with readable state_dict keys


class ParameterTree(torch.nn.Module):
    """Holds the wrapped function's parameters; one child module per pytree level.

    Keys come from the pytree paths (dict keys, sequence indices, dataclass fields), so a
    Flax-style ``{"params": {"Dense_0": {"kernel": k}}}`` gives the state_dict key
    ``params.params.Dense_0.kernel``, and a single array gives ``params.0``. ``tree[key]``
    returns a child or a parameter.

    Note [Sharded parameters in library mode]
    ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
    FSDP2 (``fully_shard``) swaps each parameter for a ``DTensor`` shard (``setattr`` on
    the module that holds it), all-gathers the full parameter before forward and frees its
    storage after (``resize_(0)``). When the JAX function runs in this process, JAX reads
    the parameters in place (zero-copy) and keeps some for backward (Note [Residuals that
    are inputs] in ``_engine.py``): it would read freed memory. On CPU the numpy view JAX
    gets makes torch mark the storage not resizable, so FSDP2 failed at the first step;
    through DLPack (GPU) nothing stops the free. So the parameter trees of a backend that
    reads in place refuse a DTensor when it is swapped in, at wrap time. A worker's backend
    copies the parameters on every call: FSDP2 works there (tests/distributed/test_ddp.py).
    """

    _refuses_dtensors = False  # set on the trees of a backend that reads in place

    def __getitem__(self, key: Any) -> Any:
        return getattr(self, _attribute_name(key))

    def __setattr__(self, name: str, value: Any) -> None:
        if self._refuses_dtensors and _is_dtensor(value):
            _refuse_dtensor(name)
        super().__setattr__(name, value)

    def register_parameter(self, name: str, param: torch.nn.Parameter | None) -> None:
        if self._refuses_dtensors and _is_dtensor(param):
            _refuse_dtensor(name)
        super().register_parameter(name, param)


def _is_dtensor(value: Any) -> bool:
    module = sys.modules.get("torch.distributed.tensor")  # none exists before it is imported
    return module is not None and isinstance(value, module.DTensor)


def _refuse_dtensor(name: str) -> None:
    raise UnsupportedTensorError(
        f"cannot make the parameter `{name}` of a WrappedJaxFunction a DTensor (FSDP2's "
        "`fully_shard`, or another torch.distributed.tensor API): its JAX function runs in "
        "this process and reads the parameters in place, keeping some for backward, while "
        "FSDP2 frees and re-allocates their storage around every forward. Serve the "
        "function from a JAX worker (`WrappedJaxFunction(worker.function(name), params)` "
        "copies the parameters on every call, and FSDP2 works), or use "
        "DistributedDataParallel, which leaves the parameters in place."
    )


_BAD_CHARS = re.compile(r"[.\s]")


def _attribute_name(key: Any) -> str:
    name = _BAD_CHARS.sub("_", str(key)) or "_"
    if hasattr(torch.nn.Module, name):  # `training`, `forward`, `to`, ... would clash
        name += "_"
    return name


def _leaf_paths(spec: TreeSpec, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """One path of attribute names per leaf, in ``flatten`` order."""
    if spec.kind == LEAF:
        return [prefix]
    if spec.kind == NONE:
        return []
    paths: list[tuple[str, ...]] = []
    for key, child in zip(spec.child_names(), spec.children, strict=True):
        paths.extend(_leaf_paths(child, (*prefix, _attribute_name(key))))
    return paths


def _as_tensor(leaf: Any, clone: bool) -> torch.Tensor:
    if isinstance(leaf, _Tensor):
        leaf = leaf.detach()
        return leaf.clone() if clone else leaf
    if hasattr(leaf, "__dlpack__") and type(leaf).__module__.startswith(("jax", "jaxlib")):
        from .interop_core._convert import _array_to_torch  # imports jax

        return _array_to_torch(leaf, copy=True if clone else None)
    return torch.as_tensor(leaf).clone()


# ---------------------------------------------------------------------------------------
# The autograd function


class _Residuals:
    """Owns a backend handle; releases it when the torch graph is freed. See the Note."""

    __slots__ = ("backend", "handle")

    def __init__(self, backend: VjpBackend, handle: Any) -> None:
        self.backend = backend
        self.handle = handle

    def __del__(self) -> None:
        handle = self.handle
        if handle is not None:
            self.handle = None
            try:
                self.backend.release(handle)
            except Exception:  # pragma: no cover - never raise from a finalizer
                pass


class _JaxFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, call: Call, *tensors: torch.Tensor) -> tuple[Any, ...]:
        backend = call.backend
        flat, call.out_spec, aux, handle = backend.flat_forward(call, list(tensors))
        ctx.call = call
        ctx.residuals = _Residuals(backend, handle)
        # for create_graph only (see backward); a plain reference, not a saved tensor
        for t in tensors:
            if t.requires_grad:
                ctx.anchor = t
                break
        else:
            ctx.anchor = None
        call.aux = aux
        frozen = None
        for t in flat:
            if isinstance(t, _Tensor) and not (t.is_floating_point() or t.is_complex()):
                frozen = [*(frozen or ()), t]
        if frozen:
            ctx.mark_non_differentiable(*frozen)
        return tuple(flat)

    @staticmethod
    def backward(ctx: Any, *cotangents: torch.Tensor) -> tuple[Any, ...]:
        call: Call = ctx.call
        residuals: _Residuals = ctx.residuals
        handle = residuals.handle
        if handle is None:
            raise RuntimeError(
                "Trying to backward through a WrappedJaxFunction a second time, but its "
                "residuals were freed after the first backward. Specify retain_graph=True "
                "on the first backward call if you need to backward twice."
            )
        retain = _keep_graph()
        create_graph = _is_grad_enabled()
        if create_graph:
            with torch.no_grad():
                grads = call.backend.flat_backward(handle, cotangents, retain=retain)
        else:
            grads = call.backend.flat_backward(handle, cotangents, retain=retain)
        if not retain:
            residuals.handle = None
        if create_graph:
            # The gradients are constants to torch; tie them to the inputs so that
            # differentiating them again reaches a node that says why it cannot work.
            anchor = ctx.anchor
            if anchor is not None:
                grads = [None if g is None else _NoSecondDerivative.apply(g, anchor) for g in grads]
        return (None, *grads)


class _NoSecondDerivative(torch.autograd.Function):
    """Identity whose backward raises: marks first-order gradients of a wrapped function."""

    @staticmethod
    def forward(ctx: Any, grad: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        return grad.clone()

    @staticmethod
    def backward(ctx: Any, _: torch.Tensor) -> Any:
        raise DoubleBackwardError(
            "WrappedJaxFunction supports first derivatives only: the gradient it returns "
            "cannot be differentiated again (double backward, e.g. a gradient penalty "
            "through `create_graph=True`). Compute higher derivatives inside the JAX "
            "function (jax.grad / jax.hessian) and return them as outputs."
        )


# ---------------------------------------------------------------------------------------
# The module


class WrappedJaxFunction(torch.nn.Module):
    """A JAX function ``f(params, *args, **kwargs)`` as a module whose parameters are torch's.

    ``jax_params`` (a single array, or a pytree of arrays: lists, tuples, dicts, Flax-style
    nested variables, any node type registered with ``jax.tree_util`` such as a Flax
    ``struct.dataclass`` or an Equinox module) becomes torch ``Parameter`` s under
    ``self.params`` with keys from the pytree paths: ``state_dict()`` gives ``params.0`` for
    a single array and readable nested keys (``params.dense.kernel``) for dicts, in JAX's
    leaf order (sorted dict keys; see Note [One pytree policy] in ``_pytree.py``), except
    that torch lists a node's own arrays before its sub-trees. A ``state_dict`` saved by
    torch-jax-interop 0.0.8 (``params.0``, ``params.1``, ... by leaf index) loads too, with
    its leaf count and shapes checked (Note [state_dict keys of torch-jax-interop 0.0.8]). Integer
    leaves become buffers; leaves that are not arrays (an Equinox module's activation
    function) stay constants of the tree.

    Memory: with ``clone_params=False`` (the default) each parameter **shares memory** with
    the JAX array it came from (DLPack), so a torch optimiser's in-place update is visible
    through that array too; pass ``clone_params=True`` to own fresh copies. On every call
    the parameters and tensor arguments reach JAX zero-copy where their layout allows, and
    the outputs share the buffers JAX produced.

    ``forward(*args, **kwargs)`` takes pytrees of tensors (other leaves are passed to JAX
    as static, hashable values) and returns the function's output pytree with every
    floating-point output differentiable. With ``has_aux=True`` the function returns
    ``(output, aux)`` and so does ``forward``; ``aux`` carries no gradient.

    Gradients flow to parameters and to inputs that require grad through a jitted
    ``jax.vjp`` compiled once per input signature. Under ``torch.no_grad()`` (or when
    nothing requires grad) no residuals are kept. Second derivatives raise
    ``DoubleBackwardError``. Two details of the JAX engine (``_engine.py``, used in this
    process and by a worker): a function whose output is one real scalar (a loss) gets its
    gradients in the forward pass's XLA computation, and backward only scales them; inputs
    the backward pass needs are kept by reference (shared memory), like torch's saved
    tensors, so in this process modifying one in place before ``backward()`` raises torch's
    "modified by an inplace operation" error.

    Args:
        jax_function: ``f(params, *args, **kwargs)``, a JAX function, or a worker's function
            (``worker.function(name)`` from ``torch_jax_interop.client.connect``), which then
            runs forward and backward in the worker.
        jax_params: The parameters: a JAX array, a torch tensor, or a pytree of them.
        has_aux: The function returns ``(output, aux)``; ``aux`` is returned as is, without
            gradients.
        clone_params: Copy the parameters instead of sharing their memory.

    Raises:
        DoubleBackwardError: (on a second derivative) backward of backward is not supported.
        RuntimeError: (in backward) a second backward without ``retain_graph=True``; (in
            ``load_state_dict``) a 0.0.8 ``state_dict`` saved for other parameters.
    """

    def __init__(
        self,
        jax_function: Callable[..., Any],
        jax_params: Any,
        has_aux: bool = False,
        clone_params: bool = False,
    ) -> None:
        super().__init__()
        self.jax_function = jax_function
        self.has_aux = has_aux
        self.backend: VjpBackend = _select_backend(jax_function)
        template, leaves = TreeTemplate.of(jax_params, is_array_leaf)
        spec = template.spec
        paths = _leaf_paths(spec) if spec.kind != LEAF else [("0",)]
        self.params = ParameterTree()
        slots: list[tuple[dict[str, Any], str]] = []
        # per leaf of `jax_params` (JAX's order): its state_dict key below `params.` and
        # its slot, or None for a leaf that is not an array (Note [state_dict keys of 0.0.8])
        leaf_keys: list[tuple[str, int] | None] = [None] * len(paths)
        for position, leaf in zip(template.slots, leaves, strict=True):
            path = paths[position]
            leaf_keys[position] = (".".join(path), len(slots))
            tensor = _as_tensor(leaf, clone_params)
            owner = self.params
            for name in path[:-1]:
                child = owner._modules.get(name)
                if child is None:
                    child = ParameterTree()
                    owner.register_module(name, child)
                # a sub-module registered as a ParameterTree just above (or found as one)
                owner = child  # type: ignore[assignment]
            name = path[-1]
            if tensor.is_floating_point() or tensor.is_complex():
                owner.register_parameter(name, torch.nn.Parameter(tensor))
                slots.append((owner._parameters, name))
            else:
                owner.register_buffer(name, tensor)
                slots.append((owner._buffers, name))
        # The dicts are stable: `.to()`, `load_state_dict` and optimisers update their
        # entries (or the tensors in place), so reading through them sees every update.
        self._slots = slots
        if getattr(self.backend, "reads_in_place", False):  # Note [Sharded parameters in ...]
            for tree in self.params.modules():
                if isinstance(tree, ParameterTree):
                    tree._refuses_dtensors = True
        self._params = template
        self._tensor_args: dict[int, TreeTemplate] = {}
        self._leaf_keys = tuple(leaf_keys)
        self.register_load_state_dict_pre_hook(_load_seed_state_dict)

    def parameter_tree(self) -> Any:
        """The current parameters, as a pytree shaped like ``jax_params`` (torch tensors;
        leaves that are not arrays, such as an Equinox module's functions, as given)."""
        return self._params.fill([d[name] for d, name in self._slots])

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            return _run_outside_dynamo(self, args, kwargs)
        return self._run(args, kwargs)

    def _run(self, args: tuple, kwargs: dict) -> Any:
        # The hot path of library mode: loops rather than generators, one pass each.
        tensors = [d[name] for d, name in self._slots]
        inputs = tensor_args_template(self._tensor_args, args, kwargs)
        if inputs is not None:
            tensors += args
            call = Call(self.backend, self.has_aux, self._params, inputs)
        else:
            call, user_tensors = Call.of(self.backend, self.has_aux, args, kwargs, self._params)
            tensors += user_tensors
        needs_grad = False
        if _is_grad_enabled():
            for t in tensors:
                if t.requires_grad:
                    needs_grad = True
                    break
        if not needs_grad:
            flat, treedef, aux = self.backend.flat_call(call, tensors)
            outputs = treedef.unflatten(flat)
            return (outputs, aux) if self.has_aux else outputs

        flat = _JaxFunction.apply(call, *tensors)
        outputs = call.out_spec.unflatten(flat)
        return (outputs, call.aux) if self.has_aux else outputs

    def submit(self, *args: Any, **kwargs: Any) -> Future[Any]:
        """Start ``self(*args, **kwargs)`` in the background; return its
        ``concurrent.futures.Future`` at once, so that torch work overlaps JAX's.

        ``future.result()`` is what the call returns (with gradients on, outputs in the
        autograd graph: ``fut.result().sum().backward()`` trains the parameters) or raises
        the call's exception, of the same type. The call runs under this thread's grad
        mode, inference mode and autocast state, in a thread of the function's executor:
        the connection's (``connect(max_async_calls=, max_queued_calls=)``) for a
        worker's function, the process's library executor for a JAX function here. Its
        inputs and the parameters must not be modified in place until it ends (checked:
        ``RuntimeError``); read the result before ``optimizer.step()``. See
        Note [Asynchronous calls and autograd] in ``_async.py`` (ordering, lifetimes,
        cancellation).

        Memory: as ``forward`` (outputs share the buffers JAX or the transport produced).

        Raises:
            CallQueueFullError: too many calls pending on the executor.
        """
        watch = [*(d[name] for d, name in self._slots),
                 *Call.of(self.backend, self.has_aux, args, kwargs)[1]]
        return _executor_of(self.backend).submit(self, args, kwargs, watch=watch)

    async def forward_async(self, *args: Any, **kwargs: Any) -> Any:
        """``await module.forward_async(x)``: ``submit`` for asyncio (the call starts when
        the coroutine first runs; cancelling the task cancels a call not yet started)."""
        return await asyncio.wrap_future(self.submit(*args, **kwargs))

    def extra_repr(self) -> str:
        name = getattr(self.jax_function, "__qualname__", None) or repr(self.jax_function)
        return f"jax_function={name}, has_aux={self.has_aux}"


_SEED_INDEX = re.compile(r"[0-9]+")


def _load_seed_state_dict(module: WrappedJaxFunction, state_dict: dict[str, Any], prefix: str,
                          *_: Any) -> None:
    """Load pre-hook: rename 0.0.8's ``params.<i>`` keys to ours, after checking that they
    fit. See Note [state_dict keys of torch-jax-interop 0.0.8]."""
    head = prefix + "params."
    found = {key[len(head):]: key for key in state_dict if key.startswith(head)}
    leaf_keys = module._leaf_keys
    ours = {entry[0] for entry in leaf_keys if entry is not None}
    if (not found or not all(_SEED_INDEX.fullmatch(index) for index in found)
            or found.keys() <= ours):
        return
    layout = f"torch-jax-interop 0.0.8's layout (`{head}0`, `{head}1`, ... in JAX's leaf order)"
    if len(found) != len(ours):
        raise RuntimeError(
            f"the state_dict has {len(found)} parameter(s) in {layout}, but this "
            f"WrappedJaxFunction's parameters have {len(ours)} array leaves "
            f"(`{head}{next(iter(sorted(ours)), '')}`, ...): it was saved for other "
            "parameters. Build the module with `jax_params` of the same structure as when "
            "it was saved (compare `jax.tree_util.tree_structure`)."
        )
    renamed = {}
    for index, key in sorted(found.items(), key=lambda item: int(item[0])):
        position = int(index)
        entry = leaf_keys[position] if position < len(leaf_keys) else None
        if entry is None:
            what = ("is not an array" if position < len(leaf_keys)
                    else f"does not exist (there are {len(leaf_keys)} leaves)")
            raise RuntimeError(
                f"`{key}` in {layout} names leaf {position}, which {what} in this "
                "WrappedJaxFunction's parameters: the state_dict was saved for other "
                "parameters. Build the module with `jax_params` of the same structure."
            )
        target, slot = entry
        parameters, name = module._slots[slot]
        expected, value = tuple(parameters[name].shape), state_dict[key]
        if tuple(value.shape) != expected:
            raise RuntimeError(
                f"`{key}` in {layout} is leaf {position}, which is `{head}{target}` here: "
                f"shape {tuple(value.shape)} in the state_dict, {expected} in this module. "
                "The state_dict was saved for other parameters: build the module with "
                "`jax_params` of the same structure and shapes."
            )
        renamed[key] = head + target
    for old, new in renamed.items():
        state_dict[new] = state_dict.pop(old)


class WrappedJaxScalarFunction(WrappedJaxFunction):
    """A JAX function that returns one real scalar (a loss), as a ``torch.nn.Module``.

    The class of torch-jax-interop 0.0.8 with the same constructor, and its default
    ``has_aux=True``: the function returns ``(loss, aux)`` and so does ``forward``; with
    ``has_aux=False`` it returns the loss alone and so does ``forward``. The gradients are
    computed in the forward pass, as ``jax.value_and_grad`` would, in the same XLA
    computation, and ``backward()`` only scales them by the incoming gradient (so
    ``(2 * loss).backward()`` is right too). ``WrappedJaxFunction`` does the same for every
    function whose output is one real scalar; this class adds the check that it is:
    ``TypeError`` for any other output, in this process and with a worker's function.

    Memory and parameters: as ``WrappedJaxFunction`` (parameters **share memory** with
    ``jax_params`` unless ``clone_params=True``).

    Args:
        jax_function: ``f(params, *args, **kwargs)`` returning a real scalar, or
            ``(scalar, aux)`` with ``has_aux=True``; a JAX function or a worker's function.
        jax_params: The parameters: a JAX array, a torch tensor, or a pytree of them.
        has_aux: The function returns ``(loss, aux)`` (the default, as in 0.0.8).
        clone_params: Copy the parameters instead of sharing their memory.

    Raises:
        TypeError: (on a call) the output is not a 0-d floating-point tensor, or with
            ``has_aux=True`` the function does not return a pair.
    """

    def __init__(
        self,
        jax_function: Callable[..., Any],
        jax_params: Any,
        has_aux: bool = True,
        clone_params: bool = False,
    ) -> None:
        super().__init__(jax_function, jax_params, has_aux=has_aux, clone_params=clone_params)

    def _run(self, args: tuple, kwargs: dict) -> Any:
        try:
            result = super()._run(args, kwargs)
        except TypeError as error:
            # the engine's `split_aux` names has_aux=True when the result is not a pair
            if self.has_aux and "has_aux=True" in str(error):
                raise TypeError(
                    f"{error} WrappedJaxScalarFunction defaults to has_aux=True, as in "
                    "torch-jax-interop 0.0.8: pass has_aux=False for a function that returns "
                    "the loss alone."
                ) from None
            raise
        loss = result[0] if self.has_aux else result
        if not (isinstance(loss, _Tensor) and loss.dim() == 0 and loss.is_floating_point()):
            got = (f"a {tuple(loss.shape)} {loss.dtype} tensor" if isinstance(loss, _Tensor)
                   else f"a `{type(loss).__name__}`")
            name = getattr(self.jax_function, "__qualname__", None) or repr(self.jax_function)
            returns = "`(loss, aux)`" if self.has_aux else "the loss alone (has_aux=False)"
            raise TypeError(
                "WrappedJaxScalarFunction needs a function whose output is one real "
                f"floating-point scalar (shape `()`), returning {returns}; `{name}` gave "
                f"{got}. Reduce it in JAX (`jnp.mean`, `jnp.sum`), or use "
                "WrappedJaxFunction, which takes any output."
            )
        return result


def _run_outside_dynamo(module: WrappedJaxFunction, args: tuple, kwargs: dict) -> Any:
    return module._run(args, kwargs)


# torch.compile: dynamo must not trace into JAX; it graph-breaks around this call instead.
_run_outside_dynamo = run_outside_dynamo(_run_outside_dynamo)


def apply_backend(backend: VjpBackend, args: tuple, kwargs: dict, *,
                  has_aux: bool = False) -> Any:
    """Call ``f(*args, **kwargs)`` through ``backend`` with torch autograd: gradients flow to
    every input tensor that requires grad (the function has no parameters of its own).

    What ``worker.function(name)(x)`` does when ``x`` requires grad.
    """
    call, tensors = Call.of(backend, has_aux, args, kwargs)
    flat = _JaxFunction.apply(call, *tensors)
    outputs = call.out_spec.unflatten(flat)
    return (outputs, call.aux) if has_aux else outputs
