"""Derivatives of any order through torch_module_to_jax (Note [Why a primitive] in
``interop_core/_torch_module_primitive.py``): jax.jvp, jax.hessian, forward-over-reverse,
reverse-over-reverse, against torch's own functional derivatives."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from torch_jax_interop import torch_module_to_jax
from torch_jax_interop.interop_core._convert import _array_to_torch


def to_torch(a: jax.Array) -> torch.Tensor:
    return _array_to_torch(a, copy=True)


def assert_close(jax_value: Any, torch_value: torch.Tensor, **kw: Any) -> None:
    np.testing.assert_allclose(
        np.asarray(jax_value), torch_value.detach().numpy(), **({"rtol": 1e-5, "atol": 1e-6} | kw)
    )


def small_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2), torch.nn.Softplus()
    )


X = np.asarray([0.3, -0.7, 1.1], dtype=np.float32)


@pytest.mark.parametrize("jit", [False, True])
def test_hessian_of_a_small_mlp_equals_torch(jit: bool) -> None:
    model = small_mlp()
    apply, params = torch_module_to_jax(model)

    def f(x: jax.Array) -> jax.Array:
        return jnp.sum(apply(params, x) ** 2)

    hessian = jax.jit(jax.hessian(f)) if jit else jax.hessian(f)
    expected = torch.autograd.functional.hessian(
        lambda x: (model(x) ** 2).sum(), torch.from_numpy(X)
    )
    assert_close(hessian(jnp.asarray(X)), expected, rtol=1e-4, atol=1e-5)
    # reverse over reverse gives the same matrix
    assert_close(jax.jacrev(jax.jacrev(f))(jnp.asarray(X)), expected, rtol=1e-4, atol=1e-5)


def test_hessian_with_respect_to_parameters() -> None:
    model = small_mlp()
    apply, params = torch_module_to_jax(model)
    x = jnp.asarray(X)
    hessian = jax.hessian(lambda p: jnp.sum(apply(p, x) ** 2))(params)
    names = [name for name, _ in model.named_parameters()]

    def loss(*flat: torch.Tensor) -> torch.Tensor:
        values = dict(zip(names, flat, strict=True))
        return (torch.func.functional_call(model, values, (torch.from_numpy(X),)) ** 2).sum()

    expected = torch.autograd.functional.hessian(
        loss, tuple(p.detach() for p in model.parameters())
    )
    for i in range(len(names)):
        for j in range(len(names)):
            assert_close(hessian[i][j], expected[i][j], rtol=1e-4, atol=1e-5)


# torch.func.jvp loads its decompositions through torch.jit.script, deprecated in torch 2.13
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("jit", [False, True])
def test_jvp_equals_torch_func_jvp(jit: bool) -> None:
    model = small_mlp()
    apply, params = torch_module_to_jax(model)
    tangent = np.asarray([1.0, -2.0, 0.5], dtype=np.float32)

    def jvp(x: jax.Array, t: jax.Array) -> Any:
        return jax.jvp(lambda x: apply(params, x), (x,), (t,))

    out, out_tangent = (jax.jit(jvp) if jit else jvp)(jnp.asarray(X), jnp.asarray(tangent))
    expected, expected_tangent = torch.func.jvp(
        lambda x: model(x), (torch.from_numpy(X),), (torch.from_numpy(tangent),)
    )
    assert_close(out, expected)
    assert_close(out_tangent, expected_tangent)
    # with respect to the parameters too
    param_tangents = tuple(jnp.ones_like(p) for p in params)
    _, through_params = jax.jvp(lambda p: apply(p, jnp.asarray(X)), (params,), (param_tangents,))
    names = [name for name, _ in model.named_parameters()]
    _, expected_params = torch.func.jvp(
        lambda *flat: torch.func.functional_call(
            model, dict(zip(names, flat, strict=True)), (torch.from_numpy(X),)
        ),
        tuple(p.detach() for p in model.parameters()),
        tuple(torch.ones_like(p) for p in model.parameters()),
    )
    assert_close(through_params, expected_params)


def test_forward_over_reverse_hessian_vector_product() -> None:
    model = small_mlp()
    apply, params = torch_module_to_jax(model)
    v = np.asarray([0.2, 0.1, -1.0], dtype=np.float32)

    def f(x: jax.Array) -> jax.Array:
        return jnp.sum(apply(params, x) ** 2)

    _, hvp = jax.jvp(jax.grad(f), (jnp.asarray(X),), (jnp.asarray(v),))
    _, expected = torch.autograd.functional.hvp(
        lambda x: (model(x) ** 2).sum(), torch.from_numpy(X), torch.from_numpy(v)
    )
    assert_close(hvp, expected, rtol=1e-4, atol=1e-5)


def test_third_order_derivative_of_a_scalar_function() -> None:
    class Cube(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.sin(x) * x**2

    apply, params = torch_module_to_jax(Cube())
    f = lambda x: apply(params, x)  # noqa: E731
    x = jnp.asarray(0.7)
    third = jax.grad(jax.grad(jax.grad(f)))(x)
    xt = torch.tensor(0.7, requires_grad=True)
    (g1,) = torch.autograd.grad(torch.sin(xt) * xt**2, xt, create_graph=True)
    (g2,) = torch.autograd.grad(g1, xt, create_graph=True)
    (g3,) = torch.autograd.grad(g2, xt)
    assert_close(third, g3, rtol=1e-5)
    assert_close(jax.jacfwd(jax.jacfwd(jax.jacfwd(f)))(x), g3, rtol=1e-5)


def test_second_derivative_of_a_module_without_double_backward_says_so() -> None:
    class OnceDifferentiable(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
            ctx.save_for_backward(x)
            return x**3

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
            (x,) = ctx.saved_tensors
            return 3 * x**2 * grad

    class Module(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return OnceDifferentiable.apply(x)

    apply, params = torch_module_to_jax(Module())
    f = lambda x: jnp.sum(apply(params, x))  # noqa: E731
    np.testing.assert_allclose(np.asarray(jax.grad(f)(jnp.asarray([2.0]))), [12.0])
    with pytest.raises(Exception, match="cannot differentiate twice a function that was marked"):
        jax.hessian(f)(jnp.asarray([2.0]))
