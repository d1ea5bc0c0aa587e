"""The dtypes torch and JAX share, by name, without importing either framework.

The names are the ones both frameworks use (``torch.float32`` / ``jnp.float32``); the wire
protocol's ``Dtype`` enum has one value per entry (``DTYPE_<NAME>``), in this order.
``torch.float8_e8m0fnu`` and the float4 types are left out: their packing differs between the
two frameworks.
"""

from __future__ import annotations

from typing import NamedTuple


class DTypeInfo(NamedTuple):
    name: str
    itemsize: int
    kind: str  # "f" float, "c" complex, "i" signed int, "u" unsigned int, "b" bool
    narrow: str | None  # the 32-bit type JAX uses for it while x64 mode is off


SHARED_DTYPES: tuple[DTypeInfo, ...] = (
    DTypeInfo("float32", 4, "f", None),
    DTypeInfo("float64", 8, "f", "float32"),
    DTypeInfo("float16", 2, "f", None),
    DTypeInfo("bfloat16", 2, "f", None),
    DTypeInfo("int8", 1, "i", None),
    DTypeInfo("int16", 2, "i", None),
    DTypeInfo("int32", 4, "i", None),
    DTypeInfo("int64", 8, "i", "int32"),
    DTypeInfo("uint8", 1, "u", None),
    DTypeInfo("uint16", 2, "u", None),
    DTypeInfo("uint32", 4, "u", None),
    DTypeInfo("uint64", 8, "u", "uint32"),
    DTypeInfo("bool", 1, "b", None),
    DTypeInfo("complex64", 8, "c", None),
    DTypeInfo("complex128", 16, "c", "complex64"),
    DTypeInfo("float8_e4m3fn", 1, "f", None),
    DTypeInfo("float8_e5m2", 1, "f", None),
    DTypeInfo("float8_e4m3fnuz", 1, "f", None),
    DTypeInfo("float8_e5m2fnuz", 1, "f", None),
)

BY_NAME: dict[str, DTypeInfo] = {info.name: info for info in SHARED_DTYPES}
DTYPE_NAMES: tuple[str, ...] = tuple(BY_NAME)
