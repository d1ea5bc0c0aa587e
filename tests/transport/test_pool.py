"""SharedMemoryPool and RegionSlice, on the real /dev/shm, with real attaching workers.

The "worker" is either a second interpreter (``_WorkerProcess``) or, for the many tests
about the pool's own bookkeeping, ``_InProcessWorker``, which attaches each region the same
way (``SharedMemoryRegion.attach``) from this process. Every test must leave no ``tji-*``
entry of this process or its children behind (``_no_leaked_regions``).
"""

from __future__ import annotations

import gc
import hashlib
import itertools
import os
import random
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from torch_jax_interop._errors import (
    PoolExhaustedError,
    SharedMemoryFullError,
    SliceOutOfBoundsError,
    TransportError,
)
from torch_jax_interop.transport import (
    NAME_PATTERN,
    Pool,
    PoolSlice,
    RegionSlice,
    SharedMemoryPool,
    SharedMemoryRegion,
    check_slice,
)
from torch_jax_interop.transport._pool import BufferKind

SHM = "/dev/shm"
MakePool = Callable[..., SharedMemoryPool]
KiB = 1024
_OUR_PIDS: set[int] = {os.getpid()}

pytestmark = pytest.mark.skipif(not os.path.isdir(SHM), reason="needs /dev/shm (Linux)")


def _ours() -> set[str]:
    found = set()
    for name in os.listdir(SHM):
        match = NAME_PATTERN.fullmatch(name)
        if match is not None and int(match.group(1)) in _OUR_PIDS:
            found.add(name)
    return found


@pytest.fixture(autouse=True)
def _no_leaked_regions() -> Iterator[None]:
    before = _ours()
    yield
    gc.collect()
    leaked = _ours() - before
    for name in leaked:
        os.unlink(os.path.join(SHM, name))
    assert not leaked, f"the test left shared-memory entries behind: {sorted(leaked)}"


class _InProcessWorker:
    """Attaches every region it is asked to register, like the real worker does."""

    def __init__(self) -> None:
        self.regions: dict[int, SharedMemoryRegion] = {}
        self.names_at_registration: list[str] = []
        self.unregistered: list[int] = []
        self._lock = threading.Lock()
        self._ids = itertools.count(1)

    def register(self, region: SharedMemoryRegion) -> int:
        attached = SharedMemoryRegion.attach(region.name, region.size,
                                             directory=region.directory)
        with self._lock:
            region_id = next(self._ids)
            self.regions[region_id] = attached
            self.names_at_registration.append(region.name)
        return region_id

    def unregister(self, region_id: int) -> None:
        with self._lock:
            self.regions.pop(region_id).close()
            self.unregistered.append(region_id)

    def close(self) -> None:
        for region in self.regions.values():
            region.close()


@pytest.fixture
def worker() -> Iterator[_InProcessWorker]:
    w = _InProcessWorker()
    yield w
    w.close()


@pytest.fixture
def make_pool(worker: _InProcessWorker) -> Iterator[MakePool]:
    pools: list[SharedMemoryPool] = []

    def make(**kwargs: object) -> SharedMemoryPool:
        pool = SharedMemoryPool(worker.register, **kwargs)  # type: ignore[arg-type]
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.close()


# -- with a worker in another process -------------------------------------------------------

_WORKER_SCRIPT = """
    import sys
    import numpy as np
    from torch_jax_interop.transport import SharedMemoryRegion, check_slice, numpy_view

    regions = {}
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "attach":
            regions[len(regions) + 1] = SharedMemoryRegion.attach(args[0], int(args[1]))
            print(len(regions), flush=True)
        elif cmd == "sum":
            region_id, offset, count = map(int, args)
            region = regions[region_id]
            check_slice(region.size, offset, count * 8)
            print(float(numpy_view(region.buffer, offset, np.float64, (count,)).sum()),
                  flush=True)
        elif cmd == "exit":
            break
    for region in regions.values():
        region.close()
"""


class _WorkerProcess:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(_WORKER_SCRIPT)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        _OUR_PIDS.add(self.proc.pid)
        self.lock = threading.Lock()

    def ask(self, request: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        with self.lock:
            self.proc.stdin.write(request + "\n")
            self.proc.stdin.flush()
            return self.proc.stdout.readline().strip()

    def register(self, region: SharedMemoryRegion) -> int:
        return int(self.ask(f"attach {region.name} {region.size}"))

    def finish(self) -> int:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("exit\n")
        self.proc.stdin.close()
        self.proc.stdout.close()
        return self.proc.wait(timeout=60)


def test_pool_with_a_worker_process_unlinks_after_register() -> None:
    remote = _WorkerProcess()
    try:
        with SharedMemoryPool(remote.register, min_region_bytes=64 * KiB) as pool:
            slices = [pool.allocate(n * 8) for n in (10, 1000, 20_000)]  # 3rd: a new region
            assert pool.num_regions == 2
            assert _ours() == set()  # registered, then unlinked: nothing left to leak
            for n, piece in zip((10, 1000, 20_000), slices, strict=True):
                values = piece.numpy(np.float64, (n,))
                values[:] = np.arange(n)
                answer = remote.ask(f"sum {piece.region_id} {piece.offset} {n}")
                assert float(answer) == float(np.arange(n).sum())
                del values
                piece.release()
    finally:
        assert remote.finish() == 0


def test_exit_of_a_process_with_an_open_pool_leaves_nothing(
    run_python: Callable[..., subprocess.CompletedProcess[str]],
) -> None:
    done = run_python(
        """
        import os
        from torch_jax_interop.transport import SharedMemoryPool, SharedMemoryRegion

        kept = []
        def register(region):
            kept.append(SharedMemoryRegion.attach(region.name, region.size))
            return len(kept)

        pool = SharedMemoryPool(register, min_region_bytes=65536, unlink_after_register=False)
        pieces = [pool.allocate(50_000) for _ in range(3)]
        print(os.getpid())
        for piece in pieces:
            assert os.path.exists(piece.region.path)  # still named: unlink_after_register off
        # no close(): the pool's finalizer must unlink at exit
        """
    )
    assert done.returncode == 0, done.stderr
    pid = int(done.stdout.split()[0])
    assert not [n for n in os.listdir(SHM) if n.startswith(f"tji-{pid}-")]


# -- allocation -----------------------------------------------------------------------------


def test_allocations_are_aligned_disjoint_and_inside_their_region(make_pool: MakePool) -> None:
    pool = make_pool(min_region_bytes=64 * KiB)
    sizes = [0, 1, 63, 64, 65, 100, 4096, 12_345, 0, 7]
    pieces = [pool.allocate(n) for n in sizes]
    spans = []
    for n, piece in zip(sizes, pieces, strict=True):
        assert piece.nbytes == n
        assert piece.offset % 64 == 0
        check_slice(piece.region.size, piece.offset, piece.nbytes)
        assert len(piece.memoryview()) == n
        spans.append((piece.region_id, piece.offset, piece.offset + max(n, 1)))
    spans.sort()
    for (r1, _, end1), (r2, start2, _) in zip(spans, spans[1:], strict=False):
        assert r1 != r2 or end1 <= start2
    assert len({(piece.region_id, piece.offset) for piece in pieces}) == len(pieces)
    assert pool.used_bytes == sum(max(64, -(-n // 64) * 64) for n in sizes)


def test_zero_byte_slice_is_valid(make_pool: MakePool) -> None:
    pool = make_pool()
    piece = pool.allocate(0)
    assert piece.nbytes == 0 and piece.offset % 64 == 0
    check_slice(piece.region.size, piece.offset, 0)
    assert piece.numpy(np.float32, (0, 3)).shape == (0, 3)
    with pytest.raises(ValueError, match="`nbytes` must be >= 0"):
        pool.allocate(-1)


def test_memory_is_shared_with_the_worker(make_pool: MakePool, worker: _InProcessWorker) -> None:
    pool = make_pool()
    piece = pool.allocate(4000)
    values = piece.numpy(np.int32, (1000,))
    values[:] = np.arange(1000)
    seen = np.frombuffer(worker.regions[piece.region_id].buffer, np.int32, 1000, piece.offset)
    assert seen.tolist() == list(range(1000))
    assert values.ctypes.data == np.frombuffer(piece.region.buffer, np.uint8).ctypes.data \
        + piece.offset
    del values, seen


def test_reuse_after_release(make_pool: MakePool) -> None:
    pool = make_pool(min_region_bytes=64 * KiB)
    first = pool.allocate(1000)
    where = (first.region_id, first.offset)
    first.release()
    first.release()  # idempotent
    assert first.released and pool.used_bytes == 0
    second = pool.allocate(1000)
    assert (second.region_id, second.offset) == where
    first.release()  # must not free the bytes that now belong to `second`
    assert pool.used_bytes == 1024 and not second.released
    assert pool.num_regions == 1
    with pytest.raises(TransportError, match="was released"):
        first.memoryview()


def test_free_blocks_coalesce(make_pool: MakePool) -> None:
    pool = make_pool(min_region_bytes=64 * KiB)
    quarters = [pool.allocate(16 * KiB) for _ in range(4)]
    assert pool.num_regions == 1 and pool.used_bytes == 64 * KiB
    for i in (0, 2, 1, 3):  # neighbours on both sides get merged
        quarters[i].release()
    whole = pool.allocate(64 * KiB)
    assert pool.num_regions == 1 and whole.offset == 0
    whole.release()
    # released middle-first: left, right, then the middle joins all three
    thirds = [pool.allocate(16 * KiB) for _ in range(3)]
    for i in (1, 0, 2):
        thirds[i].release()
    assert pool.allocate(64 * KiB).offset == 0
    assert pool.num_regions == 1


def test_a_new_region_holds_the_next_power_of_two(
    make_pool: MakePool, worker: _InProcessWorker
) -> None:
    pool = make_pool(min_region_bytes=64 * KiB)
    small = pool.allocate(10)
    big = pool.allocate(100_000)
    assert pool.num_regions == 2
    assert small.region.size == 64 * KiB
    assert big.region.size == 131_072 and big.offset == 0
    assert pool.total_bytes == 64 * KiB + 131_072
    assert worker.names_at_registration == [small.region.name, big.region.name]


def test_slice_numpy_checks_the_size(make_pool: MakePool) -> None:
    pool = make_pool()
    piece = pool.allocate(100)
    assert piece.numpy(np.float64, (12,)).shape == (12,)
    with pytest.raises(SliceOutOfBoundsError, match="needs 104 bytes"):
        piece.numpy(np.float64, (13,))


# -- lifetime -------------------------------------------------------------------------------


def test_release_when_collected(make_pool: MakePool) -> None:
    pool = make_pool()
    piece = pool.allocate(4096)
    array = piece.numpy(np.float32, (1024,))
    piece.release_when_collected(array)
    del array
    assert piece.released and pool.used_bytes == 0


def test_release_when_collected_waits_for_derived_views(make_pool: MakePool) -> None:
    # numpy points a view's .base at the first non-ndarray base, so a view (and a
    # torch.from_numpy tensor of a view) can outlive the array it was cut from: the slice
    # must stay taken until the last of them dies, or the pool would hand its bytes out.
    pool = make_pool()
    piece = pool.allocate(4096)
    array = piece.numpy(np.uint8, (4096,))
    piece.release_when_collected(array)
    derived = array[64:128].view(np.float64).reshape(2, 4)[1:]
    another = piece.numpy(np.int32, (16,))  # same slice, another call
    del array
    gc.collect()
    assert not piece.released and pool.used_bytes == 4096
    derived[:] = 1.5
    del derived
    gc.collect()
    assert not piece.released
    del another
    assert piece.released and pool.used_bytes == 0


def test_slice_numpy_is_zero_copy(make_pool: MakePool) -> None:
    pool = make_pool()
    pool.allocate(100)
    piece = pool.allocate(4096)
    region_address = np.frombuffer(piece.region.buffer, np.uint8).ctypes.data
    for dtype, shape in [(np.float32, ()), (np.float64, (0, 5)), (np.int16, (4, 8)),
                         (np.complex64, (3,))]:
        array = piece.numpy(dtype, shape)
        assert array.shape == shape and array.dtype == np.dtype(dtype)
        assert array.flags.c_contiguous and array.flags.writeable and array.flags.aligned
        assert array.ctypes.data == region_address + piece.offset
        del array


def test_release_inside_a_critical_section_is_deferred_not_deadlocked(make_pool: MakePool) -> None:
    # A weakref finalizer can fire in a thread that holds the pool's lock (GC runs
    # anywhere); the release must be queued, not deadlock or corrupt the free list.
    pool = make_pool()
    piece = pool.allocate(64)
    with pool._locked():
        piece.release()
        assert not piece.released
    assert piece.released and pool.used_bytes == 0


def test_close_unlinks_and_unmaps_everything(make_pool: MakePool) -> None:
    pool = make_pool(min_region_bytes=64 * KiB, unlink_after_register=False)
    pieces = [pool.allocate(50 * KiB) for _ in range(3)]
    regions = [piece.region for piece in pieces]
    assert {r.name for r in regions} <= _ours()  # still named: unlink_after_register off
    pool.close()
    pool.close()
    assert pool.closed and pool.num_regions == 0 and pool.total_bytes == 0
    assert not {r.name for r in regions} & _ours()
    assert all(r.closed for r in regions)
    for piece in pieces:
        piece.release()  # harmless after close
    with pytest.raises(TransportError, match="pool is closed"):
        pool.allocate(1)


def test_collecting_an_unclosed_pool_unlinks_everything(worker: _InProcessWorker) -> None:
    pool = SharedMemoryPool(worker.register, min_region_bytes=64 * KiB,
                            unlink_after_register=False)
    names = {pool.allocate(50 * KiB).region.name for _ in range(2)}
    assert names <= _ours()
    del pool
    gc.collect()
    assert not names & _ours()


def test_release_region(make_pool: MakePool, worker: _InProcessWorker) -> None:
    pool = make_pool(min_region_bytes=64 * KiB)
    piece = pool.allocate(100)
    array = piece.numpy(np.uint8, (100,))
    pool.release_region(piece.region_id)
    assert pool.num_regions == 0 and piece.region.closed
    array[:] = 5  # the mapping lives on under the view
    piece.release()  # inert
    assert pool.allocate(100).region_id == 2
    with pytest.raises(KeyError, match="no region with id 99"):
        pool.release_region(99)
    del array


def test_register_failure_unlinks_and_closes(make_pool: MakePool, worker: _InProcessWorker) -> None:
    seen: list[SharedMemoryRegion] = []

    def refuse(region: SharedMemoryRegion) -> tuple[int, int]:
        seen.append(region)
        assert os.path.exists(region.path)  # the worker gets to see a named file
        raise ConnectionError("worker went away")

    with SharedMemoryPool(refuse) as pool:
        with pytest.raises(ConnectionError, match="worker went away"):
            pool.allocate(100)
        assert pool.num_regions == 0 and pool.total_bytes == 0
    assert seen and seen[0].closed and not os.path.exists(seen[0].path)


def test_max_total_bytes(make_pool: MakePool) -> None:
    pool = make_pool(min_region_bytes=64 * KiB, max_total_bytes=96 * KiB)
    first = pool.allocate(64 * KiB)
    # A full-size region would pass the limit: the pool makes a region just big enough.
    second = pool.allocate(16 * KiB)
    assert second.region.size == 16 * KiB and pool.total_bytes == 80 * KiB
    with pytest.raises(PoolExhaustedError, match=r"`max_total_bytes` limit of 98304 bytes"):
        pool.allocate(32 * KiB)
    first.release()
    assert pool.allocate(32 * KiB).region_id == first.region_id
    with pytest.raises(ValueError, match="`max_total_bytes` must be positive"):
        SharedMemoryPool(lambda region: 1, max_total_bytes=0)


@pytest.mark.parametrize("with_unregister", [True, False])
def test_at_the_limit_idle_regions_are_dropped_to_make_room(
        make_pool: MakePool, worker: _InProcessWorker, with_unregister: bool) -> None:
    pool = make_pool(min_region_bytes=64 * KiB, max_total_bytes=192 * KiB,
                     unregister=worker.unregister if with_unregister else None)
    kept = pool.allocate(64 * KiB)
    kept.numpy(np.uint8, (64 * KiB,))[:] = 7
    idle = pool.allocate(64 * KiB)  # a second region: the first is full
    idle_region = idle.region_id
    idle.release()
    if not with_unregister:  # nobody to tell the worker: the pool keeps every region
        with pytest.raises(PoolExhaustedError, match="limit of 196608 bytes"):
            pool.allocate(128 * KiB)
        return
    big = pool.allocate(128 * KiB)  # fits once the idle region is dropped
    assert worker.unregistered == [idle_region] and idle_region not in pool.region_ids
    assert pool.total_bytes == 192 * KiB and big.region_id != idle_region
    assert (kept.numpy(np.uint8, (64 * KiB,)) == 7).all()  # a used region is never dropped
    with pytest.raises(PoolExhaustedError, match=r"\(196608 bytes in 2 regions, 196608 in use\)"):
        pool.allocate(64 * KiB)  # nothing idle: the limit's error, nothing dropped
    assert worker.unregistered == [idle_region] and pool.num_regions == 2


def test_full_dev_shm_through_the_pool(worker: _InProcessWorker) -> None:
    if shutil.which("mount") is None:
        pytest.skip("no `mount` command to make a small tmpfs")
    path = tempfile.mkdtemp(prefix="tji-tiny-")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", path],
                          capture_output=True, text=True)
    if done.returncode != 0:
        os.rmdir(path)
        pytest.skip(f"cannot mount a tmpfs here (needs root/CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        with SharedMemoryPool(worker.register, directory=path) as pool:
            with pytest.raises(SharedMemoryFullError, match="shm_size"):
                pool.allocate(100)  # the default 8 MiB region does not fit in 1 MiB
            assert worker.regions == {} and os.listdir(path) == []
            assert pool.num_regions == 0
        with SharedMemoryPool(worker.register, directory=path,
                              min_region_bytes=64 * KiB) as pool:
            assert pool.allocate(100).region.size == 64 * KiB
            assert os.listdir(path) == []  # registered, then unlinked
    finally:
        worker.close()  # its mappings keep the tmpfs busy
        _unmount(path)


def _unmount(path: str) -> None:
    """Unmount a test tmpfs; if a mapping still pins it, detach it anyway and fail."""
    done = subprocess.run(["umount", path], capture_output=True, text=True)
    if done.returncode != 0:
        subprocess.run(["umount", "-l", path], check=True)
    os.rmdir(path)
    assert done.returncode == 0, f"the test tmpfs was still in use: {done.stderr.strip()}"


# -- threads --------------------------------------------------------------------------------


def test_concurrent_allocate_and_release_from_8_threads(make_pool: MakePool) -> None:
    pool = make_pool(min_region_bytes=256 * KiB)
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def work(seed: int) -> None:
        rng = random.Random(seed)
        held: list[tuple[RegionSlice, bytes, bytes]] = []
        try:
            start.wait()
            for step in range(150):
                n = rng.choice([0, 1, 64, 1000, rng.randrange(1, 64 * KiB)])
                piece = pool.allocate(n)
                payload = rng.randbytes(n)
                piece.memoryview()[:] = payload
                held.append((piece, payload, hashlib.sha256(payload).digest()))
                if len(held) > 6 or step % 5 == 0:
                    old, old_payload, digest = held.pop(rng.randrange(len(held)))
                    data = bytes(old.memoryview())
                    assert hashlib.sha256(data).digest() == digest, "another thread overwrote it"
                    if rng.random() < 0.5:
                        old.release()
                    else:
                        array = old.numpy(np.uint8, (old.nbytes,))
                        old.release_when_collected(array)
                        del array
            for piece, _, digest in held:
                assert hashlib.sha256(bytes(piece.memoryview())).digest() == digest
                piece.release()
        except BaseException as err:  # noqa: BLE001 - reported by the main thread
            errors.append(err)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors[0]
    gc.collect()
    assert pool.used_bytes == 0
    assert pool.num_regions >= 1


# -- the release scheme (Note [Releasing from finalizers] in transport/_pool.py) --------------


class _Cycle:
    """Holds an object in a reference cycle, so that only the cyclic GC frees it."""

    def __init__(self, payload: object) -> None:
        self.payload = payload
        self.me = self


def test_a_finalizer_release_inside_the_pools_own_critical_section_is_queued(
    make_pool: MakePool,
) -> None:
    # The GC runs a release_when_collected finalizer in the very thread that holds the pool
    # lock: it must neither deadlock (the lock is not reentrant) nor touch the free list
    # mid-update; the holder applies it when its critical section ends.
    pool = make_pool()
    piece = pool.allocate(4096)
    array = piece.numpy(np.float32, (1024,))
    finalizer = piece.release_when_collected(array)
    _Cycle(array)
    del array
    gc.disable()  # only the collect() below may run the finalizer
    try:
        with pool._locked():
            gc.collect()
            assert not finalizer.alive  # it ran, here, under the lock
            assert not piece.released and pool._state.regions[piece.region_id].used == 4096
    finally:
        gc.enable()
    assert piece.released and pool.used_bytes == 0


def test_a_release_while_another_thread_holds_the_lock_does_not_wait(
    make_pool: MakePool,
) -> None:
    pool = make_pool()
    piece = pool.allocate(100)
    done = threading.Event()

    def release() -> None:
        piece.release()  # from a finalizer this must never block on the pool lock
        done.set()

    with pool._locked():
        thread = threading.Thread(target=release)
        thread.start()
        returned = done.wait(timeout=10)
        assert not piece.released  # queued: the holder applies it
    thread.join(timeout=10)
    assert returned, "release() waited for a lock held by another thread"
    assert piece.released and pool.used_bytes == 0


def test_no_release_waits_for_a_later_allocation(make_pool: MakePool) -> None:
    # Releases race with critical sections of other threads; once every thread is done,
    # every released slice is back, without any further call into the pool (reading only
    # `released` and the free lists, not the pool's properties, which would drain).
    pool = make_pool(min_region_bytes=256 * KiB)
    pieces = [pool.allocate(64) for _ in range(2000)]
    start = threading.Barrier(3)

    def churn() -> None:
        start.wait()
        for _ in range(2000):
            pool.allocate(64).release()

    def give_back(mine: list[RegionSlice]) -> None:
        start.wait()
        for piece in mine:
            piece.release()

    threads = [threading.Thread(target=churn),
               threading.Thread(target=give_back, args=(pieces[::2],)),
               threading.Thread(target=give_back, args=(pieces[1::2],))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert all(piece.released for piece in pieces)
    assert not pool._pending
    assert sum(entry.used for entry in pool._state.regions.values()) == 0


# -- the generic pool over another buffer kind ---------------------------------------------


class _HostBuffer:
    def __init__(self, size: int) -> None:
        self.size = size
        self.data = bytearray(size)
        self.closed = False


class _HostKind(BufferKind[_HostBuffer]):
    """A buffer kind with CUDA IPC's layout (256-byte slices, 2 MiB buffers) in host memory."""

    name = "test"
    label = "test"
    alignment = 256
    granularity = 2 << 20

    def __init__(self) -> None:
        self.created: list[_HostBuffer] = []

    def create(self, size: int) -> _HostBuffer:
        buffer = _HostBuffer(size)
        self.created.append(buffer)
        return buffer

    def close(self, buffer: _HostBuffer) -> None:
        buffer.closed = True


class _HostPool(Pool[_HostBuffer, PoolSlice[_HostBuffer]]):
    slice_type = PoolSlice


def _host_pool(**kwargs: object) -> tuple[_HostPool, _HostKind, list[_HostBuffer]]:
    kind = _HostKind()
    registered: list[_HostBuffer] = []

    def register(buffer: _HostBuffer) -> int:
        registered.append(buffer)
        return len(registered)

    return _HostPool(kind, register, **kwargs), kind, registered  # type: ignore[arg-type]


def test_the_generic_pool_follows_its_kinds_alignment_and_granularity() -> None:
    pool, kind, registered = _host_pool(min_region_bytes=3 << 20)
    a, b = pool.allocate(1000), pool.allocate(0)
    assert registered == kind.created and len(registered) == 1
    assert registered[0].size == 4 << 20  # min_region_bytes rounded up to 2 MiB
    assert (a.offset, b.offset) == (0, 1024) and pool.used_bytes == 1024 + 256
    assert (a.region_id, a.kind) == (1, "test")
    big = pool.allocate(5 << 20)  # fits nowhere: a buffer of the request in 2 MiB multiples
    assert registered[1].size == 6 << 20 and big.offset == 0 and pool.region_ids == [1, 2]

    class Descriptor:
        region_id = offset = nbytes = -1

    message = Descriptor()
    big.fill(message)
    assert (message.region_id, message.offset, message.nbytes) == (2, 0, 5 << 20)
    a.release()
    assert pool.allocate(700).offset == 0  # reused
    pool.release_region(2)
    assert registered[1].closed and not registered[0].closed and pool.num_regions == 1
    big.release()  # inert: its buffer is gone
    pool.close()
    assert registered[0].closed and pool.closed
    with pytest.raises(TransportError, match="test pool is closed"):
        pool.allocate(1)


def test_the_generic_pool_closes_a_buffer_the_worker_refused_and_keeps_its_limit() -> None:
    kind = _HostKind()

    def refuse(buffer: _HostBuffer) -> tuple[int, int]:
        raise ConnectionError("worker went away")

    pool = _HostPool(kind, refuse, min_region_bytes=2 << 20)
    with pytest.raises(ConnectionError):
        pool.allocate(10)
    assert kind.created[0].closed and pool.num_regions == 0 and pool.total_bytes == 0
    limited, _, _ = _host_pool(min_region_bytes=4 << 20, max_total_bytes=6 << 20)
    limited.allocate(4 << 20)  # fills the first buffer
    # A full-size buffer would pass the limit: a buffer just big enough is made instead.
    assert limited.allocate(2 << 20).offset == 0 and limited.total_bytes == 6 << 20
    with pytest.raises(PoolExhaustedError, match="test pool would grow past"):
        limited.allocate(1)
