"""Byte layout facts both ends share: the one alignment constant. Imports no framework."""

from __future__ import annotations

ALIGNMENT = 64
"""Byte alignment of every tensor slice (shared memory, output arenas, zero-copy imports):
JAX on CPU imports only 64-byte aligned buffers without a copy."""


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is ``>= n`` (``n >= 0``, ``multiple > 0``)."""
    return (n + multiple - 1) // multiple * multiple


def align(n: int) -> int:
    """``n`` rounded up to a multiple of ``ALIGNMENT``."""
    return round_up(n, ALIGNMENT)


def is_aligned(address: int) -> bool:
    """Whether a byte address or offset is a multiple of ``ALIGNMENT``."""
    return address % ALIGNMENT == 0
