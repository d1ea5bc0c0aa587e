"""Lifetimes across the zero-copy boundary: deleting or re-pointing one side never frees
memory the other side still reads. Each case runs in a fresh interpreter: the failure
modes are process deaths (an XLA CHECK abort, a segfault on unmapped memory)."""

from __future__ import annotations

from typing import Any

import pytest

PATHS = {"private": "", "public": "DLPackFastPath.probe(private=False)"}


@pytest.mark.parametrize("path", sorted(PATHS))
def test_deleting_a_jax_array_leaves_the_torch_view_valid(run_python: Any, path: str) -> None:
    result = run_python(f"""
        import jax.numpy as jnp
        from torch_jax_interop import jax_to_torch
        from torch_jax_interop._compat._jax import DLPackFastPath
        {PATHS[path]}
        for n in (16, 1 << 24):  # small, and large enough that freeing it unmaps it
            a = jnp.arange(n, dtype=jnp.float32) + 1
            b = jax_to_torch(a)
            pointer = a.unsafe_buffer_pointer()
            assert b.data_ptr() == pointer  # zero-copy
            a.delete()
            assert a.is_deleted()
            assert float(b[-1]) == n and float(b[0]) == 1.0
            b.add_(1)  # still writable memory of this process
            del b
        print("ok")
    """)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "ok"


@pytest.mark.parametrize("path", sorted(PATHS))
def test_pointing_the_tensor_elsewhere_keeps_the_jax_arrays_memory(run_python: Any,
                                                                  path: str) -> None:
    result = run_python(f"""
        import gc
        import jax.numpy as jnp, torch
        from torch_jax_interop import torch_to_jax
        from torch_jax_interop._compat._jax import DLPackFastPath
        {PATHS[path]}
        t = torch.ones(16 << 20)  # 64 MiB: freeing it unmaps it, so a dangling read crashes
        a = torch_to_jax(t)
        assert a.unsafe_buffer_pointer() == t.data_ptr()  # zero-copy
        t.set_(torch.zeros(4))
        gc.collect()
        assert float(jnp.sum(a)) == 16 << 20
        print("ok")
    """)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "ok"
