"""torch_module_to_jax: eager, grad, jit without example_output, vmap, buffers, kwargs."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.test_util import check_grads

from torch_jax_interop import torch_module_to_jax
from torch_jax_interop.interop_core._convert import _array_to_torch


def to_torch(a: jax.Array) -> torch.Tensor:
    return _array_to_torch(a, copy=True)


def assert_close(jax_value: Any, torch_value: torch.Tensor, **kw: Any) -> None:
    np.testing.assert_allclose(
        np.asarray(jax_value), torch_value.detach().numpy(), **({"rtol": 1e-5, "atol": 1e-6} | kw)
    )


def test_seed_readme_example_matches_torch_autograd() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    apply, params = torch_module_to_jax(model)
    assert isinstance(params, tuple) and [p.shape for p in params] == [(2, 3), (2,)]

    def loss_function(params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        y_pred = apply(params, x)
        return jnp.mean((y - y_pred) ** 2)

    x = jax.random.uniform(key=jax.random.key(0), shape=(1, 3))
    y = jax.random.uniform(key=jax.random.key(1), shape=(1, 1))
    loss, grad = jax.value_and_grad(loss_function)(params, x, y)
    assert isinstance(grad, tuple) and [g.shape for g in grad] == [(2, 3), (2,)]

    torch_loss = ((to_torch(y) - model(to_torch(x))) ** 2).mean()
    torch_loss.backward()
    assert_close(loss, torch_loss)
    assert_close(grad[0], model.weight.grad)
    assert_close(grad[1], model.bias.grad)

    # jit without example_output, and with it
    jit_loss, jit_grad = jax.jit(jax.value_and_grad(loss_function))(params, x, y)
    assert_close(jit_loss, torch_loss)
    assert_close(jit_grad[0], model.weight.grad)
    apply2, params2 = torch_module_to_jax(model, example_output=torch.zeros(1, 2))
    out = jax.jit(apply2)(params2, x)
    assert_close(out, model(to_torch(x)))


def test_params_are_copies_and_the_module_is_not_changed() -> None:
    model = torch.nn.Linear(3, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply, params = torch_module_to_jax(model)
    assert params[0].unsafe_buffer_pointer() != model.weight.data_ptr()
    with torch.no_grad():
        model.weight.add_(1.0)
    np.testing.assert_allclose(np.asarray(params[0]), before["weight"].numpy())
    x = jnp.ones((4, 3))
    new_params = (params[0] * 2, params[1])
    out = apply(new_params, x)
    np.testing.assert_allclose(
        np.asarray(out), np.asarray(x @ new_params[0].T + params[1]), rtol=1e-6
    )
    assert model.weight.grad is None


def test_gradients_float64_check_grads(x64: None) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    model = model.double()
    apply, params = torch_module_to_jax(model)
    assert params[0].dtype == jnp.float64
    x = jax.random.normal(jax.random.key(0), (5, 3), dtype=jnp.float64)
    check_grads(apply, (params, x), order=1, modes=["rev"])

    grads = jax.grad(lambda p, x: jnp.sum(apply(p, x) ** 2), argnums=(0, 1))(params, x)
    x_t = to_torch(x).requires_grad_()
    (model(x_t) ** 2).sum().backward()
    for g, p in zip(grads[0], model.parameters(), strict=True):
        assert_close(g, p.grad, rtol=1e-12, atol=1e-12)
    assert_close(grads[1], x_t.grad, rtol=1e-12, atol=1e-12)


class TwoInputs(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(3, 2)
        self.b = torch.nn.Linear(4, 2)

    def forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        scale: torch.Tensor | None = None,
        mode: str = "add",
    ) -> Any:
        out = self.a(x) + self.b(y) if mode == "add" else self.a(x) * self.b(y)
        if scale is not None:
            out = out * scale
        return {"out": out, "parts": (self.a(x), torch.sin(y).sum())}


def test_several_inputs_kwargs_and_pytree_outputs_under_jit_grad() -> None:
    torch.manual_seed(0)
    model = TwoInputs()
    apply, params = torch_module_to_jax(model)
    x = jax.random.normal(jax.random.key(0), (5, 3))
    y = jax.random.normal(jax.random.key(1), (5, 4))
    scale = jnp.full((2,), 3.0)

    def loss(params: Any, x: jax.Array, y: jax.Array, scale: jax.Array) -> jax.Array:
        out = apply(params, x, y, scale=scale, mode="mul")
        return jnp.sum(out["out"] ** 2) + jnp.sum(out["parts"][0]) + out["parts"][1]

    value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(params, x, y, scale)

    xt, yt, st = (to_torch(v).requires_grad_() for v in (x, y, scale))
    out = model(xt, yt, scale=st, mode="mul")
    torch_value = (out["out"] ** 2).sum() + out["parts"][0].sum() + out["parts"][1]
    torch_value.backward()
    assert_close(value, torch_value)
    for g, p in zip(grads[0], model.parameters(), strict=True):
        assert_close(g, p.grad)
    assert_close(grads[1], xt.grad)
    assert_close(grads[2], yt.grad)
    assert_close(grads[3], st.grad)


class NotBatchAware(torch.nn.Module):
    """Flattens its whole input: wrong if it were handed a batch."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(6, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1) @ self.weight


def test_vmap_is_correct_for_modules_that_are_not_batch_aware() -> None:
    torch.manual_seed(0)
    model = NotBatchAware()
    apply, params = torch_module_to_jax(model)
    xs = jax.random.normal(jax.random.key(0), (4, 2, 3))
    batched = jax.vmap(apply, in_axes=(None, 0))(params, xs)
    assert batched.shape == (4, 2)
    for i in range(4):
        assert_close(batched[i], model(to_torch(xs[i])))
    # jit(vmap(grad)): per-example gradients
    per_example = jax.jit(
        jax.vmap(jax.grad(lambda p, x: jnp.sum(apply(p, x) ** 2)), in_axes=(None, 0))
    )(params, xs)
    for i in range(4):
        model.zero_grad()
        (model(to_torch(xs[i])) ** 2).sum().backward()
        assert_close(per_example[0][i], model.weight.grad)


def test_jit_infers_shapes_without_example_output_once_per_signature() -> None:
    calls = []

    class Counting(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> Any:
            calls.append(x.device.type)
            return self.linear(x).to(torch.float16), x.shape[0] * torch.ones((), dtype=torch.int32)

    apply, params = torch_module_to_jax(Counting())
    f = jax.jit(apply)
    half, count = f(params, jnp.ones((4, 3)))
    assert half.dtype == jnp.float16 and half.shape == (4, 2)
    assert count.dtype == jnp.int32 and int(count) == 4
    assert calls == ["meta", "cpu"]  # shapes from meta tensors, then the real call
    f(params, jnp.ones((4, 3)))
    assert calls == ["meta", "cpu", "cpu"]
    f(params, jnp.ones((6, 3)))
    assert calls == ["meta", "cpu", "cpu", "meta", "cpu"]


def test_batchnorm_train_mode_uses_batch_statistics_and_updates_nothing() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    model.train()
    running_mean = model[1].running_mean.clone()
    apply, params = torch_module_to_jax(model)
    assert len(params) == 4  # linear weight, bias, batchnorm weight, bias; no buffers

    x = jax.random.normal(jax.random.key(0), (8, 3))
    loss = lambda p, x: jnp.sum(apply(p, x) ** 3)  # noqa: E731
    value, grads = jax.jit(jax.value_and_grad(loss))(params, x)
    for _ in range(3):
        apply(params, x)
    torch.testing.assert_close(model[1].running_mean, running_mean)  # module untouched

    reference = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    reference.load_state_dict(model.state_dict())
    reference.train()
    torch_value = (reference(to_torch(x)) ** 3).sum()
    torch_value.backward()
    assert_close(value, torch_value, rtol=1e-4)
    for g, p in zip(grads, reference.parameters(), strict=True):
        assert_close(g, p.grad, rtol=1e-4, atol=1e-5)
    # output is normalised with the batch's own statistics
    out = np.asarray(apply(params, x))
    pre = np.asarray(x @ params[0].T + params[1])
    expected = (pre - pre.mean(0)) / np.sqrt(pre.var(0) + 1e-5)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_batchnorm_eval_mode_uses_running_statistics_snapshot() -> None:
    torch.manual_seed(0)
    model = torch.nn.BatchNorm1d(3)
    model.running_mean.copy_(torch.tensor([1.0, -2.0, 0.5]))
    model.running_var.copy_(torch.tensor([4.0, 0.25, 1.0]))
    model.eval()
    apply, params = torch_module_to_jax(model)
    with torch.no_grad():
        model.running_mean.zero_()  # later changes do not reach the converted function
    x = jnp.asarray([[1.0, -2.0, 0.5], [3.0, -1.0, 1.5]])
    out = jax.jit(apply)(params, x)
    expected = (np.asarray(x) - [1.0, -2.0, 0.5]) / np.sqrt(np.array([4.0, 0.25, 1.0]) + 1e-5)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5)
    # eval mode is batch-independent, so vmap over single examples agrees
    single = jax.vmap(apply, in_axes=(None, 0))(params, x[:, None, :])
    np.testing.assert_allclose(np.asarray(single[:, 0]), expected, rtol=1e-5)


def test_integer_inputs_and_tied_weights() -> None:
    class TiedEmbedding(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(10, 4)
            self.head = torch.nn.Linear(4, 10, bias=False)
            self.head.weight = self.embed.weight  # tied

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.head(self.embed(tokens))

    torch.manual_seed(0)
    model = TiedEmbedding()
    apply, params = torch_module_to_jax(model)
    assert len(params) == 1
    tokens = jnp.asarray([1, 3, 3, 7], dtype=jnp.int32)
    grads = jax.jit(jax.grad(lambda p, t: jnp.sum(apply(p, t) ** 2)))(params, tokens)
    (model(to_torch(tokens).long()) ** 2).sum().backward()
    assert_close(grads[0], model.embed.weight.grad, rtol=1e-4, atol=1e-5)


def test_clear_errors() -> None:
    model = torch.nn.Linear(3, 2)
    apply, params = torch_module_to_jax(model)
    with pytest.raises(ValueError, match="2 parameters"):
        apply(params[:1], jnp.ones((1, 3)))
    with pytest.raises(TypeError, match="torch_to_jax"):
        apply(params, torch.ones(1, 3))


@pytest.mark.gpu
def test_gpu_data_stays_on_device() -> None:
    model = torch.nn.Linear(3, 2, device="cuda")
    apply, params = torch_module_to_jax(model)
    assert all(p.devices() == {jax.devices("gpu")[0]} for p in params)
    x = jax.device_put(jnp.ones((4, 3)), jax.devices("gpu")[0])
    out, grads = jax.jit(jax.value_and_grad(lambda p, x: jnp.sum(apply(p, x))))(params, x)
    assert out.devices() == {jax.devices("gpu")[0]}
    reference = model(torch.ones(4, 3, device="cuda")).sum()
    reference.backward()
    np.testing.assert_allclose(float(out), float(reference), rtol=1e-5)
    np.testing.assert_allclose(
        np.asarray(grads[0]), model.weight.grad.cpu().numpy(), rtol=1e-5, atol=1e-6
    )
