"""Zero-copy conversion between torch tensors and JAX arrays through DLPack.

# Note [Memory sharing and copies]

``torch_to_jax`` and ``jax_to_torch`` return a value that *shares memory* with the input
whenever the layout allows it: the JAX array reads the torch tensor's storage, and the torch
tensor reads the JAX array's buffer. Consequences, each pinned down by a test:

* an in-place write on the torch side (``t.add_(1)``) is visible through the JAX array, even
  though JAX treats arrays as immutable. Write to a converted value only if you own both
  views, or convert with ``copy=True``;
* the storage stays alive as long as either view does (the DLPack capsule holds a reference,
  also when ``t.set_(other)`` points the tensor at other memory, and ``a.delete()`` on a JAX
  array after ``jax_to_torch(a)`` leaves the tensor valid);
* changing the *storage itself* in place frees the memory the other view reads: after
  ``torch_to_jax(t)``, never call ``t.resize_()``, ``t.untyped_storage().resize_()`` or
  ``t.share_memory_()`` while the JAX array is alive (torch has no way to pin a storage's
  size, so this cannot be guarded; the same holds for raw DLPack). Convert with
  ``copy=True`` when the tensor will be resized.

A copy is made only when it is forced, and ``copy=False`` turns each such case into a
``CopyRequiredError`` instead:

* a layout JAX cannot import: steps (``x[:, ::2]``), expanded (stride 0) dimensions, or a data
  pointer that is not 64-byte aligned (``t[1:]``); transposed / permuted tensors import
  zero-copy;
* a tensor with its conjugate or negative bit set (DLPack has no such bit);
* a 64-bit tensor while JAX's x64 mode is off (see Note [64-bit values with x64 off]);
* a different ``device=``.

``copy=True`` always returns fresh memory (``jax.dlpack.from_dlpack(t, copy=True)`` does not
copy on jax 0.10.2 CPU, so the copy is made on the torch side before the import).

# Note [64-bit values with x64 off]

While ``jax_enable_x64`` is off, JAX computes in 32 bits and ``jax.dlpack`` would silently
truncate. ``torch_to_jax`` converts float64 / int64 / uint64 / complex128 tensors to the
32-bit type JAX would use (a copy). Integers are range-checked first: a value that does not
fit raises ``IntegerOverflowError`` (an ``OverflowError``) instead of wrapping around. Floats
lose precision as ``jnp.asarray`` would. Turn x64 on (``jax.config.update("jax_enable_x64",
True)``) for bit-exact 64-bit round trips.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar, overload

import jax
import torch

from .._compat._jax import ARRAY_TYPE, DLPackFastPath, is_single_cpu_buffer
from .._compat._torch import from_dlpack_capsule, to_dlpack_capsule
from .._dtypes_jax import x64_enabled as x64_enabled
from .._errors import CopyRequiredError, IntegerOverflowError, UnsupportedTensorError
from .._layout import ALIGNMENT
from .._pytree import tree_map
from ._dtype_map import SUPPORTED_LIST, TORCH_NARROW, TORCH_TO_NAME, torch_dtype_info

_Tensor = torch.Tensor
_STRIDED = torch.strided
_SUPPORTED_TORCH = frozenset(TORCH_TO_NAME)
# The fast path takes only supported dtypes that need no x64 decision: sub-byte and other
# unsupported dtypes (torch.int4, float8_e8m0fnu, ...) must reach the checked path's error.
_FAST_TORCH_DTYPES = _SUPPORTED_TORCH - frozenset(TORCH_NARROW)
_ALIGN_MASK = ALIGNMENT - 1
# Which private DLPack entry points to use: Note [Private APIs] in torch_jax_interop._compat.
_FastPaths = DLPackFastPath


def _import_lowlevel(t: torch.Tensor) -> jax.Array:
    """Zero-copy import of a CPU tensor through the probed private entry point."""
    # None unless the probe found the entry point; callers take this path only after it did
    return _FastPaths.import_capsule(to_dlpack_capsule(t))  # type: ignore[misc]


def _export_lowlevel(a: Any) -> torch.Tensor:
    """Zero-copy export of a single-buffer CPU array through the probed private entry point."""
    # None unless the probe found the entry point; callers take this path only after it did
    return from_dlpack_capsule(_FastPaths.export_capsule(a))  # type: ignore[misc]


# ---------------------------------------------------------------------------------------
# torch -> JAX


def _tensor_to_jax(t: torch.Tensor, copy: bool | None = None, device: Any = None) -> jax.Array:
    """One tensor to one array. Shares memory unless a copy is forced or asked for."""
    if (
        copy is None
        and device is None
        and t.layout is _STRIDED  # first: sparse tensors raise on is_contiguous()
        and t.is_cpu
        and t.dtype in _FAST_TORCH_DTYPES
        and (t.dtype is not torch.bool or not _odd_bool_bytes(t))  # Note [Bool bytes]
        and not t.requires_grad
        and t.is_contiguous()
        and not (t.data_ptr() & _ALIGN_MASK)
        and not t.is_conj()
        and not t.is_neg()
        and _FastPaths.import_capsule is not None
    ):
        try:
            return _import_lowlevel(t)
        except Exception:
            pass  # nested tensors (strided layout, no sizes): the checked path says why
    return _tensor_to_jax_checked(t, copy, device)


def _tensor_to_jax_checked(t: torch.Tensor, copy: bool | None, device: Any) -> jax.Array:
    if not _FastPaths.probed:
        _FastPaths.probe()
        return _tensor_to_jax(t, copy, device)
    _check_tensor_supported(t)
    if t.requires_grad:
        t = t.detach()
    copied = False

    narrow = TORCH_NARROW.get(t.dtype)
    if narrow is not None and not x64_enabled():
        if copy is False:
            raise CopyRequiredError(
                f"`{t.dtype}` needs a copy to become `{narrow}` because JAX's x64 mode is off, "
                "but copy=False. Enable x64 (jax.config.update('jax_enable_x64', True)) for "
                "a zero-copy 64-bit import, or pass copy=None."
            )
        _check_fits(t, narrow)
        t = t.to(narrow, memory_format=torch.contiguous_format)
        copied = True

    if t.dtype is torch.bool and _odd_bool_bytes(t):
        # Note [Bool bytes]: torch reads any non-zero byte as True, JAX's kernels compute with
        # the byte itself (`True + 1` is 3, `sum` counts 2 twice), so the two frameworks would
        # disagree on the same memory. Bytes other than 0/1 (made with `t.view(torch.uint8)`
        # or by foreign code) are normalised on a copy; the check is one pass over the bytes.
        if copy is False:
            raise CopyRequiredError(
                "the bool tensor holds bytes other than 0 and 1, which JAX would not read as "
                "True, so it must be normalised on a copy, but copy=False. Pass copy=None, or "
                "normalise it first: `t = t.view(torch.uint8) != 0`."
            )
        t = t.view(torch.uint8) != 0
        copied = True

    if t.is_conj() or t.is_neg():
        if copy is False:
            raise CopyRequiredError(
                "the tensor has its conjugate or negative bit set, which DLPack cannot "
                "express, so it must be copied, but copy=False. Call `.resolve_conj()` / "
                "`.resolve_neg()` first, or pass copy=None."
            )
        t = t.resolve_conj().resolve_neg().contiguous()
        copied = True

    if copy and not copied:
        t = t.clone(memory_format=torch.contiguous_format)
        copied = True

    if t.is_cpu and t.numel() and t.data_ptr() & _ALIGN_MASK:
        if copy is False:
            raise CopyRequiredError(
                f"the tensor's data pointer is not {ALIGNMENT}-byte aligned (storage offset "
                f"{t.storage_offset()}), and JAX on CPU can only import aligned buffers "
                "without a copy, but copy=False. Pass copy=None, or slice at a multiple of "
                f"{ALIGNMENT} bytes."
            )
        t = t.clone(memory_format=torch.contiguous_format)

    array = _import_any(t, copy)
    return _place(array, device, copy)


def _odd_bool_bytes(t: torch.Tensor) -> bool:
    """Whether a bool tensor holds a byte other than 0 and 1 (one pass: a max reduction)."""
    return bool(t.numel()) and int(t.view(torch.uint8).max()) > 1


def _check_tensor_supported(t: torch.Tensor) -> None:
    if t.layout is not torch.strided:
        raise UnsupportedTensorError(
            f"cannot convert a tensor with layout `{t.layout}`: JAX arrays are dense. "
            "Call `.to_dense()` first (or use jax.experimental.sparse yourself)."
        )
    if t.is_meta:
        raise UnsupportedTensorError(
            "cannot convert a `meta` tensor: it has no data. Materialize it first, e.g. "
            "`module.to_empty(device='cpu')` or `torch.empty_like(t, device='cpu')`."
        )
    if t.is_quantized:
        raise UnsupportedTensorError(
            "cannot convert a quantized tensor; call `.dequantize()` first."
        )
    if t.is_nested:
        raise UnsupportedTensorError(
            "cannot convert a nested tensor; convert its components (`t.unbind()`) instead."
        )
    if t.dtype not in _SUPPORTED_TORCH:
        raise UnsupportedTensorError(
            f"dtype `{t.dtype}` has no JAX counterpart that DLPack can carry. Supported: "
            f"{SUPPORTED_LIST}. Cast first, e.g. `t.to(torch.int8)` for sub-byte integers."
        )
    if t.device.type not in ("cpu", "cuda"):
        raise UnsupportedTensorError(
            f"cannot convert a tensor on device `{t.device}`; only cpu and cuda tensors "
            "are supported. Move it with `.cpu()` first."
        )


def _check_fits(t: torch.Tensor, narrow: torch.dtype) -> None:
    info = torch_dtype_info(t.dtype)
    if info is None or info.kind not in "iu" or t.numel() == 0:
        return
    limits = torch.iinfo(narrow)
    if t.dtype == torch.uint64:
        # torch has no min/max kernels for uint64; its int64 view orders every value below
        # 2**63 correctly and shows the ones above as negative (all of them too large).
        low, high = (int(v) for v in torch.aminmax(t.view(torch.int64)))
        if low < 0:
            low, high = 0, low + 2**64
    else:
        low, high = (int(v) for v in torch.aminmax(t))
    if low < limits.min or high > limits.max:
        bad = low if low < limits.min else high
        raise IntegerOverflowError(
            f"`{t.dtype}` value {bad} does not fit `{narrow}`, the type JAX uses while its "
            "x64 mode is off. Enable x64 (jax.config.update('jax_enable_x64', True) before "
            "creating arrays), or cast explicitly (e.g. `t.to(torch.float32)`) if you accept "
            "the loss."
        )


def _import_any(t: torch.Tensor, copy: bool | None) -> jax.Array:
    """DLPack import of an aligned tensor; a tensor JAX cannot stride is copied (or refused)."""
    try:
        if t.is_cpu and _FastPaths.import_capsule is not None:
            return _import_lowlevel(t)
        return _import_public(t)
    except Exception as error:  # jaxlib raises JaxRuntimeError: UNIMPLEMENTED for strides
        if "striding" not in str(error) and "stride" not in str(error):
            raise
        if copy is False:
            raise CopyRequiredError(
                f"JAX cannot import strides {tuple(t.stride())} for shape {tuple(t.shape)} "
                "(steps or expanded dims) without a copy, but copy=False. Call "
                "`.contiguous()` first, or pass copy=None."
            ) from None
        t = t.contiguous()
        if t.is_cpu and _FastPaths.import_capsule is not None:
            return _import_lowlevel(t)
        return _import_public(t)


def _import_public(t: torch.Tensor) -> jax.Array:
    # The public path synchronises torch's current CUDA stream with JAX's (DLPack `stream=`).
    # An alias, not `t`: `t.set_()` must not free what the array reads (`to_dlpack_capsule`).
    return jax.dlpack.from_dlpack(t.detach())


def _place(array: jax.Array, device: Any, copy: bool | None) -> jax.Array:
    if device is None:
        return array
    target = resolve_jax_device(device)
    if target in array.devices():
        return array
    if copy is False:
        raise CopyRequiredError(
            f"moving the array to `{target}` needs a copy, but copy=False. Pass copy=None."
        )
    return jax.device_put(array, target)


def resolve_jax_device(device: Any) -> Any:
    """A jax.Device from a jax.Device, a torch.device, or a string like 'cpu' / 'cuda:1'."""
    if isinstance(device, jax.Device):
        return device
    if isinstance(device, torch.device):
        kind, index = device.type, device.index or 0
    elif isinstance(device, str):
        kind, _, idx = device.partition(":")
        index = int(idx) if idx else 0
    else:
        raise TypeError(f"`device` must be a jax.Device, torch.device or str, got {device!r}")
    platform = {"cuda": "gpu", "gpu": "gpu", "rocm": "gpu", "cpu": "cpu"}.get(kind)
    if platform is None:
        raise ValueError(f"unknown device kind `{kind}`; use 'cpu', 'cuda:N' or a jax.Device")
    try:
        candidates = jax.local_devices(backend=platform)
    except RuntimeError:
        raise ValueError(
            f"cannot place the array on `{device}`: JAX has no {platform} backend here "
            f"(devices: {jax.devices()}). Install a jax with {platform} support, or pass "
            "device=None."
        ) from None
    for candidate in candidates:
        hardware_id = getattr(candidate, "local_hardware_id", None)
        if (hardware_id if hardware_id is not None else candidate.id) == index:
            return candidate
    raise ValueError(f"JAX has no {platform} device with local index {index}")


def resolve_torch_device(device: Any) -> torch.device:
    """A torch.device from a torch.device, a string, or a jax.Device (JAX gpu N -> cuda:N)."""
    if isinstance(device, jax.Device):
        if device.platform == "cpu":
            return torch.device("cpu")
        if device.platform in ("gpu", "cuda", "rocm"):
            hardware_id = getattr(device, "local_hardware_id", None)
            return torch.device("cuda", hardware_id if hardware_id is not None else device.id)
        raise ValueError(f"torch has no counterpart of the JAX device `{device}`")
    if isinstance(device, (torch.device, str)):
        return torch.device(device)
    raise TypeError(f"`device` must be a torch.device, jax.Device or str, got {device!r}")


def _same_torch_device(a: torch.device, b: torch.device) -> bool:
    # torch.device("cpu:0") != torch.device("cpu"), yet both name the one CPU.
    if a.type != b.type:
        return False
    if a.type == "cpu":
        return True
    index = a.index
    if index is None and a.type == "cuda":  # "cuda" means torch's current device
        index = torch.cuda.current_device()
    return index == b.index


# ---------------------------------------------------------------------------------------
# JAX -> torch


def _array_to_torch(a: Any, copy: bool | None = None, device: Any = None) -> torch.Tensor:
    """One array to one tensor. Shares memory unless a copy is forced or asked for."""
    if (copy is None and device is None and type(a) is ARRAY_TYPE
            and _FastPaths.export_capsule is not None):
        try:
            if is_single_cpu_buffer(a):
                tensor = _export_lowlevel(a)
                if tensor.dtype in _SUPPORTED_TORCH:
                    return tensor
        except Exception:
            pass  # the checked path below says what is wrong
    return _array_to_torch_checked(a, copy, device)


def _array_to_torch_checked(a: Any, copy: bool | None, device: Any) -> torch.Tensor:
    if not _FastPaths.probed:
        _FastPaths.probe()
        return _array_to_torch(a, copy, device)
    if isinstance(a, jax.core.Tracer):
        raise UnsupportedTensorError(
            f"cannot convert a traced value ({a.aval}) to torch: inside jax.jit / jax.grad / "
            "jax.vmap there is no data yet. To call torch code from traced JAX code, wrap "
            "the torch module with `torch_module_to_jax`."
        )
    if a.is_deleted():
        raise UnsupportedTensorError(
            "the JAX array has been deleted (donated to a jitted call, or `.delete()`d); "
            "convert the array before donating it, or convert the jitted call's result."
        )
    if len(a.sharding.device_set) > 1:
        raise UnsupportedTensorError(
            f"cannot convert an array sharded over {len(a.sharding.device_set)} devices "
            "through DLPack. Gather it first (`jax.device_get(a)` or "
            "`jax.device_put(a, jax.devices()[0])`), or convert each shard "
            "(`a.addressable_shards[i].data`)."
        )
    name = str(a.dtype)
    if name not in _NAMES_FROM_JAX:
        raise UnsupportedTensorError(
            f"dtype `{a.dtype}` has no torch counterpart that DLPack can carry. Supported: "
            f"{SUPPORTED_LIST}. Cast first with `a.astype(...)` (PRNG keys: "
            "`jax.random.key_data(key)`)."
        )
    platform = a.platform()
    if platform == "cpu" and _FastPaths.export_capsule is not None:
        tensor = _export_lowlevel(a)
    else:
        tensor = torch.from_dlpack(a)  # negotiates CUDA streams
    target = None if device is None else resolve_torch_device(device)
    if target is not None and not _same_torch_device(target, tensor.device):
        if copy is False:
            raise CopyRequiredError(
                f"moving the tensor to `{target}` needs a copy, but copy=False. Pass copy=None."
            )
        return tensor.to(target)
    if copy:
        return tensor.clone()
    return tensor


_NAMES_FROM_JAX = frozenset(TORCH_TO_NAME.values())


# ---------------------------------------------------------------------------------------
# Public API

F = TypeVar("F", bound=Callable[..., Any])


def _is_function(value: Any) -> bool:
    return callable(value) and not isinstance(value, (type, torch.nn.Module, jax.Array))


@overload
def torch_to_jax(
    value: torch.Tensor, *, copy: bool | None = ..., device: Any = ...
) -> jax.Array: ...
@overload
def torch_to_jax(value: F, *, copy: bool | None = ..., device: Any = ...) -> F: ...
@overload
def torch_to_jax(value: Any, *, copy: bool | None = ..., device: Any = ...) -> Any: ...


def torch_to_jax(value: Any, *, copy: bool | None = None, device: Any = None) -> Any:
    """Convert torch tensors to JAX arrays: a tensor, a pytree of them, or a JAX function.

    * A tensor becomes a ``jax.Array`` that **shares memory** with it (DLPack), unless a copy
      is forced (see Note [Memory sharing and copies] in this module) or ``copy=True``.
      ``copy=False`` raises ``CopyRequiredError`` where a copy would be needed.
    * A pytree (tuples, namedtuples, lists, dicts, dataclasses, ``None``) keeps its exact
      structure; leaves that are not tensors pass through unchanged.
    * A ``torch.device`` (alone or in a pytree) becomes the matching ``jax.Device``
      (``cpu`` -> JAX's CPU device, ``cuda:N`` -> the JAX GPU with local hardware id N);
      ``ValueError`` when JAX has no such device.
    * A function is taken to be a JAX function: the result takes torch tensors, calls it
      with JAX arrays and returns torch tensors (``@torch_to_jax`` as a decorator). A
      ``torch.nn.Module`` raises ``TypeError``: use ``torch_module_to_jax``.

    Tensors that require grad are converted detached: gradients do not flow through this
    call. To differentiate through a JAX function from torch, use ``WrappedJaxFunction``.

    ``device`` (a ``jax.Device``, ``torch.device`` or string like ``"cuda:0"``) places the
    result there (a copy when it differs). A cuda:N tensor lands on the JAX GPU with local
    hardware id N; torch's current stream is synchronised with JAX's before JAX reads.
    64-bit tensors while JAX's x64 mode is off become 32-bit (see Note [64-bit values with
    x64 off]); integers that do not fit raise ``IntegerOverflowError``.

    Args:
        value: A ``torch.Tensor``, a ``torch.device``, a pytree of them, or a JAX function.
        copy: ``None`` (the default) copies only when the layout or dtype forces it;
            ``True`` always returns fresh memory; ``False`` never copies and raises where it
            would have to.
        device: Where the result goes (``jax.Device``, ``torch.device`` or a string such as
            ``"cuda:0"``); ``None`` keeps the tensor's device.

    Returns:
        The same structure with JAX arrays (or JAX devices) in place of the tensors (devices),
        sharing memory with them unless a copy was made; for a function, a function that takes
        and returns torch tensors.

    Raises:
        CopyRequiredError: ``copy=False`` and the tensor cannot be shared (strides, offset,
            conjugate or negative bit, a 64-bit dtype with x64 off, another device).
        IntegerOverflowError: A 64-bit integer tensor with x64 off holds a value that does
            not fit in 32 bits.
        UnsupportedTensorError: A sparse, meta, quantized, nested or sub-byte tensor.
        TypeError: A ``torch.nn.Module`` (use ``torch_module_to_jax``).
        ValueError: JAX has no device matching ``device`` or the tensor's device.
    """
    if isinstance(value, _Tensor):
        return _tensor_to_jax(value, copy, device)
    if isinstance(value, torch.device):
        return resolve_jax_device(value)
    if isinstance(value, torch.nn.Module):
        raise TypeError(
            f"torch_to_jax converts tensors, not a `{type(value).__name__}` module: use "
            "`apply, params = torch_module_to_jax(module)` (torch-jax-interop 0.0.8 did that "
            "here; see docs/migration.md)."
        )
    if _is_function(value):
        return _wrap_jax_function(value, copy, device)
    return tree_map(lambda leaf: _leaf_to_jax(leaf, copy, device), value)


def _leaf_to_jax(leaf: Any, copy: bool | None, device: Any) -> Any:
    if isinstance(leaf, _Tensor):
        return _tensor_to_jax(leaf, copy, device)
    if isinstance(leaf, torch.device):
        return resolve_jax_device(leaf)
    return leaf


@overload
def jax_to_torch(
    value: jax.Array, *, copy: bool | None = ..., device: Any = ...
) -> torch.Tensor: ...
@overload
def jax_to_torch(value: F, *, copy: bool | None = ..., device: Any = ...) -> F: ...
@overload
def jax_to_torch(value: Any, *, copy: bool | None = ..., device: Any = ...) -> Any: ...


def jax_to_torch(value: Any, *, copy: bool | None = None, device: Any = None) -> Any:
    """Convert JAX arrays to torch tensors: an array, a pytree of them, or a torch function.

    * An array becomes a ``torch.Tensor`` that **shares memory** with it (DLPack) unless
      ``copy=True`` or ``device`` differs. Writing into that tensor in place changes the JAX
      array too (JAX assumes arrays never change): convert with ``copy=True`` if you will
      write to it.
    * A pytree keeps its exact structure; leaves that are not JAX arrays pass through.
    * A ``jax.Device`` (alone or in a pytree) becomes the matching ``torch.device``
      (JAX's CPU device -> ``cpu``, the JAX GPU with local hardware id N -> ``cuda:N``).
    * A function is taken to be a torch function: the result takes JAX arrays, calls it with
      torch tensors and returns JAX arrays (``@jax_to_torch`` as a decorator).

    ``device`` (a ``torch.device``, ``jax.Device`` or string) moves the result there (a copy
    when it differs; ``"cpu"`` for a CPU array is a zero-copy no-op). Arrays on the
    JAX GPU with local hardware id N become ``cuda:N`` tensors, ordered after JAX's work on
    torch's current stream. Sharded arrays, traced values, PRNG keys and sub-byte dtypes
    raise ``UnsupportedTensorError`` with what to do instead.

    Args:
        value: A ``jax.Array``, a ``jax.Device``, a pytree of them, or a torch function.
        copy: ``None`` (the default) copies only when it must; ``True`` always returns fresh
            memory; ``False`` never copies and raises where it would have to.
        device: Where the result goes (``torch.device``, ``jax.Device`` or a string);
            ``None`` keeps the array's device.

    Returns:
        The same structure with torch tensors (or torch devices) in place of the arrays
        (devices), sharing memory with them unless a copy was made; for a function, a
        function that takes and returns JAX arrays.

    Raises:
        CopyRequiredError: ``copy=False`` and a copy would be needed (another device).
        UnsupportedTensorError: A sharded or traced array, a PRNG key or a sub-byte dtype.
    """
    if isinstance(value, jax.Array):
        return _array_to_torch(value, copy, device)
    if isinstance(value, jax.Device):
        return resolve_torch_device(value)
    if _is_function(value):
        return _wrap_torch_function(value, copy, device)
    return tree_map(lambda leaf: _leaf_to_torch(leaf, copy, device), value)


def _leaf_to_torch(leaf: Any, copy: bool | None, device: Any) -> Any:
    if isinstance(leaf, jax.Array):
        return _array_to_torch(leaf, copy, device)
    if isinstance(leaf, jax.Device):
        return resolve_torch_device(leaf)
    return leaf


def _wrap_jax_function(fn: F, copy: bool | None, device: Any) -> F:
    @functools.wraps(fn)
    def takes_and_returns_torch(*args: Any, **kwargs: Any) -> Any:
        jax_args, jax_kwargs = torch_to_jax((args, kwargs), copy=copy, device=device)
        return jax_to_torch(fn(*jax_args, **jax_kwargs), copy=copy)

    # the wrapper keeps fn's signature for the caller, with torch types in place of JAX ones
    return takes_and_returns_torch  # type: ignore[return-value]


def _wrap_torch_function(fn: F, copy: bool | None, device: Any) -> F:
    @functools.wraps(fn)
    def takes_and_returns_jax(*args: Any, **kwargs: Any) -> Any:
        torch_args, torch_kwargs = jax_to_torch((args, kwargs), copy=copy, device=device)
        return torch_to_jax(fn(*torch_args, **torch_kwargs), copy=copy)

    # the wrapper keeps fn's signature for the caller, with JAX types in place of torch ones
    return takes_and_returns_jax  # type: ignore[return-value]
