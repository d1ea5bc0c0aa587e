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
from ._pool import Pool as Pool, PoolSlice as PoolSlice, fill_descriptor as fill_descriptor
from ._shm import (
    NAME_PATTERN as NAME_PATTERN,
    SHM_DIR_ENV as SHM_DIR_ENV,
    SHM_PREFIX as SHM_PREFIX,
    SharedMemoryRegion as SharedMemoryRegion,
    default_shm_dir as default_shm_dir,
    region_tag as region_tag,
)
from ._shm_pool import RegionSlice as RegionSlice, SharedMemoryPool as SharedMemoryPool
from ._slices import check_slice as check_slice, numpy_view as numpy_view
from ._unix_socket import (
    check_socket_directory as check_socket_directory,
    check_socket_path as check_socket_path,
    refuse_abstract as refuse_abstract,
    unix_socket_path as unix_socket_path,
)
from .cuda import (
    CudaIpcMapping as CudaIpcMapping,
    CudaIpcPool as CudaIpcPool,
    DeviceSlice as DeviceSlice,
    choose_transport as choose_transport,
    parse_gpu_uuid as parse_gpu_uuid,
    route_device as route_device,
    validate_cuda_slice as validate_cuda_slice,
)
