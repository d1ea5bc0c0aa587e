"""What FSDP2 needs from the client: sending a parameter leaves its storage resizable.

FSDP2 frees an unsharded parameter after forward by resizing its storage to 0; a storage
that was once exported through ``Tensor.numpy()`` can never be resized again. The torchrun
job in ``test_ddp.py`` shows the whole path; this pins the cause in one process.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from torch_jax_interop.client._codec import tensor_bytes  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.bool, torch.int64])
@pytest.mark.parametrize("shape", [(), (0, 3), (5, 7)])
def test_inline_bytes_are_the_tensors_and_leave_its_storage_resizable(dtype, shape) -> None:  # noqa: ANN001
    t = torch.randn(shape).to(dtype)
    # the expected bytes come from a copy, so that only the copy's storage gets pinned
    expected = t.clone().reshape(-1).view(torch.uint8).numpy().tobytes()
    assert tensor_bytes(t) == expected
    assert t.untyped_storage().resizable(), "the storage can no longer be resized"
    t.untyped_storage().resize_(0)  # what FSDP2 does to an unsharded parameter
