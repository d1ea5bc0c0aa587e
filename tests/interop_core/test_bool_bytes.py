"""Bool tensors whose bytes are not 0/1 (Note [Bool bytes] in interop_core/_convert.py): JAX
sees the values torch sees, or the conversion refuses; well-formed bools stay zero-copy."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from torch_jax_interop import CopyRequiredError, jax_to_torch, torch_to_jax


def odd_bools() -> torch.Tensor:
    return torch.tensor([0, 1, 2, 255, 7, 0], dtype=torch.uint8).view(torch.bool)


def test_bytes_other_than_0_and_1_read_as_true_in_jax() -> None:
    t = odd_bools()
    a = torch_to_jax(t)
    expected = [False, True, True, True, True, False]
    np.testing.assert_array_equal(np.asarray(a), expected)
    assert int(jnp.sum(a)) == int(t.sum()) == 4
    np.testing.assert_array_equal(np.asarray(a == True), expected)  # noqa: E712
    assert int(jnp.sum(a.astype(jnp.int32) + 1)) == 10
    assert torch.equal(jax_to_torch(a), t != 0)


def test_strided_odd_bools_are_normalised_too() -> None:
    t = torch.tensor([[0, 3], [9, 1]], dtype=torch.uint8).view(torch.bool).t()
    np.testing.assert_array_equal(np.asarray(torch_to_jax(t)), [[False, True], [True, True]])


def test_copy_false_refuses_odd_bools() -> None:
    with pytest.raises(CopyRequiredError, match=r"bytes other than 0 and 1.*copy=False"):
        torch_to_jax(odd_bools(), copy=False)


@pytest.mark.parametrize("copy", [None, False])
def test_well_formed_bools_stay_zero_copy(copy: bool | None) -> None:
    t = torch.zeros(4096, dtype=torch.bool)
    t[::3] = True
    a = torch_to_jax(t, copy=copy)
    assert a.unsafe_buffer_pointer() == t.data_ptr()
    np.testing.assert_array_equal(np.asarray(a), t.numpy())
