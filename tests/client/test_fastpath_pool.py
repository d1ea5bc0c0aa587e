"""Tensors born in shared memory (``worker.empty``; Note [Tensors born in shared memory] in
client/_codec.py) with a real worker: no copy on the way in, lifetimes, misuse."""

from __future__ import annotations

import errno
import gc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from support.memory import pretend_machine
from support.workers import WorkerProcess

from torch_jax_interop.client import InvalidArgumentError, _data_plane as client_data_plane, connect
from torch_jax_interop.errors import PoolExhaustedError, SharedMemoryFullError, TransportError


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The requests the client sends on the data plane, as sent."""
    requests: list[Any] = []
    original = client_data_plane.DataPlaneConnection.request

    def spy(self: Any, name: str, request: Any, timeout: float, what: str,
            **options: Any) -> Any:
        requests.append(request)
        return original(self, name, request, timeout, what, **options)

    monkeypatch.setattr(client_data_plane.DataPlaneConnection, "request", spy)
    return requests


@pytest.fixture
def w(worker: WorkerProcess) -> Iterator[Any]:
    with connect(worker.address) as connection:
        yield connection


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.bool, torch.int8,
                                   torch.complex64, torch.float64])
@pytest.mark.parametrize("shape", [(), (0, 3), (7,), (33, 65)])
def test_a_pooled_input_is_sent_as_its_own_slice(w: Any, sent: list[Any], dtype: torch.dtype,
                                                 shape: tuple[int, ...]) -> None:
    x = w.empty(shape, dtype=dtype)
    assert x.shape == shape and x.dtype == dtype and x.is_contiguous()
    x.copy_(torch.randn(shape).to(dtype) if dtype is not torch.bool
            else torch.randn(shape) > 0)
    before = (w.stats.shared_memory_bytes, w.stats.inline_bytes, w.stats.zero_copy_bytes)
    y = w.function("identity")(x)
    assert torch.equal(y, x)
    nbytes = x.numel() * x.element_size()
    copied = (w.stats.shared_memory_bytes - before[0], w.stats.inline_bytes - before[1])
    if nbytes:
        assert copied == (0, 0)  # the client copied nothing
        assert w.stats.zero_copy_bytes - before[2] == nbytes
        region_id, offset = w._current().pool.locate(x.data_ptr(), nbytes)
        descriptor = sent[-1].args.leaves[0].shm
        assert (descriptor.region_id, descriptor.offset, descriptor.nbytes) == (
            region_id, offset, nbytes)


def test_the_slice_stays_reserved_while_the_tensor_or_a_view_lives(w: Any) -> None:
    pool = w._current().pool
    w.empty(1)  # the first region exists
    used = pool.used_bytes
    x = w.empty(1 << 16)
    assert pool.used_bytes >= used + (1 << 18)
    view = x[1024:]
    del x
    gc.collect()
    assert pool.used_bytes >= used + (1 << 18)
    del view
    gc.collect()
    assert pool.used_bytes == used


def test_residuals_pin_a_pooled_input_and_refuse_an_in_place_change(w: Any) -> None:
    pool = w._current().pool
    w.empty(1)
    used = pool.used_bytes
    params = torch.randn(1 << 14, dtype=torch.float32, requires_grad=True)
    x = w.empty(1 << 14, dtype=torch.float32)
    x.copy_(torch.randn(1 << 14, dtype=torch.float32))
    expected = x.clone()
    out = w.function("scale")(params, x)
    del x
    gc.collect()
    assert pool.used_bytes > used  # the worker's residuals may view it: still reserved
    out.sum().backward()
    assert torch.equal(params.grad, expected)
    del out
    gc.collect()
    assert pool.used_bytes == used

    y = w.empty(8, dtype=torch.float32)
    y.fill_(2.0)
    p = torch.ones(8, dtype=torch.float32, requires_grad=True)
    out = w.function("scale")(p, y)
    y.add_(1.0)
    with pytest.raises(InvalidArgumentError, match="modified in place after the forward"):
        out.sum().backward()


def test_unaligned_and_non_contiguous_views_are_copied(w: Any, sent: list[Any]) -> None:
    x = w.empty(64, 64)
    x.copy_(torch.randn(64, 64))
    for view in (x.view(-1)[1:], x.t(), x[:, 1:]):
        before = w.stats.zero_copy_bytes
        assert torch.equal(w.function("identity")(view), view)
        assert w.stats.zero_copy_bytes == before  # copied, not sent in place
    aligned = x[16:]  # 16 rows of 256 bytes: a 64-byte aligned offset, contiguous
    before = w.stats.zero_copy_bytes
    assert torch.equal(w.function("identity")(aligned), aligned)
    assert w.stats.zero_copy_bytes == before + aligned.numel() * 4


def test_outputs_fed_back_are_not_copied_again(w: Any) -> None:
    y = w.function("identity")(torch.randn(1 << 16))  # lands in the client's arena
    before = (w.stats.shared_memory_bytes, w.stats.zero_copy_bytes)
    z = w.function("add_one")(y)
    assert torch.equal(z, y + 1)
    assert w.stats.shared_memory_bytes == before[0]
    assert w.stats.zero_copy_bytes == before[1] + y.numel() * 4


def test_a_session_without_a_pool_refuses_empty_and_bad_arguments(worker: WorkerProcess) -> None:
    with connect(worker.address, transport="inline") as w:
        with pytest.raises(TransportError, match="no shared-memory pool.*torch.empty"):
            w.empty(4)
    with connect(worker.address) as w:
        with pytest.raises(TypeError, match="cannot be sent"):
            w.empty(4, dtype=torch.quint8)
        with pytest.raises(ValueError, match=r"shape \(2, -1\) has a negative size"):
            w.empty(2, -1)
        assert torch.equal(w.zeros(3), torch.zeros(3))
        like = w.empty_like(torch.ones(2, 5, dtype=torch.float16))
        assert like.shape == (2, 5) and like.dtype == torch.float16


def test_a_tensor_the_memory_cannot_hold_is_refused_and_the_session_goes_on(
        w: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Note [Regions are memory]: ``empty`` and a call's input past the memory left get a
    clear error (not the OOM killer); nothing is kept, and calls that fit still work. The
    memory figures are this test's files (``support.memory``): 100 MiB available."""
    identity = w.function("identity")
    small = torch.arange(1 << 16, dtype=torch.float32)  # 256 KiB: through the pool
    assert torch.equal(identity(small), small)
    pool = w._current().pool
    regions, total = pool.num_regions, pool.total_bytes
    pretend_machine(tmp_path, monkeypatch, available_kib=100 * 1024)
    with pytest.raises(SharedMemoryFullError, match=r"region of 200\.0 MiB.*OOM killer") as info:
        w.empty(50 << 20)  # 200 MiB of float32
    assert info.value.errno == errno.ENOMEM
    big = torch.zeros(50 << 20)
    with pytest.raises(SharedMemoryFullError, match="smaller tensors"):
        identity(big)
    assert (pool.num_regions, pool.total_bytes) == (regions, total)
    assert torch.equal(identity(small + 1), small + 1)  # the session and the worker go on
    # 34 MiB fits in the 36 MiB left after the reserve (64 MiB: 1/32 of the 2 GiB), though
    # its power of two (64 MiB) does not: the region is made just big enough
    fits = w.empty(34 << 18)
    fits.copy_(torch.arange(fits.numel(), dtype=torch.float32))
    assert pool.total_bytes == total + (34 << 20)
    assert torch.equal(identity(fits), fits)


def test_max_pool_bytes_bounds_the_sessions_shared_memory(worker: WorkerProcess) -> None:
    """``connect(max_pool_bytes=)``: inputs, arenas and ``empty`` together stay under it;
    regions no tensor uses are dropped to make room; past it a clear error naming the
    option, and the pool is usable again once its tensors are collected."""
    with pytest.raises(ValueError, match="max_pool_bytes=0 must be None"):
        connect(worker.address, max_pool_bytes=0)
    limit = 4 << 20
    with connect(worker.address, max_pool_bytes=limit) as w:
        pool = w._current().pool
        identity = w.function("identity")
        x = torch.arange(1 << 18, dtype=torch.float32)  # 1 MiB: an input copy and an arena
        assert torch.equal(identity(x), x)
        gc.collect()
        before = set(pool.region_ids)
        # 3 MiB fits under the limit only once the call's idle regions are dropped
        held = w.empty(3 << 18)
        assert before - set(pool.region_ids) and pool.total_bytes <= limit
        with pytest.raises(PoolExhaustedError, match=r"connect\(max_pool_bytes=\.\.\.\) "
                                                     r"limit of 4194304 bytes"):
            w.empty(2 << 18)
        with pytest.raises(PoolExhaustedError, match="max_pool_bytes"):
            identity(x)  # 1 MiB in, 1 MiB out: no room beside `held`
        assert pool.total_bytes <= limit
        del held
        gc.collect()
        assert torch.equal(identity(x), x)  # room again
        assert pool.total_bytes <= limit
