"""Torch side of the dtype table: ``torch.dtype`` lookups derived from ``_dtypes``.

Imports torch, never JAX. The only place torch dtypes are listed.
"""

from __future__ import annotations

import torch

from ._dtypes import BY_NAME, DTYPE_NAMES, NARROW, DTypeInfo

TORCH_TO_NAME: dict[torch.dtype, str] = {getattr(torch, name): name for name in DTYPE_NAMES}
NAME_TO_TORCH: dict[str, torch.dtype] = {name: dt for dt, name in TORCH_TO_NAME.items()}

# 64-bit dtypes and the 32-bit torch dtype they become while JAX's x64 mode is off.
TORCH_NARROW: dict[torch.dtype, torch.dtype] = {
    NAME_TO_TORCH[wide]: NAME_TO_TORCH[narrow] for wide, narrow in NARROW.items()
}


def torch_dtype_info(dtype: torch.dtype) -> DTypeInfo | None:
    """The table entry of a torch dtype, or None for a dtype JAX does not share."""
    name = TORCH_TO_NAME.get(dtype)
    return None if name is None else BY_NAME[name]
