"""SharedMemoryRegion, check_slice, numpy_view and the janitor, on the real /dev/shm.

Cross-process tests run a second interpreter (``_Peer``) that talks over stdin/stdout
lines; nothing is mocked. Every test must leave no ``tji-*`` entry of this process or of
its children behind (checked by ``_no_leaked_regions``).
"""

from __future__ import annotations

import errno
import gc
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from torch_jax_interop._errors import (
    RegionRejectedError,
    SharedMemoryFullError,
    SliceOutOfBoundsError,
    TransportError,
)
from torch_jax_interop.transport import (
    NAME_PATTERN,
    SHM_DIR_ENV,
    SHM_PREFIX,
    SharedMemoryRegion,
    _shm,
    check_slice,
    cleanup_orphans,
    default_shm_dir,
    numpy_view,
)

SHM = "/dev/shm"
_OUR_PIDS: set[int] = {os.getpid()}
_ANY_REGION_NAME = re.compile(r"tji-\d+-[0-9a-f]{16}")

pytestmark = pytest.mark.skipif(not os.path.isdir(SHM), reason="needs /dev/shm (Linux)")


def _ours() -> set[str]:
    """Region-like entries in /dev/shm made by this process or a child it started."""
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
    for name in leaked:  # clean up so one failure does not cascade
        os.unlink(os.path.join(SHM, name))
    assert not leaked, f"the test left shared-memory entries behind: {sorted(leaked)}"


@pytest.fixture
def private_dir() -> Iterator[str]:
    """A private directory on the /dev/shm tmpfs, for tests that plant files."""
    path = tempfile.mkdtemp(prefix="tji-test-", dir=SHM)
    yield path
    shutil.rmtree(path)


class _Peer:
    """A second Python process running ``script``; speaks one line per request."""

    def __init__(self, script: str, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(script), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        _OUR_PIDS.add(self.proc.pid)

    def readline(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout=30)
            assert self.proc.stderr is not None
            raise AssertionError(f"peer exited ({self.proc.returncode}): {self.proc.stderr.read()}")
        return line.strip()

    def send(self, request: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(request + "\n")
        self.proc.stdin.flush()

    def ask(self, request: str) -> str:
        self.send(request)
        return self.readline()

    def finish(self) -> int:
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        return self.proc.wait(timeout=60)


# The worker side: attaches a region and answers requests about it.
_ATTACHER = """
    import sys
    import numpy as np
    from torch_jax_interop.transport import SharedMemoryRegion, numpy_view

    region = SharedMemoryRegion.attach(sys.argv[1], int(sys.argv[2]), directory=sys.argv[3])
    print("attached", flush=True)
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "sum":
            offset, count = map(int, args)
            print(float(numpy_view(region.buffer, offset, np.float64, (count,)).sum()), flush=True)
        elif cmd == "fill":
            offset, count, value = int(args[0]), int(args[1]), float(args[2])
            numpy_view(region.buffer, offset, np.float64, (count,))[:] = value
            print("filled", flush=True)
        elif cmd == "exit":
            break
    region.close()
    print("closed", flush=True)
"""

# The client side: creates a region, fills it, unlinks it when told to, then waits.
_CREATOR = """
    import sys, time
    import numpy as np
    from torch_jax_interop.transport import SharedMemoryRegion, numpy_view

    region = SharedMemoryRegion.create(int(sys.argv[1]), directory=sys.argv[2])
    numpy_view(region.buffer, 0, np.float64, (8,))[:] = np.arange(8)
    print(region.name, flush=True)
    for line in sys.stdin:
        if line.strip() == "unlink":
            region.unlink()
            print("unlinked", flush=True)
        elif line.strip() == "exit":
            break
    time.sleep(3600 if len(sys.argv) > 3 else 0)
"""


# -- create ---------------------------------------------------------------------------------


def test_name_pattern_and_prefix() -> None:
    with SharedMemoryRegion.create(4096) as region:
        assert region.name.startswith(SHM_PREFIX)
        match = NAME_PATTERN.fullmatch(region.name)
        assert match is not None and int(match.group(1)) == os.getpid()
        assert region.owner
        assert region.path == os.path.join(SHM, region.name)


def test_default_shm_dir(monkeypatch: pytest.MonkeyPatch, private_dir: str) -> None:
    monkeypatch.delenv(SHM_DIR_ENV, raising=False)
    assert default_shm_dir() == "/dev/shm"
    monkeypatch.setenv(SHM_DIR_ENV, private_dir)
    assert default_shm_dir() == private_dir
    with SharedMemoryRegion.create(4096) as region:
        assert os.path.dirname(region.path) == private_dir
        assert os.listdir(private_dir) == [region.name]
    assert os.listdir(private_dir) == []


def test_created_region_is_mode_0600_zeroed_and_sized() -> None:
    old_umask = os.umask(0)  # a permissive umask must not widen the mode
    try:
        region = SharedMemoryRegion.create(10_000)
    finally:
        os.umask(old_umask)
    with region:
        info = os.stat(region.path, follow_symlinks=False)
        assert stat.S_ISREG(info.st_mode)
        assert stat.S_IMODE(info.st_mode) == 0o600
        assert info.st_uid == os.getuid()
        assert info.st_size == 10_000
        # posix_fallocate reserved the blocks up front (no sparse file, no SIGBUS later)
        assert info.st_blocks * 512 >= 10_000
        assert len(region.buffer) == 10_000
        assert not region.buffer.readonly
        assert bytes(region.buffer) == bytes(10_000)


def test_create_uses_o_excl_and_never_opens_an_existing_file(
    monkeypatch: pytest.MonkeyPatch, private_dir: str
) -> None:
    # Plant a regular file and a dangling symlink under the first two names create() will
    # draw; O_EXCL | O_NOFOLLOW must skip both without touching them or their target.
    taken = [f"{SHM_PREFIX}{os.getpid()}-{'a' * 16}", f"{SHM_PREFIX}{os.getpid()}-{'b' * 16}"]
    with open(os.path.join(private_dir, taken[0]), "wb") as f:
        f.write(b"victim")
    target = os.path.join(private_dir, "symlink-target")
    os.symlink(target, os.path.join(private_dir, taken[1]))
    draws = iter(["a" * 16, "b" * 16, "c" * 16])
    monkeypatch.setattr(_shm.secrets, "token_hex", lambda n: next(draws))

    with SharedMemoryRegion.create(4096, directory=private_dir) as region:
        assert region.name == f"{SHM_PREFIX}{os.getpid()}-{'c' * 16}"
        with open(os.path.join(private_dir, taken[0]), "rb") as f:
            assert f.read() == b"victim"
        assert not os.path.exists(target)
    assert sorted(os.listdir(private_dir)) == sorted(taken)
    os.unlink(os.path.join(private_dir, taken[0]))
    os.unlink(os.path.join(private_dir, taken[1]))


@pytest.mark.parametrize("size", [0, -1, 2**63])
def test_create_rejects_bad_sizes(size: int) -> None:
    with pytest.raises(ValueError, match="`size` must be between 1 and 2\\*\\*63 - 1"):
        SharedMemoryRegion.create(size)


def test_create_in_missing_directory(private_dir: str) -> None:
    missing = os.path.join(private_dir, "nope")
    with pytest.raises(TransportError, match=f"`{re.escape(missing)}` does not exist"):
        SharedMemoryRegion.create(4096, directory=missing)


# -- full /dev/shm --------------------------------------------------------------------------


@pytest.fixture
def tiny_tmpfs() -> Iterator[str]:
    """A 1 MiB tmpfs, like a container's default-sized /dev/shm (needs mount rights)."""
    if shutil.which("mount") is None:
        pytest.skip("no `mount` command to make a small tmpfs")
    path = tempfile.mkdtemp(prefix="tji-tiny-")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", path],
        capture_output=True, text=True,
    )
    if done.returncode != 0:
        os.rmdir(path)
        pytest.skip(f"cannot mount a tmpfs here (needs root/CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        yield path
    finally:
        _unmount(path)


def _unmount(path: str) -> None:
    """Unmount a test tmpfs; if a mapping still pins it, detach it anyway and fail."""
    done = subprocess.run(["umount", path], capture_output=True, text=True)
    if done.returncode != 0:
        subprocess.run(["umount", "-l", path], check=True)
    os.rmdir(path)
    assert done.returncode == 0, f"the test tmpfs was still in use: {done.stderr.strip()}"


def _check_full_message(err: SharedMemoryFullError, directory: str, size: int) -> None:
    message = str(err)
    assert err.errno == errno.ENOSPC
    assert isinstance(err, OSError) and isinstance(err, TransportError)
    assert f"`{directory}`" in message
    assert f"({size} bytes)" in message
    assert "free of" in message
    for fix in ("shm_size", "--shm-size", SHM_DIR_ENV):
        assert fix in message


def test_full_tmpfs_raises_shared_memory_full_and_leaves_nothing(tiny_tmpfs: str) -> None:
    size = 4 << 20
    with pytest.raises(SharedMemoryFullError, match="shm_size") as info:
        SharedMemoryRegion.create(size, directory=tiny_tmpfs)
    _check_full_message(info.value, tiny_tmpfs, size)
    assert os.listdir(tiny_tmpfs) == []


def test_partially_full_tmpfs_fails_at_fallocate_not_sigbus(tiny_tmpfs: str) -> None:
    # The first region fits; the second only partly: posix_fallocate must fail cleanly
    # (the file existed already, so this is the remove-the-half-made-file path).
    with SharedMemoryRegion.create(600 << 10, directory=tiny_tmpfs) as first:
        with pytest.raises(SharedMemoryFullError, match="--shm-size"):
            SharedMemoryRegion.create(600 << 10, directory=tiny_tmpfs)
        assert os.listdir(tiny_tmpfs) == [first.name]
        first.buffer[-1] = 7  # the first region is fully backed
    assert os.listdir(tiny_tmpfs) == []


def test_absurd_size_on_real_dev_shm_is_a_clear_error() -> None:
    with pytest.raises(SharedMemoryFullError, match="TORCH_JAX_INTEROP_SHM_DIR"):
        SharedMemoryRegion.create(2**50)


# -- attach across processes ---------------------------------------------------------------


def test_create_attach_across_processes_and_unlink_after_register() -> None:
    region = SharedMemoryRegion.create(1 << 20)
    data = numpy_view(region.buffer, 0, np.float64, (1000,))
    data[:] = np.arange(1000)
    peer = _Peer(_ATTACHER, region.name, str(region.size), SHM)
    try:
        assert peer.readline() == "attached"
        # The worker has attached: the owner unlinks the name right away.
        region.unlink()
        assert not os.path.exists(region.path)
        assert region.name not in os.listdir(SHM)
        region.unlink()  # idempotent
        # Both mappings still work, in both directions.
        assert float(peer.ask("sum 0 1000")) == float(np.arange(1000).sum())
        data[:] = 2.0
        assert float(peer.ask("sum 0 1000")) == 2000.0
        assert peer.ask("fill 8192 16 3.5") == "filled"
        assert numpy_view(region.buffer, 8192, np.float64, (16,)).tolist() == [3.5] * 16
        assert peer.ask("exit") == "closed"
    finally:
        assert peer.finish() == 0
        del data
        region.close()


def test_sigkill_of_the_creator_after_unlink_leaves_nothing_and_memory_stays_valid() -> None:
    peer = _Peer(_CREATOR, str(1 << 20), SHM, "sleep")
    try:
        name = peer.readline()
        attached = SharedMemoryRegion.attach(name, 1 << 20)
        assert peer.ask("unlink") == "unlinked"
        peer.proc.send_signal(signal.SIGKILL)
        assert peer.proc.wait(timeout=30) == -signal.SIGKILL
        assert name not in os.listdir(SHM)
        # Our mapping outlives the owner.
        assert numpy_view(attached.buffer, 0, np.float64, (8,)).tolist() == list(range(8))
        attached.close()
    finally:
        peer.finish()


def test_normal_exit_of_creator_that_never_unlinked_leaves_nothing() -> None:
    peer = _Peer(_CREATOR, "4096", SHM)
    name = peer.readline()
    assert name in os.listdir(SHM)
    peer.send("exit")  # the region's finalizer unlinks it at interpreter exit
    assert peer.finish() == 0
    assert name not in os.listdir(SHM)


def test_collecting_an_owner_region_unlinks_its_name() -> None:
    region = SharedMemoryRegion.create(4096)
    path = region.path
    del region
    gc.collect()
    assert not os.path.exists(path)


# -- attach rejections ----------------------------------------------------------------------


def _other_names_in(message: str, allowed: str) -> list[str]:
    return [found for found in _ANY_REGION_NAME.findall(message) if found != allowed]


@pytest.fixture
def owned_region() -> Iterator[SharedMemoryRegion]:
    with SharedMemoryRegion.create(8192) as region:
        yield region


@pytest.mark.parametrize(
    "name",
    [
        "",
        "../x",
        "/etc/passwd",
        "../../etc/shadow",
        "psm_0123abcd",
        "tji-",
        "tji-123",
        "tji-123-0123456789abcde",  # 15 hex digits
        "tji-123-0123456789abcdef0",  # 17
        "tji-123-0123456789ABCDEF",  # upper case
        "tji-0-0123456789abcdef",  # pid 0
        "tji-012-0123456789abcdef",  # leading zero
        "tji--5-0123456789abcdef",
        "tji-123-0123456789abcdef/../../etc/passwd",
        "x/tji-123-0123456789abcdef",
        "tji-123-0123456789abcdef\n",
        "tji-123-0123456789abcdef\x00",
        "other-123-0123456789abcdef",
    ],
)
def test_attach_rejects_bad_names(name: str) -> None:
    with pytest.raises(RegionRejectedError, match="region name must look like") as info:
        SharedMemoryRegion.attach(name, 4096)
    assert isinstance(info.value, ValueError)
    assert repr(name)[:100] in str(info.value)


def test_attach_rejects_non_str_names() -> None:
    with pytest.raises(RegionRejectedError, match="region name must look like"):
        SharedMemoryRegion.attach(b"tji-123-0123456789abcdef", 4096)  # type: ignore[arg-type]


def test_attach_rejects_missing_region() -> None:
    name = f"{SHM_PREFIX}{os.getpid()}-{'d' * 16}"
    with pytest.raises(RegionRejectedError, match="no such region in `/dev/shm`"):
        SharedMemoryRegion.attach(name, 4096)


def test_attach_rejects_symlink_without_naming_its_target(
    owned_region: SharedMemoryRegion,
) -> None:
    link_name = f"{SHM_PREFIX}{os.getpid()}-{'e' * 16}"
    link = os.path.join(SHM, link_name)
    os.symlink(owned_region.path, link)
    try:
        with pytest.raises(RegionRejectedError, match="symbolic link") as info:
            SharedMemoryRegion.attach(link_name, 4096)
        message = str(info.value)
        assert owned_region.name not in message
        assert _other_names_in(message, link_name) == []
    finally:
        os.unlink(link)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o666, 0o601])
def test_attach_rejects_group_or_other_permission_bits(
    owned_region: SharedMemoryRegion, mode: int
) -> None:
    os.chmod(owned_region.path, mode)
    with pytest.raises(RegionRejectedError, match=f"mode is {mode:04o}.*mode 0600") as info:
        SharedMemoryRegion.attach(owned_region.name, 4096)
    assert _other_names_in(str(info.value), owned_region.name) == []


def test_attach_accepts_stricter_modes(owned_region: SharedMemoryRegion) -> None:
    os.chmod(owned_region.path, 0o400)  # root opens it anyway; a plain user would get EACCES
    if os.getuid() != 0:
        with pytest.raises(RegionRejectedError, match="cannot be opened"):
            SharedMemoryRegion.attach(owned_region.name, 4096)
        return
    SharedMemoryRegion.attach(owned_region.name, 4096).close()


def test_attach_rejects_another_users_file(owned_region: SharedMemoryRegion) -> None:
    if os.getuid() != 0:
        pytest.skip("changing a file's owner needs root")
    os.chown(owned_region.path, 65534, 65534)
    with pytest.raises(RegionRejectedError, match="belongs to uid 65534.*same user") as info:
        SharedMemoryRegion.attach(owned_region.name, 4096)
    assert _other_names_in(str(info.value), owned_region.name) == []


@pytest.mark.parametrize("size", [8193, 1 << 30])
def test_attach_rejects_a_file_smaller_than_registered(
    owned_region: SharedMemoryRegion, size: int
) -> None:
    with pytest.raises(RegionRejectedError, match=f"holds 8192 bytes but {size} were registered"):
        SharedMemoryRegion.attach(owned_region.name, size)


@pytest.mark.parametrize("size", [0, -4096, 2**64])
def test_attach_rejects_bad_sizes(owned_region: SharedMemoryRegion, size: int) -> None:
    with pytest.raises(RegionRejectedError, match="`size` must be between 1"):
        SharedMemoryRegion.attach(owned_region.name, size)


def test_attach_maps_only_the_registered_size(owned_region: SharedMemoryRegion) -> None:
    with SharedMemoryRegion.attach(owned_region.name, 100) as attached:
        assert not attached.owner
        assert attached.size == 100 and len(attached.buffer) == 100


def test_attach_rejects_directory_and_fifo(private_dir: str) -> None:
    as_dir = f"{SHM_PREFIX}{os.getpid()}-{'1' * 16}"
    as_fifo = f"{SHM_PREFIX}{os.getpid()}-{'2' * 16}"
    os.mkdir(os.path.join(private_dir, as_dir), 0o700)
    os.mkfifo(os.path.join(private_dir, as_fifo), 0o600)
    with pytest.raises(RegionRejectedError, match="cannot be opened"):
        SharedMemoryRegion.attach(as_dir, 4096, directory=private_dir)
    # O_NONBLOCK: a FIFO must be refused, not block the worker forever
    with pytest.raises(RegionRejectedError, match="not a regular file"):
        SharedMemoryRegion.attach(as_fifo, 4096, directory=private_dir)


def test_attacher_cannot_unlink(owned_region: SharedMemoryRegion) -> None:
    with SharedMemoryRegion.attach(owned_region.name, 4096) as attached:
        with pytest.raises(TransportError, match="only its owner unlinks it"):
            attached.unlink()
    assert os.path.exists(owned_region.path)


# -- close ----------------------------------------------------------------------------------


def test_close_is_idempotent_and_keeps_live_views_valid() -> None:
    region = SharedMemoryRegion.create(4096)
    view = numpy_view(region.buffer, 64, np.int32, (4,))
    direct = np.frombuffer(region.buffer, dtype=np.uint8)  # exports the region's own memoryview
    view[:] = [1, 2, 3, 4]
    region.unlink()
    region.close()
    region.close()
    assert region.closed
    with pytest.raises(TransportError, match="is closed"):
        _ = region.buffer
    # The mapping stays until the last view goes; reading and writing it is still safe.
    view[0] = 9
    assert view.tolist() == [9, 2, 3, 4]
    assert direct[64] == 9
    del view, direct
    gc.collect()


def test_close_without_views_unmaps() -> None:
    with SharedMemoryRegion.create(4096) as region:
        mapping = region._mmap
        assert mapping is not None
    assert mapping.closed


# -- check_slice ----------------------------------------------------------------------------


def _reference_ok(region_size: int, offset: int, nbytes: int, alignment: int) -> bool:
    """The obvious model, in unbounded integers."""
    return (
        min(region_size, offset, nbytes) >= 0
        and offset % alignment == 0
        and offset + nbytes <= region_size
    )


_interesting = st.one_of(
    st.integers(-300, 300),
    st.integers(2**64 - 300, 2**64 + 300),
    st.integers(2**63 - 300, 2**63 + 300),
    st.integers(2**32 - 300, 2**32 + 300),
    st.integers(0, 2**66),
    st.integers(0, 1 << 24).map(lambda n: n * 64),
    st.integers(-(2**65), -1),
)


@settings(max_examples=600, deadline=None)
@given(region_size=_interesting, offset=_interesting, nbytes=_interesting,
       alignment=st.sampled_from([1, 8, 64, 4096]))
def test_check_slice_matches_reference(
    region_size: int, offset: int, nbytes: int, alignment: int
) -> None:
    if _reference_ok(region_size, offset, nbytes, alignment):
        check_slice(region_size, offset, nbytes, alignment=alignment)
    else:
        with pytest.raises(SliceOutOfBoundsError):
            check_slice(region_size, offset, nbytes, alignment=alignment)


@pytest.mark.parametrize(
    ("region_size", "offset", "nbytes", "match"),
    [
        (4096, 64, 2**64 - 32, "runs past the end"),  # offset + nbytes wraps to 32 in uint64
        (4096, 2**64 - 64, 128, "beyond the end"),  # wraps to 64
        (2**64 - 1, 2**64 - 64, 64, "runs past the end"),  # ends at exactly 2**64
        (4096, 4096 - 64, 65, "runs past the end"),
        (4096, 4160, 0, "beyond the end"),
        (4096, 65, 1, "not a multiple of 64"),
        (4096, 32, 1, "not a multiple of 64"),
        (4096, -64, 1, "cannot be negative"),
        (4096, 0, -1, "cannot be negative"),
        (-1, 0, 0, "cannot be negative"),
        (4096, 64.0, 1, "`offset` must be an int"),
    ],
)
def test_check_slice_rejects(region_size: int, offset: int, nbytes: int, match: str) -> None:
    with pytest.raises(SliceOutOfBoundsError, match=match):
        check_slice(region_size, offset, nbytes)


@pytest.mark.parametrize(
    ("region_size", "offset", "nbytes"),
    [(4096, 0, 4096), (4096, 4096, 0), (4096, 4032, 64), (2**64 - 1, 2**64 - 128, 127),
     (0, 0, 0)],
)
def test_check_slice_accepts(region_size: int, offset: int, nbytes: int) -> None:
    check_slice(region_size, offset, nbytes)
    check_slice(np.uint64(region_size), np.uint64(offset), np.uint64(nbytes))


# -- numpy_view -----------------------------------------------------------------------------


def _address(buffer: memoryview) -> int:
    return int(np.frombuffer(buffer, dtype=np.uint8).ctypes.data)


@pytest.mark.parametrize(
    ("dtype", "shape"),
    [(np.float32, ()), (np.float32, (0, 5)), (np.int64, (3, 4)), (np.complex128, (2, 1, 3)),
     (np.bool_, (7,)), (np.uint8, (4096 - 128,)), (np.float16, (1, 1))],
)
def test_numpy_view_is_zero_copy(dtype: type, shape: tuple[int, ...]) -> None:
    with SharedMemoryRegion.create(4096) as region:
        array = numpy_view(region.buffer, 128, dtype, shape)
        assert array.shape == shape and array.dtype == np.dtype(dtype)
        assert array.flags.c_contiguous and array.flags.writeable
        if array.size:
            assert array.ctypes.data == _address(region.buffer) + 128
            array.reshape(-1)[0] = 1
            assert any(region.buffer[128 : 128 + array.itemsize])
        del array


def test_numpy_view_rejects_a_shape_that_does_not_fit() -> None:
    with SharedMemoryRegion.create(4096) as region:
        with pytest.raises(SliceOutOfBoundsError, match="needs 4096 bytes at offset 64"):
            numpy_view(region.buffer, 64, np.float32, (1024,))
        # The product is computed in Python ints: no overflow into a small positive number.
        with pytest.raises(SliceOutOfBoundsError, match="buffer holds 4096 bytes"):
            numpy_view(region.buffer, 0, np.float64, (2**33, 2**33, 2**33))
        with pytest.raises(SliceOutOfBoundsError, match="negative dimension"):
            numpy_view(region.buffer, 0, np.float64, (-1, 4))
        with pytest.raises(SliceOutOfBoundsError, match="buffer holds"):
            numpy_view(region.buffer, -8, np.uint8, (1,))
        with pytest.raises(TypeError, match="Python objects"):
            numpy_view(region.buffer, 0, object, (1,))


# -- janitor --------------------------------------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=60)
    return proc.pid


def _plant(directory: str, pid: int, tag: str, mode: int = 0o600) -> str:
    name = f"{SHM_PREFIX}{pid}-{tag * 16}"
    fd = os.open(os.path.join(directory, name), os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode)
    os.close(fd)
    return name


def test_cleanup_orphans_removes_dead_owners_only(private_dir: str) -> None:
    dead = _dead_pid()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        orphan = _plant(private_dir, dead, "a")
        live = _plant(private_dir, sleeper.pid, "b")
        mine = _plant(private_dir, os.getpid(), "c")
        other_user = _plant(private_dir, dead, "d")
        if os.getuid() == 0:
            os.chown(os.path.join(private_dir, other_user), 65534, 65534)
        else:
            other_user = None  # type: ignore[assignment]
        link = f"{SHM_PREFIX}{dead}-{'e' * 16}"
        os.symlink(os.path.join(private_dir, live), os.path.join(private_dir, link))
        unrelated = "psm_12345"
        open(os.path.join(private_dir, unrelated), "w").close()

        assert cleanup_orphans(private_dir) == [orphan]
        left = set(os.listdir(private_dir))
        assert orphan not in left
        assert {live, mine, link, unrelated} <= left
        if other_user is not None:
            assert other_user in left
        assert cleanup_orphans(private_dir) == []
    finally:
        sleeper.kill()
        sleeper.wait(timeout=60)


def test_cleanup_orphans_min_age(private_dir: str) -> None:
    orphan = _plant(private_dir, _dead_pid(), "f")
    assert cleanup_orphans(private_dir, min_age=60) == []
    old = time.time() - 120
    os.utime(os.path.join(private_dir, orphan), (old, old))
    assert cleanup_orphans(private_dir, min_age=60) == [orphan]


def test_cleanup_orphans_after_sigkill_inside_the_register_window(private_dir: str) -> None:
    # The one window that can leak: created, not yet registered+unlinked, then SIGKILL.
    peer = _Peer(_CREATOR, "65536", private_dir, "sleep")
    try:
        name = peer.readline()
        peer.proc.send_signal(signal.SIGKILL)
        peer.proc.wait(timeout=30)
        assert os.listdir(private_dir) == [name]
        assert cleanup_orphans(private_dir) == [name]
        assert os.listdir(private_dir) == []
    finally:
        peer.finish()


def test_cleanup_orphans_of_a_missing_directory(private_dir: str) -> None:
    assert cleanup_orphans(os.path.join(private_dir, "missing")) == []


# -- sealed regions (Note [Sealed regions]) --------------------------------------------------


def test_a_sealed_region_cannot_change_size_and_leaves_no_name() -> None:
    before = set(os.listdir(SHM))
    region = SharedMemoryRegion.create(1 << 20, tag="0123456789abcdef", sealed=True)
    try:
        assert region.sealed and NAME_PATTERN.fullmatch(region.name)
        assert set(os.listdir(SHM)) == before  # a memfd: nothing in /dev/shm
        attached = SharedMemoryRegion.attach(region.name, region.size, allow_unsealed=False)
        assert attached.sealed
        np.frombuffer(region.buffer, np.uint8)[:4] = [1, 2, 3, 4]
        assert bytes(attached.buffer[:4]) == b"\x01\x02\x03\x04"  # the same memory
        fd = next(os.open(f"/proc/self/fd/{e}", os.O_RDWR) for e in os.listdir("/proc/self/fd")
                  if _readlink(f"/proc/self/fd/{e}") == f"/memfd:{region.name} (deleted)")
        try:
            for size in (0, 4096, 2 << 20):
                with pytest.raises(PermissionError):
                    os.ftruncate(fd, size)
        finally:
            os.close(fd)
        attached.close()
        region.unlink()  # closes the descriptor; Python's mmap holds a duplicate until unmapped
        region.close()
        with pytest.raises(RegionRejectedError, match="not a sealed memfd"):
            SharedMemoryRegion.attach(region.name, region.size, allow_unsealed=False)
    finally:
        region.unlink()
        region.close()


def test_an_unsealed_file_is_refused_unless_allowed() -> None:
    with SharedMemoryRegion.create(4096) as region:
        with pytest.raises(RegionRejectedError, match="--allow-unsealed-regions"):
            SharedMemoryRegion.attach(region.name, 4096, allow_unsealed=False)
        attached = SharedMemoryRegion.attach(region.name, 4096, allow_unsealed=True)
        assert not attached.sealed
        attached.close()


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""
