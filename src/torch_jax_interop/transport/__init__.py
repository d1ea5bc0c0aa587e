"""Moving tensor bytes between the torch client and the JAX worker without copies.

Shared memory (this package so far): :class:`SharedMemoryRegion` maps one POSIX
shared-memory file; :class:`SharedMemoryPool` carves client-owned regions into 64-byte
aligned slices (:class:`RegionSlice`). Who creates, maps and unlinks what is the subject of
Note [Shared memory ownership] in ``_shm.py``. Imports neither torch nor jax.
"""

from ._pool import RegionSlice as RegionSlice
from ._pool import SharedMemoryPool as SharedMemoryPool
from ._shm import ALIGNMENT as ALIGNMENT
from ._shm import NAME_PATTERN as NAME_PATTERN
from ._shm import SHM_DIR_ENV as SHM_DIR_ENV
from ._shm import SHM_PREFIX as SHM_PREFIX
from ._shm import SharedMemoryRegion as SharedMemoryRegion
from ._shm import check_slice as check_slice
from ._shm import cleanup_orphans as cleanup_orphans
from ._shm import default_shm_dir as default_shm_dir
from ._shm import numpy_view as numpy_view
