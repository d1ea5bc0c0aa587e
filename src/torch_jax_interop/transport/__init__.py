"""Moving tensor bytes between the torch client and the JAX worker without copies.

One pool, generic over its buffer kind (``_pool.py``): :class:`SharedMemoryPool` carves
client-owned shared-memory regions (:class:`SharedMemoryRegion`) into 64-byte aligned
:class:`RegionSlice` s; :class:`CudaIpcPool` carves exported device buffers into
:class:`DeviceSlice` s. Releases follow Note [Releasing from finalizers] in ``_pool.py``;
who creates, maps and unlinks what is Note [Shared memory ownership] in ``_shm.py``.

CUDA IPC lives in :mod:`.cuda`, split by role: policy (:func:`choose_transport`, routing by
GPU UUID), driver, worker side (:class:`CudaIpcMapping`) and client side (the pool, the
session's channel); see Note [CUDA IPC ownership] there. Imports neither torch nor jax
(nor cupy, which the CUDA IPC parts import on first use).
"""

from .._layout import ALIGNMENT as ALIGNMENT
from . import cuda as cuda
from ._data_plane import DEFAULT_MAX_FRAME_BYTES as DEFAULT_MAX_FRAME_BYTES
from ._janitor import cleanup_orphans as cleanup_orphans
from ._memfd import sealing_supported as sealing_supported
from ._pool import Pool as Pool
from ._pool import PoolSlice as PoolSlice
from ._pool import fill_descriptor as fill_descriptor
from ._shm import NAME_PATTERN as NAME_PATTERN
from ._shm import SHM_DIR_ENV as SHM_DIR_ENV
from ._shm import SHM_PREFIX as SHM_PREFIX
from ._shm import SharedMemoryRegion as SharedMemoryRegion
from ._shm import default_shm_dir as default_shm_dir
from ._shm import region_tag as region_tag
from ._shm_pool import RegionSlice as RegionSlice
from ._shm_pool import SharedMemoryPool as SharedMemoryPool
from ._slices import check_slice as check_slice
from ._slices import numpy_view as numpy_view
from ._unix_socket import check_socket_directory as check_socket_directory
from ._unix_socket import check_socket_path as check_socket_path
from ._unix_socket import refuse_abstract as refuse_abstract
from ._unix_socket import unix_socket_path as unix_socket_path
from .cuda import CudaIpcMapping as CudaIpcMapping
from .cuda import CudaIpcPool as CudaIpcPool
from .cuda import DeviceSlice as DeviceSlice
from .cuda import choose_transport as choose_transport
from .cuda import parse_gpu_uuid as parse_gpu_uuid
from .cuda import route_device as route_device
from .cuda import validate_cuda_slice as validate_cuda_slice
