"""JAX side of Note [Private APIs] (in ``torch_jax_interop._compat``). Imports JAX, never torch.

Used by the worker (``import_numpy``) and the DLPack bridge (``DLPackFastPath``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._layout import ALIGNMENT, is_aligned

try:  # jax's own from_dlpack calls these after ~25 us of Python; we call them directly
    from jax._src.lib import _jax as _jaxlib, jaxlib_extension_version as _JAXLIB_VERSION

    _ArrayImpl: Any = _jaxlib.ArrayImpl
    _dlpack_to_buffer: Any = _jaxlib.dlpack_managed_tensor_to_buffer
    _buffer_to_dlpack: Any = _jaxlib.buffer_to_dlpack_managed_tensor
except Exception:  # pragma: no cover - other jaxlib versions
    _JAXLIB_VERSION = 0
    _ArrayImpl = None
    _dlpack_to_buffer = None
    _buffer_to_dlpack = None

ARRAY_TYPE: type = _ArrayImpl if isinstance(_ArrayImpl, type) else jax.Array
"""The concrete type of committed JAX arrays (``type(a) is ARRAY_TYPE`` is the fast check)."""

_KDL_CPU = 1


class _Exported:
    """A DLPack capsule dressed as a producer, so that numpy can consume it in the probe."""

    def __init__(self, capsule: Any) -> None:
        self._capsule = capsule

    def __dlpack__(self, *args: Any, **kwargs: Any) -> Any:
        return self._capsule

    def __dlpack_device__(self) -> tuple[int, int]:
        return (_KDL_CPU, 0)


class DLPackFastPath:
    """The private jaxlib CPU DLPack entry points, where they work (probed once, on first use).

    ``import_capsule(capsule) -> jax.Array`` imports a CPU DLPack capsule without a copy;
    ``export_capsule(array) -> capsule`` exports a CPU array; ``export_owned(array) ->
    capsule`` exports a single-buffer CPU array that only the caller holds (Note
    [Exporting a shard, not the array]). Each is ``None`` when the private entry point
    is missing or failed its probe; callers then use the public ``jax.dlpack.from_dlpack``
    / ``torch.from_dlpack``, which are zero-copy too (slower by ~25 us of Python per call).
    """

    probed: bool = False
    cpu_device: Any = None
    import_capsule: Callable[[Any], jax.Array] | None = None
    export_capsule: Callable[[Any], Any] | None = None
    export_owned: Callable[[Any], Any] | None = None

    @classmethod
    def probe(cls, *, private: bool = True) -> None:
        """Decide which fast paths to use. ``private=False`` forces the public fallbacks
        (tests use it to check that they stay zero-copy)."""
        cls.probed = True
        cls.import_capsule = cls.export_capsule = cls.export_owned = None
        try:
            cls.cpu_device = jax.devices("cpu")[0]
        except RuntimeError:  # pragma: no cover - a jax without a CPU backend
            return
        if not private or _dlpack_to_buffer is None:
            return
        device = cls.cpu_device

        if _JAXLIB_VERSION >= 467:
            def import_capsule(capsule: Any) -> jax.Array:
                return _dlpack_to_buffer(capsule, device, None, None, _KDL_CPU)
        else:  # pragma: no cover - older jaxlib
            def import_capsule(capsule: Any) -> jax.Array:
                return _dlpack_to_buffer(capsule, device, None, None)

        def export_capsule(array: Any) -> Any:
            # Note [Exporting a shard, not the array]: the capsule holds an external
            # reference on the buffer of the array it was made from. Made from ``array``
            # itself, ``array.delete()`` would destroy that buffer under the hold and XLA
            # aborts the process ("Non-zero type 1 hold on destruction"). Made from a new
            # single-device array on the same buffer (what jax's public ``__dlpack__``
            # does), ``delete()`` drops only ``array``'s reference: the torch tensor keeps
            # the buffer alive until it dies.
            return _buffer_to_dlpack(array.addressable_data(0), stream=None)

        def export_owned(array: Any) -> Any:
            # Note [Exporting a shard, not the array], for an array that nobody else
            # holds, so that nobody can delete() it: a fresh output of the caller's own
            # jitted call (jit returns new array objects, also for an input or a constant
            # it passes through). The capsule holds `array` itself, alive as long as the
            # torch tensor; `addressable_data(0)` would build the same new array with ~1 us
            # of Python.
            return _buffer_to_dlpack(array, stream=None)

        sample = aligned_empty(16, np.dtype(np.float32))
        sample[:] = np.arange(16, dtype=np.float32)
        try:
            array = import_capsule(sample.__dlpack__())
            if (
                isinstance(array, jax.Array)
                and array.unsafe_buffer_pointer() == sample.ctypes.data
                and float(array[3]) == 3.0
            ):
                cls.import_capsule = import_capsule
        except Exception:
            pass
        try:
            source = jnp.arange(4.0, dtype=jnp.float32)
            back = np.from_dlpack(_Exported(export_capsule(source)))
            if (back.ctypes.data == source.unsafe_buffer_pointer()
                    and back.tolist() == [0.0, 1.0, 2.0, 3.0]):
                cls.export_capsule = export_capsule
                cls.export_owned = export_owned
        except Exception:
            pass


def aligned_empty(count: int, dtype: np.dtype) -> np.ndarray:
    """An uninitialised 1-D numpy array whose data starts at an ``ALIGNMENT`` boundary."""
    raw = np.empty(count * dtype.itemsize + ALIGNMENT, dtype=np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    return raw[start:start + count * dtype.itemsize].view(dtype)


def is_single_cpu_buffer(array: Any) -> bool:
    """Whether a live ``ARRAY_TYPE`` array is one buffer on the CPU (exportable as it is).

    ``is_deleted()`` first: ``platform()`` crashes the process (SIGSEGV) on a deleted or
    donated array in jaxlib 0.10.2.
    """
    if array.is_deleted() or array.platform() != "cpu":
        return False
    buffers = getattr(array, "_arrays", None)
    if buffers is not None:
        return len(buffers) == 1
    return len(array.sharding.device_set) == 1


def import_numpy(array: np.ndarray) -> jax.Array:
    """A JAX CPU array viewing ``array``'s memory, or a copy where that cannot be.

    Shares memory (no copy) when ``array`` is C-contiguous, writeable and 64-byte aligned:
    through the private fast path where it passed its probe, else through the public
    ``jax.dlpack.from_dlpack``. Anything else is copied (``jnp.array``).
    """
    if is_aligned(array.ctypes.data) and array.flags.c_contiguous and array.flags.writeable:
        if not DLPackFastPath.probed:
            DLPackFastPath.probe()
        importer = DLPackFastPath.import_capsule
        try:
            if importer is not None:
                return importer(array.__dlpack__())
            return jax.dlpack.from_dlpack(array, device=DLPackFastPath.cpu_device)
        except Exception:
            pass  # a layout or dtype DLPack cannot carry: the copy below
    return jnp.array(array)
