"""JAX side of the dtype table: numpy / JAX dtype lookups derived from ``_dtypes``, and the
one x64 check.

Imports JAX, never torch. ``numpy`` dtypes for bfloat16 and float8 come from ``ml_dtypes``
(through ``jax.numpy``), so this module, not the framework-free base, builds them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ._dtypes import DTYPE_NAMES, NARROW

NAME_TO_NUMPY: dict[str, np.dtype] = {name: np.dtype(getattr(jnp, name)) for name in DTYPE_NAMES}
NUMPY_TO_NAME: dict[np.dtype, str] = {dt: name for name, dt in NAME_TO_NUMPY.items()}
# 64-bit dtypes and the 32-bit numpy dtype JAX uses for them while x64 mode is off.
NUMPY_NARROW: dict[np.dtype, np.dtype] = {
    NAME_TO_NUMPY[wide]: NAME_TO_NUMPY[narrow] for wide, narrow in NARROW.items()
}

_FLOAT64 = np.dtype(np.float64)


def x64_enabled() -> bool:
    """Whether JAX's x64 mode is on right now, as JAX itself would decide a dtype.

    Honours ``jax.config.update("jax_enable_x64", ...)``, ``JAX_ENABLE_X64`` and the
    ``jax.enable_x64(...)`` context manager (thread-local), through the public
    ``jax.dtypes.canonicalize_dtype``: the same decision ``jnp.asarray`` makes.
    """
    return jax.dtypes.canonicalize_dtype(_FLOAT64) == _FLOAT64
