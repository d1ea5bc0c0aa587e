"""CUDA IPC: GPU tensors cross the process boundary without leaving the GPU.

Split by role, so that each side imports only its part:

* ``_policy.py``, pure logic, no GPU needed (tested everywhere): :func:`choose_transport`
  (what ``transport="auto"`` does), routing by GPU UUID (:func:`route_device`,
  :func:`parse_gpu_uuid`), descriptor validation (:func:`validate_cuda_slice`,
  :func:`check_cuda_descriptor`) and the environment checks.
* ``_driver.py``: the CUDA driver through :mod:`ctypes` and cupy, loaded on first use
  (:func:`cuda_ipc_support`, :func:`device_uuid`).
* ``_worker.py``: the worker's :class:`CudaIpcMapping` (:func:`open_region`).
* ``_client.py``: the client's :class:`CudaIpcPool` (the generic pool of ``_pool.py`` over
  exported device buffers), :class:`DeviceSlice` and :class:`CudaIpcChannel`.

Neither torch nor jax nor cupy is imported at module level: the worker must not import
torch, the client must not import jax, and CI has no cupy. GPU UUIDs are read through the
CUDA driver with :mod:`ctypes` (``cuDeviceGetUuid``), because
``cupy.cuda.runtime.getDeviceProperties()["uuid"]`` goes through a C ``char[16]`` that
Cython cuts at the first zero byte.

Note [CUDA IPC ownership]
=========================

Who allocates: the CLIENT (the torch process). :class:`CudaIpcPool` allocates dedicated
device buffers with plain ``cudaMalloc`` (``cupy.cuda.runtime.malloc``) in multiples of
2 MiB, never torch caching-allocator blocks: a handle exports its whole allocation (a
caching-allocator segment would expose unrelated tensors), and PyTorch's
``expandable_segments`` allocations cannot be exported with ``cudaIpcGetMemHandle`` at
all. Each buffer is exported once (``cudaIpcGetMemHandle``), registered with the worker
once (RegisterRegion, kind CUDA_IPC, with the GPU's UUID), and reused for many calls:
slices are carved at 256-byte aligned offsets and given back to the pool.

Who maps: the WORKER opens each handle once (``cudaIpcOpenMemHandle``) on the device whose
UUID the client named (:func:`route_device`: indices differ between processes when
CUDA_VISIBLE_DEVICES does), checks that the allocation is at least as large as the size
the client registered, and caches the mapping for the session (and process-wide, keyed by
the handle bytes: the driver maps a handle only once per process and context). Inputs
become JAX arrays zero-copy (DLPack of a cupy view of the mapping); outputs are written
into client-provided slots with a device-to-device copy.

Who unmaps, and when: the worker, on ReleaseRegion or at the end of the session. JAX
arrays made from a mapping keep it open (the DLPack deleter holds the cupy view, whose
memory holds the mapping), so ``cudaIpcCloseMemHandle`` runs when the last of them dies,
never under a live array.

Who frees: the client, when its pool is closed (session end, ``Worker.close()``), after it
has asked the worker to release its regions. Buffers that output tensors still view are
freed when the last such tensor dies (the tensor's storage keeps the buffer alive).

Stream ordering: the client copies a tensor into its slice on torch's current stream and
synchronises that stream before the request leaves (so the worker reads finished bytes,
and no kernel still reads an output slot the worker may now overwrite). The worker calls
``block_until_ready`` on its outputs, copies them on its own stream and synchronises it
before it replies, so the client sees finished outputs.
"""

from ._client import (
    CudaIpcChannel as CudaIpcChannel,
    CudaIpcPool as CudaIpcPool,
    DeviceBuffer as DeviceBuffer,
    DeviceSlice as DeviceSlice,
)
from ._driver import (
    CudaIpcSupport as CudaIpcSupport,
    cuda_ipc_support as cuda_ipc_support,
    device_uuid as device_uuid,
    no_support_message as no_support_message,
    visible_gpu_uuids as visible_gpu_uuids,
)
from ._policy import (
    CUDA_ALIGNMENT as CUDA_ALIGNMENT,
    TRANSPORTS as TRANSPORTS,
    check_cuda_descriptor as check_cuda_descriptor,
    choose_transport as choose_transport,
    expandable_segments_enabled as expandable_segments_enabled,
    format_gpu_uuid as format_gpu_uuid,
    parse_gpu_uuid as parse_gpu_uuid,
    route_device as route_device,
    shared_namespaces as shared_namespaces,
    validate_cuda_slice as validate_cuda_slice,
)
from ._worker import CudaIpcMapping as CudaIpcMapping, open_region as open_region
