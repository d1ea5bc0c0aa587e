"""A process's file-size limit (RLIMIT_FSIZE, ``ulimit -f``) is reported as such: EFBIG,
naming the limit and how to raise it, not "the shared-memory filesystem is too small"."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.mark.parametrize("sealed", [False, True], ids=["file", "sealed-memfd"])
def test_a_file_size_limit_is_reported_as_such(run_python: Any, sealed: bool) -> None:
    result = run_python(f"""
        import errno, os, resource
        from torch_jax_interop.errors import SharedMemoryFullError
        from torch_jax_interop.transport import SharedMemoryRegion
        before = set(os.listdir("/dev/shm"))
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.getrlimit(
            resource.RLIMIT_FSIZE)[1]))
        try:
            SharedMemoryRegion.create(8 << 20, sealed={sealed})
        except SharedMemoryFullError as error:
            assert error.errno == errno.EFBIG, error.errno
            print(error)
        assert set(os.listdir("/dev/shm")) <= before  # nothing left behind
    """)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "file-size limit (RLIMIT_FSIZE" in result.stdout, result.stdout
    assert "ulimit -f unlimited" in result.stdout
    assert "too small" not in result.stdout
