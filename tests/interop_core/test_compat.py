"""Note [Private APIs] (torch_jax_interop._compat): each private fast path has a public
fallback, and the fallbacks stay zero-copy. Checked by data pointers, with the private paths
switched off (``DLPackFastPath.probe(private=False)``) and back on."""

from __future__ import annotations

from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from torch_jax_interop import jax_to_torch, torch_to_jax
from torch_jax_interop._compat import _torch as torch_compat
from torch_jax_interop._compat._jax import DLPackFastPath, aligned_empty, import_numpy
from torch_jax_interop._dtypes_jax import x64_enabled
from torch_jax_interop._layout import ALIGNMENT


@pytest.fixture(params=["private", "public"])
def fast_path(request: pytest.FixtureRequest) -> Iterator[str]:
    """Each test runs with the probed private paths, then with the public fallbacks forced."""
    DLPackFastPath.probe(private=request.param == "private")
    try:
        yield request.param
    finally:
        DLPackFastPath.probe()


def test_private_paths_pass_their_probe_on_the_pinned_jax() -> None:
    DLPackFastPath.probe()
    assert DLPackFastPath.import_capsule is not None, "jaxlib's DLPack import failed its probe"
    assert DLPackFastPath.export_capsule is not None, "jaxlib's DLPack export failed its probe"


def test_forcing_the_fallback_switches_the_private_paths_off() -> None:
    DLPackFastPath.probe(private=False)
    try:
        assert DLPackFastPath.import_capsule is None
        assert DLPackFastPath.export_capsule is None
    finally:
        DLPackFastPath.probe()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8, torch.bool])
@pytest.mark.parametrize("shape", [(), (0, 3), (5,), (4, 16)])
def test_torch_to_jax_shares_memory(fast_path: str, dtype: torch.dtype,
                                    shape: tuple[int, ...]) -> None:
    t = torch.zeros(shape, dtype=dtype)
    array = torch_to_jax(t)
    assert array.shape == shape and str(array.dtype) == str(dtype).removeprefix("torch.")
    if t.numel():
        assert array.unsafe_buffer_pointer() == t.data_ptr(), f"{fast_path} path copied"


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.uint8, jnp.complex64])
def test_jax_to_torch_shares_memory(fast_path: str, dtype: jnp.dtype) -> None:
    array = jnp.ones((3, 5), dtype=dtype)
    tensor = jax_to_torch(array)
    assert tensor.data_ptr() == array.unsafe_buffer_pointer(), f"{fast_path} path copied"
    assert torch.equal(tensor, torch.ones(3, 5, dtype=tensor.dtype))


def test_worker_numpy_import_shares_aligned_memory(fast_path: str) -> None:
    """The worker's import of a shared-memory slice (the old public fallback copied)."""
    array = aligned_empty(64, np.dtype(np.float32)).reshape(4, 16)
    array[:] = np.arange(64, dtype=np.float32).reshape(4, 16)
    imported = import_numpy(array)
    assert imported.unsafe_buffer_pointer() == array.ctypes.data, f"{fast_path} path copied"
    array[0, 0] = 42.0  # shared memory: a write on one side is visible on the other
    assert float(imported[0, 0]) == 42.0


def test_worker_numpy_import_copies_what_it_must(fast_path: str) -> None:
    raw = aligned_empty(65, np.dtype(np.float32))
    raw[:] = np.arange(65, dtype=np.float32)
    unaligned = raw[1:]  # 4 bytes past an ALIGNMENT boundary
    assert unaligned.ctypes.data % ALIGNMENT
    imported = import_numpy(unaligned)
    assert imported.unsafe_buffer_pointer() != unaligned.ctypes.data
    np.testing.assert_array_equal(np.asarray(imported), unaligned)
    strided = raw[::2]
    np.testing.assert_array_equal(np.asarray(import_numpy(strided)), strided)


def test_public_torch_capsule_fallbacks_share_memory() -> None:
    """The fallbacks of ``torch._C._to_dlpack`` / ``torch._C._from_dlpack``."""
    DLPackFastPath.probe()
    assert DLPackFastPath.import_capsule is not None
    t = torch.arange(16, dtype=torch.float32)
    array = DLPackFastPath.import_capsule(torch_compat._public_to_dlpack(t))
    assert array.unsafe_buffer_pointer() == t.data_ptr()
    source = jnp.arange(8.0)
    assert DLPackFastPath.export_capsule is not None
    tensor = torch.from_dlpack(DLPackFastPath.export_capsule(source))
    assert tensor.data_ptr() == source.unsafe_buffer_pointer()


def test_x64_check_follows_jax_config_and_context() -> None:
    assert not x64_enabled()
    with jax.enable_x64(True):
        assert x64_enabled()
    assert not x64_enabled()


@pytest.mark.parametrize("setter", [torch_compat.set_grad_mode, torch.set_grad_enabled],
                         ids=["private", "public"])
def test_grad_mode_setter_and_its_fallback_set_the_mode(setter: object) -> None:
    before = torch.is_grad_enabled()
    try:
        for mode in (False, True, False):
            setter(mode)  # type: ignore[operator]
            assert torch.is_grad_enabled() is mode
    finally:
        torch.set_grad_enabled(before)
