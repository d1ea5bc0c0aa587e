"""The worker's region abstraction (Note [Worker regions] in ``server/_session.py``).

A real shared-memory region made by the client side (``SharedMemoryRegion.create``) is
registered in a real ``Session`` the way RegisterRegion does it; descriptors are real
protobuf messages. CUDA IPC regions need a GPU and are covered by
``test_cuda_ipc_service.py``; without one, only the worker's refusal is checked here.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator

import numpy as np
import pytest

from torch_jax_interop._errors import InvalidArgumentError, ResourceExhaustedError
from torch_jax_interop.proto.v1 import interop_pb2 as pb
from torch_jax_interop.server._session import (
    CudaIpcWorkerRegion,
    Session,
    SharedMemoryWorkerRegion,
    max_region_bytes,
)
from torch_jax_interop.transport import SharedMemoryRegion, region_tag

MAX_TENSOR_BYTES = 1 << 20


@pytest.fixture
def client_region() -> Iterator[SharedMemoryRegion]:
    region = SharedMemoryRegion.create(64 << 10, tag=region_tag("s"), sealed=True)
    yield region
    region.unlink()
    region.close()


@pytest.fixture
def session() -> Iterator[Session]:
    s = Session("s", "test", max_residuals=4, max_regions=2)
    yield s
    s.close()


def _attach(region: SharedMemoryRegion) -> SharedMemoryWorkerRegion:
    return SharedMemoryWorkerRegion.attach(region.name, region.size,
                                           directory=region.directory,
                                           max_tensor_bytes=MAX_TENSOR_BYTES,
                                           session_tag=region_tag("s"))


def test_the_size_is_checked_once_before_anything_is_mapped(
        client_region: SharedMemoryRegion) -> None:
    largest = max_region_bytes(MAX_TENSOR_BYTES)
    assert largest == 64 << 20  # twice the tensor limit, but at least 64 MiB
    assert max_region_bytes(100 << 20) == 200 << 20
    for size in (0, largest + 1):
        with pytest.raises(ResourceExhaustedError, match=rf"outside 1\.\.{largest} bytes"):
            SharedMemoryWorkerRegion.attach(client_region.name, size,
                                            directory=client_region.directory,
                                            max_tensor_bytes=MAX_TENSOR_BYTES,
                                            session_tag=region_tag("s"))


def test_a_registered_region_views_checks_and_writes_slices(
        client_region: SharedMemoryRegion, session: Session) -> None:
    region_id = session.add_region(_attach(client_region))
    where = pb.SharedMemorySlice(region_id=region_id, offset=128, nbytes=16)
    region = session.region("shm", where)
    region.check(where)
    client = np.frombuffer(client_region.buffer, np.float32)
    client[32:36] = [1, 2, 3, 4]
    view = region.view(where.offset, np.dtype(np.float32), (4,))
    assert view.tolist() == [1, 2, 3, 4] and region.host(128, np.dtype(np.float32), (4,)) \
        .ctypes.data == view.ctypes.data  # host memory: the same view, no copy
    with session.writing(region, where) as target:
        target.write(256, np.arange(4, dtype=np.float32) * 2)
    assert client[64:68].tolist() == [0, 2, 4, 6]  # the client sees the output
    del view, client
    for offset, nbytes, message in [(65_472, 128, "runs past the end"), (3, 4, "multiple of 64"),
                                    (64, 2**64 - 1, "runs past the end")]:
        bad = pb.SharedMemorySlice(region_id=region_id, offset=offset, nbytes=nbytes)
        with pytest.raises(InvalidArgumentError, match=f"output arena: .*{message}"):
            region.check(bad, "output arena: ")


def test_lookups_are_bound_to_the_session_kind_and_never_reuse_an_id(
        client_region: SharedMemoryRegion, session: Session) -> None:
    region_id = session.add_region(_attach(client_region))
    session.release_region(region_id)
    again = session.add_region(_attach(client_region))  # the same file, a new id
    assert again != region_id
    with pytest.raises(InvalidArgumentError, match=f"region {region_id} is not registered"):
        session.region("shm", pb.SharedMemorySlice(region_id=region_id))
    assert session.region("shm", pb.SharedMemorySlice(region_id=again)) is not None
    with pytest.raises(InvalidArgumentError, match="region 99 is not registered"):
        session.region("shm", pb.SharedMemorySlice(region_id=99))
    other = Session("o", "other", max_residuals=1, max_regions=1)
    try:
        with pytest.raises(InvalidArgumentError, match="not registered in this session"):
            other.region("shm", pb.SharedMemorySlice(region_id=again))
    finally:
        other.close()


def test_a_write_into_a_released_region_is_refused(
        client_region: SharedMemoryRegion, session: Session) -> None:
    region_id = session.add_region(_attach(client_region))
    where = pb.SharedMemorySlice(region_id=region_id, nbytes=64)
    region = session.region("shm", where)
    session.release_region(region_id)
    with pytest.raises(InvalidArgumentError, match="was released while the call ran"):
        with session.writing(region, where):
            pass
    with pytest.raises(InvalidArgumentError, match="not registered"):
        session.release_region(region_id)


def test_the_region_cap_closes_the_region_it_refuses(
        client_region: SharedMemoryRegion, session: Session) -> None:
    session.add_region(_attach(client_region))
    session.add_region(_attach(client_region))
    third = _attach(client_region)
    with pytest.raises(ResourceExhaustedError, match="already maps 2 regions"):
        session.add_region(third)
    assert third.region.closed


@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None,
                    reason="cupy is installed here: covered by the gpu tests")
def test_without_cuda_ipc_support_device_regions_and_slices_are_refused(
        session: Session) -> None:
    with pytest.raises(InvalidArgumentError, match="no CUDA IPC support.*shared memory"):
        CudaIpcWorkerRegion.open(bytes(64), 2 << 20, "GPU-8f6a2c1e-1b2d-4c3e-9f10-0a1b2c3d4e5f",
                                 max_tensor_bytes=MAX_TENSOR_BYTES)
    with pytest.raises(InvalidArgumentError, match="no CUDA IPC support"):
        session.region("cuda_ipc", pb.CudaIpcSlice(region_id=1))
