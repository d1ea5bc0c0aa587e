"""Devices convert like values (as in torch-jax-interop 0.0.8): ``jax_to_torch(jax_device)``
is the matching ``torch.device``, ``torch_to_jax(torch_device)`` the matching ``jax.Device``,
alone and inside pytrees."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import pytest
import torch

from torch_jax_interop import jax_to_torch, torch_to_jax


def test_a_jax_cpu_device_becomes_torch_cpu_and_back() -> None:
    device = jax.devices("cpu")[0]
    converted = jax_to_torch(device)
    assert isinstance(converted, torch.device) and converted == torch.device("cpu")
    back = torch_to_jax(converted)
    assert isinstance(back, jax.Device) and back == device
    assert torch_to_jax(torch.device("cpu", 0)) == device


def test_devices_inside_pytrees_convert_with_the_arrays() -> None:
    device = jax.devices("cpu")[0]
    tree: dict[str, Any] = {"device": device, "x": jnp.arange(3.0), "rest": [device, 1]}
    converted = jax_to_torch(tree)
    assert converted["device"] == torch.device("cpu") and converted["rest"][0] == torch.device(
        "cpu"
    )
    assert isinstance(converted["x"], torch.Tensor) and converted["rest"][1] == 1
    back = torch_to_jax(converted)
    assert back["device"] == device and back["rest"][0] == device
    assert isinstance(back["x"], jax.Array)


def test_a_device_jax_does_not_have_is_a_clear_error() -> None:
    if any(d.platform == "gpu" for d in jax.devices()):
        pytest.skip("this JAX has a GPU backend")
    with pytest.raises(ValueError, match="JAX has no gpu backend"):
        torch_to_jax(torch.device("cuda", 0))


@pytest.mark.gpu
def test_gpu_devices_map_by_local_index() -> None:
    for device in jax.devices("gpu"):
        converted = jax_to_torch(device)
        assert converted == torch.device("cuda", device.local_hardware_id)
        assert torch_to_jax(converted) == device
