"""The one dtype table: the dtypes torch and JAX share, without importing either framework.

Each entry says everything the package needs to know about a dtype: its name, item size,
kind, the 32-bit type JAX uses for it while x64 mode is off (``narrow``), and its value in
the wire protocol's ``Dtype`` enum (``wire``, named ``DTYPE_<NAME>``). The name is the one
both frameworks *and* numpy use (``torch.float32`` / ``jnp.float32`` /
``np.dtype("float32")``; bfloat16 and the float8 types are numpy dtypes through
``ml_dtypes``, which JAX installs). Framework lookups
are derived from this table in one place per framework: ``_dtypes_torch.py`` (torch side)
and ``_dtypes_jax.py`` (JAX side). ``torch.float8_e8m0fnu`` and the float4 types are left
out: their packing differs between the two frameworks.
"""

from __future__ import annotations

from typing import NamedTuple


class DTypeInfo(NamedTuple):
    """One shared dtype (see the module docstring)."""

    name: str
    itemsize: int
    kind: str  # "f" float, "c" complex, "i" signed int, "u" unsigned int, "b" bool
    narrow: str | None  # the 32-bit type JAX uses for it while x64 mode is off
    wire: int = 0  # its ``Dtype`` enum value in the wire protocol (0: not on the wire)


SHARED_DTYPES: tuple[DTypeInfo, ...] = (
    DTypeInfo("float32", 4, "f", None, 1),
    DTypeInfo("float64", 8, "f", "float32", 2),
    DTypeInfo("float16", 2, "f", None, 3),
    DTypeInfo("bfloat16", 2, "f", None, 4),
    DTypeInfo("int8", 1, "i", None, 5),
    DTypeInfo("int16", 2, "i", None, 6),
    DTypeInfo("int32", 4, "i", None, 7),
    DTypeInfo("int64", 8, "i", "int32", 8),
    DTypeInfo("uint8", 1, "u", None, 9),
    DTypeInfo("uint16", 2, "u", None, 10),
    DTypeInfo("uint32", 4, "u", None, 11),
    DTypeInfo("uint64", 8, "u", "uint32", 12),
    DTypeInfo("bool", 1, "b", None, 13),
    DTypeInfo("complex64", 8, "c", None, 14),
    DTypeInfo("complex128", 16, "c", "complex64", 15),
    DTypeInfo("float8_e4m3fn", 1, "f", None, 16),
    DTypeInfo("float8_e5m2", 1, "f", None, 17),
    DTypeInfo("float8_e4m3fnuz", 1, "f", None, 18),
    DTypeInfo("float8_e5m2fnuz", 1, "f", None, 19),
)

BY_NAME: dict[str, DTypeInfo] = {info.name: info for info in SHARED_DTYPES}
DTYPE_NAMES: tuple[str, ...] = tuple(BY_NAME)
SUPPORTED_LIST = ", ".join(DTYPE_NAMES)
"""The supported dtype names, for error messages."""

DTYPE_TO_ENUM: dict[str, int] = {info.name: info.wire for info in SHARED_DTYPES}
ENUM_TO_DTYPE: dict[int, str] = {info.wire: info.name for info in SHARED_DTYPES}
# 64-bit dtype name -> the 32-bit dtype name JAX uses for it while x64 mode is off.
NARROW: dict[str, str] = {info.name: info.narrow for info in SHARED_DTYPES if info.narrow}
