"""torch_module_to_jax gives torch's answers: randomness, in-place writes, what requires grad,
outputs that are not plain tensors, kept forward graphs (Note [Randomness and the kept graph],
Note [In-place writes to inputs] in ``interop_core/_torch_module_autograd.py``)."""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from torch_jax_interop import torch_module_to_jax
from torch_jax_interop.interop_core import _torch_module_autograd as autograd
from torch_jax_interop.interop_core._convert import _array_to_torch


def to_torch(a: jax.Array) -> torch.Tensor:
    return _array_to_torch(a, copy=True)


def assert_close(jax_value: Any, torch_value: torch.Tensor, **kw: Any) -> None:
    np.testing.assert_allclose(
        np.asarray(jax_value), torch_value.detach().numpy(), **({"rtol": 1e-5, "atol": 1e-6} | kw)
    )


@pytest.fixture(autouse=True)
def _no_graphs_left() -> Any:
    autograd.GRAPHS.clear()
    yield
    autograd.GRAPHS.clear()


class ModuleCalls:
    """Counts the module's runs (to tell a kept graph from a re-run)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        evaluate = autograd.ModuleCall.evaluate

        def counting(call: autograd.ModuleCall, leaves: list[torch.Tensor]) -> Any:
            self.count += 1
            return evaluate(call, leaves)

        monkeypatch.setattr(autograd.ModuleCall, "evaluate", counting)


# ---------------------------------------------------------------------------------------
# 1. Randomness: the backward uses the forward's draws


def dropout_reference(seed: int, x: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    xt = torch.from_numpy(x.copy()).requires_grad_()
    out = torch.nn.Dropout(0.5).train()(xt)
    (out * torch.arange(out.numel(), dtype=out.dtype)).sum().backward()
    assert xt.grad is not None
    return out.detach(), xt.grad


@pytest.mark.parametrize("mode", ["eager", "jit", "vjp", "vjp, graph dropped", "vmap"])
def test_dropout_mask_and_gradient_equal_torch_under_the_same_seed(mode: str) -> None:
    apply, params = torch_module_to_jax(torch.nn.Dropout(0.5).train())
    x = np.linspace(1.0, 2.0, 200, dtype=np.float32)
    weights = jnp.arange(200, dtype=jnp.float32)
    out_ref, grad_ref = dropout_reference(7, x)

    def loss(x: jax.Array) -> tuple[jax.Array, jax.Array]:
        out = apply(params, x)
        return jnp.sum(out * weights), out

    torch.manual_seed(7)
    if mode == "eager":
        (_, out), grad = jax.value_and_grad(loss, has_aux=True)(jnp.asarray(x))
    elif mode == "jit":
        (_, out), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(jnp.asarray(x))
    elif mode == "vmap":  # one example at a time, each backward re-runs its own draws
        (_, out), grad = jax.vmap(jax.value_and_grad(loss, has_aux=True))(
            jnp.asarray(x).reshape(1, 200)
        )
        out, grad = out[0], grad[0]
    else:
        out, backward = jax.vjp(lambda x: apply(params, x), jnp.asarray(x))
        if mode == "vjp, graph dropped":
            autograd.GRAPHS.clear()  # the backward must re-run with the forward's RNG state
        (grad,) = backward(weights)
    mask = np.asarray(out) != 0
    assert 0.3 < mask.mean() < 0.7  # really random
    np.testing.assert_array_equal(mask, out_ref.numpy() != 0)
    assert_close(out, out_ref)
    assert_close(grad, grad_ref)


def test_a_re_run_backward_does_not_advance_torchs_generator() -> None:
    apply, params = torch_module_to_jax(torch.nn.Dropout(0.5).train())
    x = jnp.ones(64)
    torch.manual_seed(3)
    first, backward = jax.vjp(lambda x: apply(params, x), x)
    autograd.GRAPHS.clear()
    backward(jnp.ones(64))
    second = apply(params, x)
    torch.manual_seed(3)
    dropout = torch.nn.Dropout(0.5).train()
    reference = [dropout(torch.ones(64)), dropout(torch.ones(64))]
    assert_close(first, reference[0])
    assert_close(second, reference[1])


# ---------------------------------------------------------------------------------------
# 2. In-place writes never change a JAX array


class DivideInPlace(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x /= 255.0
        return x


class ReluInPlace(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.linear(F.relu(x, inplace=True)), inplace=True)


def test_in_place_writes_leave_the_callers_array_unchanged_eager_and_jit() -> None:
    apply, params = torch_module_to_jax(DivideInPlace())
    x = jnp.full((4,), 255.0)
    np.testing.assert_array_equal(np.asarray(apply(params, x)), [1.0] * 4)
    np.testing.assert_array_equal(np.asarray(x), [255.0] * 4)
    # inside an XLA program the input is read again after the call
    f = jax.jit(lambda x: apply(params, x) + x)
    for _ in range(3):
        np.testing.assert_array_equal(np.asarray(f(x)), [256.0] * 4)
    np.testing.assert_array_equal(np.asarray(x), [255.0] * 4)


def test_relu_inplace_under_grad_matches_torch_and_keeps_the_input() -> None:
    torch.manual_seed(0)
    model = ReluInPlace()
    apply, params = torch_module_to_jax(model)
    x = jnp.asarray([-1.0, 2.0, -3.0, 4.0])
    keep = np.asarray(x).copy()
    loss = lambda p, x: jnp.sum(apply(p, x) ** 2)  # noqa: E731
    for step in (jax.value_and_grad(loss, argnums=(0, 1)),
                 jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))):
        value, (grads, x_grad) = step(params, x)
        np.testing.assert_array_equal(np.asarray(x), keep)
        xt = to_torch(x).requires_grad_()
        model.zero_grad()
        torch_value = (model(xt.clone()) ** 2).sum()
        torch_value.backward()
        assert_close(value, torch_value)
        assert_close(x_grad, xt.grad)
        for g, p in zip(grads, model.parameters(), strict=True):
            assert_close(g, p.grad)


def test_inputs_the_module_does_not_write_are_not_copied() -> None:
    seen = []

    class Reads(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(x.data_ptr())
            return x * 2

    apply, params = torch_module_to_jax(Reads())
    x = jnp.ones((1024,))
    apply(params, x)  # the first call of a signature works on copies, to learn
    apply(params, x)
    real = [pointer for pointer in seen if pointer]  # not the meta tensors of shape inference
    assert real[0] != x.unsafe_buffer_pointer()
    assert real[1] == x.unsafe_buffer_pointer()  # zero-copy from then on


def test_a_data_dependent_in_place_write_is_an_error_not_a_wrong_value() -> None:
    class SometimesWrites(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if bool(x.sum() > 0):
                x.mul_(2)
            return x + 1

    # the data-dependent branch needs data: no shape inference on meta tensors
    apply, params = torch_module_to_jax(SometimesWrites(), example_output=torch.zeros(3))
    np.testing.assert_array_equal(np.asarray(apply(params, -jnp.ones(3))), [0.0] * 3)
    with pytest.raises(Exception, match="wrote in place to its input"):
        apply(params, jnp.ones(3))
    x = jnp.ones(3)  # from now on that input is copied
    np.testing.assert_array_equal(np.asarray(apply(params, x)), [3.0] * 3)
    np.testing.assert_array_equal(np.asarray(x), [1.0] * 3)


def test_cost_of_the_in_place_protection_is_one_copy_of_the_written_input() -> None:
    """Not a timing assertion: prints what a written 4 MiB input costs per call."""
    apply_write, params = torch_module_to_jax(DivideInPlace())

    class Divide(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x / 255.0

    apply_pure, _ = torch_module_to_jax(Divide())
    x = jnp.ones((1024, 1024))
    timings: dict[str, list[float]] = {"writes (copied)": [], "pure": []}
    functions = {"writes (copied)": jax.jit(apply_write), "pure": jax.jit(apply_pure)}
    for f in functions.values():
        f(params, x).block_until_ready()
    for _ in range(15):  # interleaved, medians: the machine is shared
        for name, f in functions.items():
            start = time.perf_counter()
            f(params, x).block_until_ready()
            timings[name].append(time.perf_counter() - start)
    print({k: f"{sorted(v)[len(v) // 2] * 1e3:.2f} ms" for k, v in timings.items()})
    np.testing.assert_array_equal(np.asarray(x), np.ones((1024, 1024)))


# ---------------------------------------------------------------------------------------
# 3. Only the inputs JAX differentiates require grad


def test_in_place_op_on_an_input_differentiated_through_params_only() -> None:
    class Scales(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x.div_(255)
            return self.linear(x)

    torch.manual_seed(0)
    model = Scales()
    apply, params = torch_module_to_jax(model)
    x = jnp.full((4, 3), 255.0)
    loss = lambda p: jnp.sum(apply(p, x) ** 2)  # noqa: E731
    for grad in (jax.grad(loss), jax.jit(jax.grad(loss))):
        grads = grad(params)
        model.zero_grad()
        (model(torch.full((4, 3), 255.0)) ** 2).sum().backward()
        assert_close(grads[0], model.linear.weight.grad)
        np.testing.assert_array_equal(np.asarray(x), np.full((4, 3), 255.0))


def test_functional_batch_norm_differentiated_with_respect_to_x_only() -> None:
    class FunctionalBatchNorm(torch.nn.Module):
        def forward(self, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> Any:
            return F.batch_norm(x, mean, var, training=False)

    apply, params = torch_module_to_jax(FunctionalBatchNorm())
    x = jax.random.normal(jax.random.key(0), (5, 3))
    mean, var = jnp.asarray([0.5, -1.0, 2.0]), jnp.asarray([1.0, 4.0, 0.25])
    loss = lambda x: jnp.sum(apply(params, x, mean, var) ** 2)  # noqa: E731
    xt = to_torch(x).requires_grad_()
    (F.batch_norm(xt, to_torch(mean), to_torch(var), training=False) ** 2).sum().backward()
    for grad in (jax.grad(loss), jax.jit(jax.grad(loss))):
        assert_close(grad(x), xt.grad)


# ---------------------------------------------------------------------------------------
# 5. Structseq and scalar outputs


@pytest.mark.parametrize(
    ("name", "op", "fields"),
    [
        ("max", lambda x: torch.max(x, 1), ("values", "indices")),
        ("topk", lambda x: torch.topk(x, 2), ("values", "indices")),
        ("sort", lambda x: torch.sort(x, 1, descending=True), ("values", "indices")),
    ],
)
def test_torch_return_types_come_back_as_namedtuples(name: str, op: Any, fields: Any) -> None:
    class Op(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> Any:
            return op(x)

    apply, params = torch_module_to_jax(Op())
    x = jax.random.normal(jax.random.key(1), (4, 5))
    expected = op(to_torch(x))
    for f in (apply, jax.jit(apply)):
        out = f(params, x)
        assert isinstance(out, tuple) and out._fields == fields and type(out).__name__ == name
        assert_close(out.values, expected.values)
        np.testing.assert_array_equal(np.asarray(out.indices), expected.indices.numpy())
    grad = jax.grad(lambda x: jnp.sum(apply(params, x).values ** 2))(x)
    xt = to_torch(x).requires_grad_()
    (op(xt).values ** 2).sum().backward()
    assert_close(grad, xt.grad)


def test_python_scalars_come_back_as_0d_arrays() -> None:
    class Scalars(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> Any:
            return x * 2, x.shape[0], 2.5, bool(x.shape[0] > 1)

    apply, params = torch_module_to_jax(Scalars())
    for f in (apply, jax.jit(apply)):
        doubled, count, half, flag = f(params, jnp.ones(3))
        assert count.shape == () and jnp.issubdtype(count.dtype, jnp.integer) and int(count) == 3
        assert half.shape == () and jnp.issubdtype(half.dtype, jnp.floating) and float(half) == 2.5
        assert flag.shape == () and flag.dtype == jnp.bool_ and bool(flag)
        np.testing.assert_array_equal(np.asarray(doubled), [2.0] * 3)


# ---------------------------------------------------------------------------------------
# 6. The backward reuses the forward's graph; graphs never collected are bounded


def test_a_training_step_runs_the_module_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = ModuleCalls(monkeypatch)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Dropout(0.2), torch.nn.Linear(4, 1))
    apply, params = torch_module_to_jax(model.train())
    x = jnp.ones((8, 3))
    loss = lambda p: jnp.sum(apply(p, x) ** 2)  # noqa: E731
    for step in (jax.value_and_grad(loss), jax.jit(jax.value_and_grad(loss))):
        step(params)  # compiles, learns what the module writes
        before = calls.count
        step(params)
        assert calls.count - before == 1  # the forward; the backward used its graph
    assert len(autograd.GRAPHS) == 0


def test_graphs_whose_backward_never_comes_are_bounded() -> None:
    apply, params = torch_module_to_jax(torch.nn.Linear(3, 2))
    x = jnp.ones((2, 3))
    for _ in range(3 * autograd.MAX_KEPT_GRAPHS):
        jax.vjp(lambda p: apply(p, x), params)  # the backward is never called
    assert len(autograd.GRAPHS) == autograd.MAX_KEPT_GRAPHS
    # a forward-mode derivative takes its graph along
    autograd.GRAPHS.clear()
    jax.jvp(lambda p: apply(p, x), (params,), (params,))
    assert len(autograd.GRAPHS) == 0


# ---------------------------------------------------------------------------------------
# 8. A real model: a transformer layer with dropout, trained from JAX in train mode


@pytest.mark.parametrize("jit", [False, True])
def test_transformer_encoder_layer_with_dropout_gives_torchs_gradients(jit: bool) -> None:
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(d_model=16, nhead=2, dropout=0.1).train()
    apply, params = torch_module_to_jax(layer)
    x = jax.random.normal(jax.random.key(0), (5, 3, 16))

    def loss(params: Any, x: jax.Array) -> jax.Array:
        return jnp.sum(apply(params, x) ** 2)

    step = jax.value_and_grad(loss, argnums=(0, 1))
    step = jax.jit(step) if jit else step
    step(params, x)  # compile and infer shapes before the seeded call
    torch.manual_seed(1)
    value, (grads, x_grad) = step(params, x)
    torch.manual_seed(1)
    xt = to_torch(x).requires_grad_()
    reference = (layer(xt) ** 2).sum()
    reference.backward()
    assert_close(value, reference, rtol=1e-5)
    assert_close(x_grad, xt.grad, rtol=1e-4, atol=1e-5)
    for g, p in zip(grads, layer.parameters(), strict=True):
        assert_close(g, p.grad, rtol=1e-4, atol=1e-5)


def test_bfloat16_inputs_and_parameters_are_differentiated() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2).to(torch.bfloat16)
    apply, params = torch_module_to_jax(model)
    x = jnp.ones((2, 3), jnp.bfloat16)
    grads, x_grad = jax.grad(
        lambda p, x: jnp.sum(apply(p, x).astype(jnp.float32)), argnums=(0, 1)
    )(params, x)
    xt = torch.ones(2, 3, dtype=torch.bfloat16, requires_grad=True)
    model(xt).float().sum().backward()
    assert x_grad.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(x_grad, np.float32), xt.grad.float().numpy())
    np.testing.assert_array_equal(
        np.asarray(grads[0], np.float32), model.weight.grad.float().numpy()
    )
