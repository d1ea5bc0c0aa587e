"""Slices of a region: bounds checks both ends run, and numpy views of a slice (no copy)."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import numpy as np

from .._errors import SliceOutOfBoundsError
from .._layout import ALIGNMENT


def _as_int(value: object, what: str) -> int:
    try:
        # any object on purpose: operator.index is the check, its TypeError is caught
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise SliceOutOfBoundsError(
            f"`{what}` must be an int, got {type(value).__name__}"
        ) from None


def check_slice(region_size: int, offset: int, nbytes: int, *, alignment: int = ALIGNMENT) -> None:
    """Raise :class:`SliceOutOfBoundsError` unless ``[offset, offset + nbytes)`` lies in the region.

    Also refuses negative values and an ``offset`` that is not a multiple of ``alignment``.
    The end is never computed as ``offset + nbytes``: the check is written as
    ``nbytes > region_size - offset`` so that it stays right where the sum would wrap around
    2**64 in fixed-width arithmetic (a ``uint64`` descriptor field, numpy, or a C port).
    """
    region_size = _as_int(region_size, "region_size")
    offset = _as_int(offset, "offset")
    nbytes = _as_int(nbytes, "nbytes")
    alignment = _as_int(alignment, "alignment")
    if alignment <= 0:
        raise ValueError(f"`alignment` must be positive, got {alignment}")
    if region_size < 0 or offset < 0 or nbytes < 0:
        raise SliceOutOfBoundsError(
            f"slice offset={offset} nbytes={nbytes} of a region of {region_size} bytes: "
            "sizes and offsets cannot be negative"
        )
    if offset % alignment:
        raise SliceOutOfBoundsError(
            f"slice offset={offset} is not a multiple of {alignment}: every slice must start "
            f"at a {alignment}-byte aligned offset (JAX imports aligned CPU buffers without "
            "a copy)"
        )
    if offset > region_size:
        raise SliceOutOfBoundsError(
            f"slice offset={offset} lies beyond the end of its region ({region_size} bytes)"
        )
    if nbytes > region_size - offset:
        raise SliceOutOfBoundsError(
            f"slice offset={offset} nbytes={nbytes} runs past the end of its region "
            f"({region_size} bytes, {region_size - offset} left after the offset)"
        )


def numpy_view(
    buffer: memoryview, offset: int, dtype: Any, shape: Sequence[int]
) -> np.ndarray:
    """A numpy array over ``buffer[offset:]`` with ``dtype`` and C-order ``shape``, no copy.

    The array SHARES memory with ``buffer`` (and with every process mapping it) and keeps
    ``buffer`` alive. Writable when ``buffer`` is. Raises :class:`SliceOutOfBoundsError` when
    ``shape`` does not fit in ``buffer`` after ``offset``.
    """
    dt = np.dtype(dtype)
    if dt.hasobject:
        raise TypeError(f"dtype `{dt}` holds Python objects; shared memory holds only raw data")
    offset = _as_int(offset, "offset")
    dims = tuple(_as_int(d, "shape entry") for d in shape)
    if any(d < 0 for d in dims):
        raise SliceOutOfBoundsError(f"shape {dims} has a negative dimension")
    count = 1
    for d in dims:
        count *= d  # Python ints: no overflow, however large the dims
    needed = count * dt.itemsize
    available = memoryview(buffer).nbytes
    if offset < 0 or offset > available or needed > available - offset:
        raise SliceOutOfBoundsError(
            f"a {dt} array of shape {dims} needs {needed} bytes at offset {offset}, but the "
            f"buffer holds {available} bytes"
        )
    flat = np.frombuffer(buffer, dtype=dt, count=count, offset=offset)
    return flat.reshape(dims)
