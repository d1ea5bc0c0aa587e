"""The worker's CompiledFunction: which leaves it differentiates, and scalar outputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from torch_jax_interop.examples.functions import mlp_apply, mlp_loss
from torch_jax_interop.server._compiled import CompiledFunction


def _params() -> dict[str, jax.Array]:
    k1, k2 = jax.random.split(jax.random.key(0))
    return {"w1": jax.random.normal(k1, (8, 5)) * 0.3, "b1": jnp.zeros(5),
            "w2": jax.random.normal(k2, (5, 3)) * 0.3, "b2": jnp.zeros(3)}


def test_leaves_without_gradient_are_not_differentiated() -> None:
    function = CompiledFunction("mlp_apply", mlp_apply)
    params, x = _params(), np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    # leaves, in insertion order: w1, b1, w2, b2, then x (4)
    out, _, residuals = function.call_with_vjp((params, x), {}, False, frozenset({4}))
    assert residuals.diff == (0, 1, 2, 3)
    cotangent = jnp.ones_like(out)
    (grad_params, grad_x), grad_kwargs = function.backward(residuals, cotangent)
    assert grad_x is None and grad_kwargs == {}  # the input's gradient was never computed
    expected = jax.grad(lambda p: jnp.sum(mlp_apply(p, x)))(params)
    for name in params:
        np.testing.assert_allclose(grad_params[name], expected[name], rtol=1e-5, atol=1e-6)
    # no mask: everything is differentiated, as before the mask existed
    _, _, residuals = function.call_with_vjp((params, x), {}, False)
    (_, grad_x), _ = function.backward(residuals, cotangent)
    expected_x = jax.grad(lambda x: jnp.sum(mlp_apply(params, x)))(x)
    np.testing.assert_allclose(grad_x, expected_x, rtol=1e-5, atol=1e-6)


def test_scalar_output_keeps_gradients_and_scales_them() -> None:
    function = CompiledFunction("mlp_loss", mlp_loss)
    params = _params()
    x = np.random.default_rng(1).standard_normal((4, 8)).astype(np.float32)
    labels = np.array([0, 2, 1, 2], np.int32)
    loss, _, residuals = function.call_with_vjp((params, x, labels), {}, False,
                                                frozenset({4, 5}))
    assert type(residuals.vjp_fn).__name__ == "_Gradients"  # no vjp function kept
    expected_loss, expected = jax.value_and_grad(mlp_loss)(params, x, labels)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-6)
    (grad_params, grad_x, grad_labels), _ = function.backward(residuals, jnp.float32(2.5))
    assert grad_x is None and grad_labels is None
    for name in params:
        np.testing.assert_allclose(grad_params[name], 2.5 * expected[name], rtol=1e-5,
                                   atol=1e-7)
