"""Moving tensor bytes between the torch client and the JAX worker without copies.

Shared memory: :class:`SharedMemoryRegion` maps one POSIX shared-memory file;
:class:`SharedMemoryPool` carves client-owned regions into 64-byte aligned slices
(:class:`RegionSlice`). Who creates, maps and unlinks what is the subject of
Note [Shared memory ownership] in ``_shm.py``.

CUDA IPC (``_cuda_ipc.py``): :class:`CudaIpcPool` exports client-owned device buffers,
:class:`CudaIpcMapping` opens them in the worker, :func:`choose_transport` decides what
``transport="auto"`` does; see Note [CUDA IPC ownership]. Imports neither torch nor jax
(nor cupy, which the CUDA IPC parts import on first use).
"""

from ._cuda_ipc import CudaIpcMapping as CudaIpcMapping
from ._cuda_ipc import CudaIpcPool as CudaIpcPool
from ._cuda_ipc import DeviceSlice as DeviceSlice
from ._cuda_ipc import choose_transport as choose_transport
from ._cuda_ipc import parse_gpu_uuid as parse_gpu_uuid
from ._cuda_ipc import route_device as route_device
from ._cuda_ipc import validate_cuda_slice as validate_cuda_slice
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
