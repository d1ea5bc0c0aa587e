"""A real third-party model through torch_module_to_jax: torchvision's resnet18, trained from JAX.

torchvision is optional: PyPI's wheels are CUDA builds that fail to import beside the CPU torch
this project pins (``operator torchvision::nms does not exist``), so the test skips with the
reason the import gave.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from torch_jax_interop import torch_module_to_jax
from torch_jax_interop.interop_core._convert import _array_to_torch


def _torchvision() -> Any:
    try:
        import torchvision
    except Exception as error:  # ImportError, or RuntimeError from a mismatched wheel
        pytest.skip(f"torchvision does not import beside this torch: {error}")
    return torchvision


@pytest.mark.slow
def test_resnet18_training_step_from_jax_gives_torchs_gradients() -> None:
    torchvision = _torchvision()
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10).train()
    apply, params = torch_module_to_jax(model)
    x = jax.random.normal(jax.random.key(0), (2, 3, 32, 32))
    labels = jnp.array([1, 7])

    def loss(params: Any, x: jax.Array) -> jax.Array:
        logits = apply(params, x)
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(2), labels])

    value, grads = jax.value_and_grad(loss)(params, x)
    # BatchNorm in train mode updated the running statistics once above; the reference starts
    # from a fresh model with the same seed.
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(weights=None, num_classes=10).train()
    logits = reference(_array_to_torch(x, copy=True))
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor([1, 7]))
    expected.backward()
    np.testing.assert_allclose(float(value), float(expected), rtol=1e-5)
    for g, p in zip(grads, reference.parameters(), strict=True):
        np.testing.assert_allclose(np.asarray(g), p.grad.numpy(), rtol=1e-3, atol=1e-6)
