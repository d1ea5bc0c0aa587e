"""WrappedJaxFunction: parameters, outputs, gradients, residuals, torch integration."""

from __future__ import annotations

import gc
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from torch_jax_interop import WrappedJaxFunction
from torch_jax_interop._call import Call
from torch_jax_interop._errors import DoubleBackwardError
from torch_jax_interop._pytree import LEAF_SPEC
from torch_jax_interop._wrapped import VjpBackend
from torch_jax_interop.interop_core._local_backend import LocalJaxBackend


def linear_tanh(params: dict[str, Any], x: jax.Array) -> jax.Array:
    return jnp.tanh(x @ params["w"] + params["b"])


def torch_linear_tanh(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x @ params["w"] + params["b"])


def make_params(dtype: Any = jnp.float32) -> dict[str, jax.Array]:
    k1, k2 = jax.random.split(jax.random.key(0))
    return {
        "w": jax.random.normal(k1, (4, 3), dtype=dtype),
        "b": jax.random.normal(k2, (3,), dtype=dtype),
    }


def torch_copies(module: WrappedJaxFunction) -> dict[str, torch.Tensor]:
    """Leaf copies of the module's parameters, for a torch reference computation."""
    return {
        name.removeprefix("params."): p.detach().clone().requires_grad_()
        for name, p in module.named_parameters()
    }


# ---------------------------------------------------------------------------------------
# parameters and state_dict


def test_single_array_gives_params_0_and_shares_memory() -> None:
    array = jax.random.normal(jax.random.key(0), (2, 1))
    module = WrappedJaxFunction(lambda p, x: jnp.dot(x, p), array)
    state = module.state_dict()
    assert list(state) == ["params.0"]
    np.testing.assert_array_equal(state["params.0"].numpy(), np.asarray(array))
    assert isinstance(module.params[0], torch.nn.Parameter)
    # default: the parameter shares the JAX array's buffer
    assert module.params[0].data_ptr() == array.unsafe_buffer_pointer()


def test_clone_params_copies() -> None:
    array = jnp.ones((3,))
    module = WrappedJaxFunction(lambda p, x: x * p, array, clone_params=True)
    assert module.params[0].data_ptr() != array.unsafe_buffer_pointer()
    with torch.no_grad():
        module.params[0].add_(1.0)
    np.testing.assert_array_equal(np.asarray(array), np.ones(3))


def test_nested_dict_keys_are_readable_paths() -> None:
    variables = {
        "params": {
            "Dense_0": {"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3)},
            "Dense_1": {"kernel": jnp.ones((3, 1)), "bias": jnp.zeros(1)},
        }
    }

    def apply(v: Any, x: jax.Array) -> jax.Array:
        for layer in ("Dense_0", "Dense_1"):
            x = x @ v["params"][layer]["kernel"] + v["params"][layer]["bias"]
        return x

    module = WrappedJaxFunction(apply, variables)
    # JAX's leaf order (sorted dict keys), the same as jax.tree_util.tree_leaves(variables)
    assert list(module.state_dict()) == [
        "params.params.Dense_0.bias",
        "params.params.Dense_0.kernel",
        "params.params.Dense_1.bias",
        "params.params.Dense_1.kernel",
    ]
    for tensor, array in zip(module.parameters(), jax.tree_util.tree_leaves(variables),
                             strict=True):
        assert tensor.data_ptr() == array.unsafe_buffer_pointer()
    assert module.params["params"]["Dense_1"]["kernel"].shape == (3, 1)


def test_list_params_and_load_state_dict_round_trip() -> None:
    params = [jnp.ones((2,)), jnp.full((2,), 2.0)]
    module = WrappedJaxFunction(lambda p, x: x * p[0] + p[1], params, clone_params=True)
    assert list(module.state_dict()) == ["params.0", "params.1"]
    x = torch.tensor([1.0, 2.0])
    torch.testing.assert_close(module(x), torch.tensor([3.0, 4.0]))

    new_state = {"params.0": torch.tensor([10.0, 20.0]), "params.1": torch.tensor([1.0, 1.0])}
    module.load_state_dict(new_state)
    torch.testing.assert_close(module(x), torch.tensor([11.0, 41.0]))

    other = WrappedJaxFunction(lambda p, x: x * p[0] + p[1], [jnp.zeros(2), jnp.zeros(2)])
    other.load_state_dict(module.state_dict())
    for a, b in zip(other.state_dict().values(), new_state.values(), strict=True):
        torch.testing.assert_close(a, b)


def test_integer_leaves_become_buffers() -> None:
    params = {"scale": jnp.float32(2.0), "offset": jnp.int32(3)}
    module = WrappedJaxFunction(lambda p, x: x * p["scale"] + p["offset"], params)
    assert [name for name, _ in module.named_parameters()] == ["params.scale"]
    assert [name for name, _ in module.named_buffers()] == ["params.offset"]
    x = torch.ones(2, requires_grad=True)
    module(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.full((2,), 2.0))


# ---------------------------------------------------------------------------------------
# gradients against torch autograd


def test_gradients_equal_torch_autograd_float64(x64: None) -> None:
    module = WrappedJaxFunction(linear_tanh, make_params(jnp.float64))
    reference = torch_copies(module)
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()

    out = module(x)
    assert out.dtype == torch.float64
    (out**2).sum().backward()
    (torch_linear_tanh(reference, x_ref) ** 2).sum().backward()

    # a gradient summed over the batch can cancel to near zero, where only an absolute
    # bound makes sense: float64 sums of a few O(1) terms differ by up to ~3e-15
    close = {"rtol": 1e-12, "atol": 1e-13}
    torch.testing.assert_close(module.params["w"].grad, reference["w"].grad, **close)
    torch.testing.assert_close(module.params["b"].grad, reference["b"].grad, **close)
    torch.testing.assert_close(x.grad, x_ref.grad, **close)


def test_gradcheck_inputs_params_and_kwargs(x64: None) -> None:
    def f(p: Any, x: jax.Array, *, y: jax.Array) -> jax.Array:
        return jnp.sin(x @ p["w"]) * y + p["b"] ** 2

    module = WrappedJaxFunction(f, make_params(jnp.float64))
    names = ["params.w", "params.b"]

    def as_function(w: torch.Tensor, b: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> Any:
        return torch.func.functional_call(
            module, dict(zip(names, (w, b), strict=True)), (x,), {"y": y}
        )

    w = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(as_function, (w, b, x, y))


def scalar_loss(p: Any, x: jax.Array) -> jax.Array:
    return jnp.mean(linear_tanh(p, x) ** 2)


def test_scalar_output_computes_gradients_with_the_forward_pass(x64: None) -> None:
    module = WrappedJaxFunction(scalar_loss, make_params(jnp.float64))
    backend = module.backend
    assert isinstance(backend, LocalJaxBackend)
    reference = torch_copies(module)
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()

    loss = module(x)
    assert loss.shape == () and loss.requires_grad
    engine = backend.engine
    assert (engine.fused_calls, engine.vjp_calls, engine.live_residuals) == (1, 1, 1)
    # a cotangent other than 1 (the gradients are scaled) and a used-twice graph
    (3.0 * loss + loss).backward()
    (4.0 * torch.mean(torch_linear_tanh(reference, x_ref) ** 2)).backward()
    assert backend.engine.live_residuals == 0
    # scaling the stored gradients rounds differently from carrying 4.0 through the chain
    # rule: a few ulps, float64
    close = {"rtol": 1e-10, "atol": 1e-13}
    torch.testing.assert_close(module.params["w"].grad, reference["w"].grad, **close)
    torch.testing.assert_close(module.params["b"].grad, reference["b"].grad, **close)
    torch.testing.assert_close(x.grad, x_ref.grad, **close)

    def as_function(w: torch.Tensor, x: torch.Tensor) -> Any:
        return torch.func.functional_call(module, {"params.w": w}, (x,))

    w = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(as_function, (w, x.detach().requires_grad_()))
    assert backend.engine.fused_calls > 1


def test_scalar_output_gradients_survive_retain_graph_and_accumulation() -> None:
    module = WrappedJaxFunction(scalar_loss, make_params())
    x = torch.randn(5, 4)
    loss = module(x)
    loss.backward(retain_graph=True)
    first = module.params["w"].grad.clone()
    # torch accumulates into .grad in place: the stored gradients must not change
    loss.backward(retain_graph=True)
    loss.backward()
    torch.testing.assert_close(module.params["w"].grad, 3 * first)
    assert module.backend.engine.live_residuals == 0
    with pytest.raises(RuntimeError, match="second time"):
        loss.backward()
    # a graph dropped without backward releases the stored gradients
    loss = module(x)
    assert module.backend.engine.live_residuals == 1
    del loss
    gc.collect()
    assert module.backend.engine.live_residuals == 0


def test_non_scalar_and_integer_outputs_keep_residuals() -> None:
    module = WrappedJaxFunction(lambda p, x: (x @ p["w"]).sum(axis=0, keepdims=True), make_params())
    module(torch.randn(5, 4)).sum().backward()
    int_module = WrappedJaxFunction(
        lambda p, x: (x @ p["w"]).sum().astype(jnp.int32), make_params()
    )
    out = int_module(torch.randn(5, 4))
    assert not out.requires_grad
    for backend in (module.backend, int_module.backend):
        assert isinstance(backend, LocalJaxBackend)
        assert backend.engine.fused_calls == 0 and backend.engine.vjp_calls == 1


def test_residuals_that_are_inputs_share_memory_and_detect_inplace_changes() -> None:
    module = WrappedJaxFunction(linear_tanh, make_params())
    backend = module.backend
    assert isinstance(backend, LocalJaxBackend)
    x = torch.randn(5, 4)
    reference = torch_copies(module)
    out = module(x)
    (program,) = backend.engine.programs.values()
    # `x @ w` keeps x for the gradient of w: it is the input itself, not a copy
    tensors = [*module.parameters(), x]
    assert [tensors[i] is x for i in program.saved_inputs] == [True]
    out.sum().backward()
    torch_linear_tanh(reference, x).sum().backward()
    torch.testing.assert_close(module.params["w"].grad, reference["w"].grad)

    out = module(x)
    x.mul_(2.0)  # would silently change the gradient of w: refused, as torch does
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
    assert backend.engine.live_residuals == 1  # refused backward keeps the graph's residuals
    del out
    gc.collect()
    assert backend.engine.live_residuals == 0


def test_scalar_output_with_aux() -> None:
    def f(p: Any, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        prediction = linear_tanh(p, x)
        return jnp.mean(prediction**2), {"prediction": prediction}

    module = WrappedJaxFunction(f, make_params(), has_aux=True)
    reference = torch_copies(module)
    x = torch.randn(5, 4)
    loss, aux = module(x)
    assert module.backend.engine.fused_calls == 1
    assert not aux["prediction"].requires_grad
    (2.0 * loss).backward()
    ref_prediction = torch_linear_tanh(reference, x)
    (2.0 * torch.mean(ref_prediction**2)).backward()
    torch.testing.assert_close(aux["prediction"], ref_prediction.detach())
    torch.testing.assert_close(module.params["w"].grad, reference["w"].grad)


def test_local_backend_flat_protocol() -> None:
    """The flat VjpBackend methods, called directly with a call plan (static leaves too)."""

    def f(x: jax.Array, scale: float, *, y: jax.Array) -> dict[str, jax.Array]:
        return {"b": x @ y, "a": jnp.sin(x) * scale}

    backend = LocalJaxBackend(f)
    x = torch.randn(2, 3, requires_grad=True)
    y = torch.randn(3, 4)  # no gradient wanted
    call, tensors = Call.of(backend, False, (x, 2.0), {"y": y})
    outputs, treedef, aux = backend.flat_call(call, tensors)
    assert aux is None
    outputs = treedef.unflatten(outputs)
    torch.testing.assert_close(outputs["a"], torch.sin(x.detach()) * 2.0)
    flat, treedef, _, handle = backend.flat_forward(call, tensors)
    assert backend.engine.live_residuals == 1
    assert [tuple(t.shape) for t in flat] == [(2, 3), (2, 4)]  # sorted keys: "a", "b"
    grad_x, grad_y = backend.flat_backward(handle, [torch.ones(2, 3), torch.ones(2, 4)],
                                           retain=False)
    assert grad_y is None
    expected = torch.cos(x.detach()) * 2.0 + torch.ones(2, 4) @ y.t()
    torch.testing.assert_close(grad_x, expected)
    assert backend.engine.live_residuals == 0
    # a static leaf is part of the compilation key: another value is another function
    call3, tensors3 = Call.of(backend, False, (x, 3.0), {"y": y})
    outputs, treedef, _ = backend.flat_call(call3, tensors3)
    torch.testing.assert_close(treedef.unflatten(outputs)["a"], torch.sin(x.detach()) * 3.0)
    _, _, _, handle = backend.flat_forward(call, tensors)
    backend.release(handle)
    backend.release(handle)  # idempotent
    assert backend.engine.live_residuals == 0
    with pytest.raises(RuntimeError, match="already freed"):
        backend.flat_backward(handle, [torch.ones(2, 3), torch.ones(2, 4)], retain=False)


def test_integer_output_whose_shape_follows_the_input() -> None:
    """Each input shape has its own output layout (the integer output's zero cotangent
    takes its shape): a second batch size must not reuse the first one's."""

    def f(p: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        return jnp.tanh(x @ p), jnp.argmax(x, axis=1)

    module = WrappedJaxFunction(f, jnp.ones((4, 3)))
    grads = []
    for batch in (5, 7):
        x = torch.randn(batch, 4)
        out, index = module(x)
        assert index.shape == (batch,) and not index.requires_grad
        out.sum().backward()
        grads.append(module.params[0].grad.clone())
        module.zero_grad()
        expected = x.t() @ (1 - torch.tanh(x @ torch.ones(4, 3)) ** 2)
        torch.testing.assert_close(grads[-1], expected)


def test_tuple_and_dict_outputs_are_all_differentiable(x64: None) -> None:
    def f(p: Any, x: jax.Array) -> Any:
        h = x @ p["w"]
        return {"first": jnp.sin(h), "rest": (h.sum(), jnp.exp(p["b"]))}

    def torch_f(p: Any, x: torch.Tensor) -> Any:
        h = x @ p["w"]
        return {"first": torch.sin(h), "rest": (h.sum(), torch.exp(p["b"]))}

    module = WrappedJaxFunction(f, make_params(jnp.float64))
    reference = torch_copies(module)
    x = torch.randn(2, 4, dtype=torch.float64)
    out, ref = module(x), torch_f(reference, x)
    assert set(out) == {"first", "rest"} and isinstance(out["rest"], tuple)
    for tensor in (out["first"], *out["rest"]):
        assert tensor.requires_grad and tensor.grad_fn is not None

    def loss(o: Any) -> torch.Tensor:
        return (o["first"] ** 2).sum() + 3 * o["rest"][0] + o["rest"][1].sum()

    loss(out).backward()
    loss(ref).backward()
    torch.testing.assert_close(module.params["w"].grad, reference["w"].grad)
    torch.testing.assert_close(module.params["b"].grad, reference["b"].grad)


def test_only_some_outputs_used() -> None:
    module = WrappedJaxFunction(lambda p, x: (x * p, x + p, (x * 2).astype(jnp.int32)), jnp.ones(3))
    x = torch.ones(3)
    a, b, c = module(x)
    assert c.dtype == torch.int32 and not c.requires_grad
    b.sum().backward()
    torch.testing.assert_close(module.params[0].grad, torch.ones(3))


def test_has_aux_outputs_carry_no_gradient() -> None:
    def f(p: jax.Array, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        y = x * p
        return y, {"norm": jnp.linalg.norm(y), "count": jnp.int32(x.shape[0])}

    module = WrappedJaxFunction(f, jnp.full((3,), 2.0), has_aux=True)
    x = torch.ones(3, requires_grad=True)
    out, aux = module(x)
    assert out.requires_grad
    assert not aux["norm"].requires_grad and aux["norm"].grad_fn is None
    assert int(aux["count"]) == 3
    out.sum().backward()
    torch.testing.assert_close(x.grad, torch.full((3,), 2.0))
    with torch.no_grad():
        out2, aux2 = module(x)
    torch.testing.assert_close(aux2["norm"], aux["norm"])


def test_frozen_parameters_get_no_gradient() -> None:
    module = WrappedJaxFunction(linear_tanh, make_params())
    module.params["w"].requires_grad_(False)
    x = torch.randn(2, 4, requires_grad=True)
    module(x).sum().backward()
    assert module.params["w"].grad is None
    assert module.params["b"].grad is not None
    assert x.grad is not None


COTANGENT_LOSSES = {
    "sum": lambda out: out.sum(),  # expanded (stride 0) cotangent
    "mean": lambda out: out.mean(),
    "expanded_weights": lambda out: (out * torch.tensor([1.0, 2.0, 3.0]).expand(5, 3)).sum(),
    "transposed": lambda out: (out.t() * torch.arange(15.0).reshape(3, 5)).sum(),
    "strided_slice": lambda out: out[:, ::2].sum() + out[::2].pow(2).sum(),
    "backward_with_noncontiguous": None,
}


@pytest.mark.parametrize("layout", list(COTANGENT_LOSSES))
def test_any_cotangent_layout(layout: str) -> None:
    module = WrappedJaxFunction(linear_tanh, make_params())
    reference = torch_copies(module)
    x = torch.randn(5, 4)
    out, ref = module(x), torch_linear_tanh(reference, x)
    loss = COTANGENT_LOSSES[layout]
    if loss is None:
        cotangent = torch.randn(3, 5).t()  # non-contiguous cotangent given directly
        assert not cotangent.is_contiguous()
        out.backward(cotangent)
        ref.backward(cotangent)
    else:
        loss(out).backward()
        loss(ref).backward()
    torch.testing.assert_close(module.params["w"].grad, reference["w"].grad)
    torch.testing.assert_close(module.params["b"].grad, reference["b"].grad)


def test_double_backward_raises_clear_error() -> None:
    module = WrappedJaxFunction(lambda p, x: jnp.sin(x * p), jnp.ones(3))
    x = torch.randn(3, requires_grad=True)
    (grad,) = torch.autograd.grad(module(x).sum(), x, create_graph=True)
    torch.testing.assert_close(grad, torch.cos(x.detach()))  # first order is right
    with pytest.raises(DoubleBackwardError, match="first derivatives only"):
        grad.sum().backward()


# ---------------------------------------------------------------------------------------
# residuals and compilation


def test_no_residuals_under_no_grad() -> None:
    module = WrappedJaxFunction(linear_tanh, make_params())
    backend = module.backend
    assert isinstance(backend, LocalJaxBackend)
    x = torch.randn(2, 4)
    with torch.no_grad():
        out = module(x)
    assert not out.requires_grad
    assert backend.engine.vjp_calls == 0 and backend.engine.live_residuals == 0
    # nothing requires grad -> no residuals either
    for p in module.parameters():
        p.requires_grad_(False)
    module(x)
    assert backend.engine.vjp_calls == 0
    assert isinstance(backend, VjpBackend)


def test_residuals_released_after_backward_and_when_graph_dropped() -> None:
    module = WrappedJaxFunction(linear_tanh, make_params())
    backend = module.backend
    x = torch.randn(2, 4)
    out = module(x)
    assert backend.engine.live_residuals == 1
    out.sum().backward()
    assert backend.engine.live_residuals == 0  # freed by backward (no retain_graph)
    with pytest.raises(RuntimeError, match="second time"):
        out.sum().backward()

    out = module(x)
    assert backend.engine.live_residuals == 1
    del out
    gc.collect()
    assert backend.engine.live_residuals == 0  # freed with the torch graph


def test_retain_graph_allows_a_second_backward() -> None:
    module = WrappedJaxFunction(linear_tanh, make_params())
    out = module(torch.randn(2, 4))
    out.sum().backward(retain_graph=True)
    first = module.params["w"].grad.clone()
    assert module.backend.engine.live_residuals == 1
    out.sum().backward()
    torch.testing.assert_close(module.params["w"].grad, 2 * first)
    assert module.backend.engine.live_residuals == 0


def test_no_retrace_per_call() -> None:
    traces = []

    def f(p: Any, x: jax.Array) -> jax.Array:
        traces.append(x.shape)  # runs only while JAX traces
        return linear_tanh(p, x)

    module = WrappedJaxFunction(f, make_params())
    x = torch.randn(2, 4)
    for _ in range(5):
        module(x).sum().backward()
    assert len(traces) == 1
    for _ in range(3):
        with torch.no_grad():
            module(x)
    assert len(traces) == 2  # the plain (no residuals) function, traced once
    module(torch.randn(7, 4)).sum().backward()
    assert len(traces) == 3  # a new shape is a new signature
    module(x).sum().backward()
    assert len(traces) == 3


# ---------------------------------------------------------------------------------------
# torch integration


def test_optimizer_updates_are_seen_by_the_next_forward() -> None:
    torch.manual_seed(0)
    module = WrappedJaxFunction(linear_tanh, make_params(), clone_params=True)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.5)
    x = torch.randn(16, 4)
    target = torch_linear_tanh({"w": torch.randn(4, 3) * 0.5, "b": torch.zeros(3)}, x)
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(module(x), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        with torch.no_grad():  # the forward sees exactly the current parameters
            expected = torch_linear_tanh(dict(w=module.params["w"], b=module.params["b"]), x)
            torch.testing.assert_close(module(x), expected)
    assert losses[-1] < 0.7 * losses[0]
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False))


def test_to_dtype_and_device(x64: None) -> None:
    module = WrappedJaxFunction(linear_tanh, make_params()).to("cpu").double()
    assert module.params["w"].dtype == torch.float64
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    out = module(x)
    assert out.dtype == torch.float64
    out.sum().backward()
    assert module.params["w"].grad.dtype == torch.float64


def test_inside_sequential_matches_torch() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(6, 4)
    wrapped = WrappedJaxFunction(linear_tanh, make_params())
    model = torch.nn.Sequential(linear, wrapped)
    reference = torch_copies(wrapped)
    linear_ref = torch.nn.Linear(6, 4)
    linear_ref.load_state_dict(linear.state_dict())
    x = torch.randn(3, 6)
    model(x).pow(2).sum().backward()
    torch_linear_tanh(reference, linear_ref(x)).pow(2).sum().backward()
    torch.testing.assert_close(linear.weight.grad, linear_ref.weight.grad)
    torch.testing.assert_close(wrapped.params["w"].grad, reference["w"].grad)


def test_kwargs_and_static_arguments() -> None:
    def f(p: jax.Array, x: jax.Array, *, y: jax.Array, power: int, tag: str) -> jax.Array:
        assert isinstance(power, int) and tag == "ok"  # static, not traced
        return (x * p) ** power + y

    module = WrappedJaxFunction(f, jnp.full((3,), 2.0))
    x, y = torch.ones(3), torch.ones(3, requires_grad=True)
    out = module(x, y=y, power=3, tag="ok")
    torch.testing.assert_close(out, torch.full((3,), 9.0))
    out.sum().backward()
    torch.testing.assert_close(y.grad, torch.ones(3))
    torch.testing.assert_close(module.params[0].grad, torch.full((3,), 12.0))


# torch warns from its own code: importing inductor (the default backend), and dynamo
# reading `.grad` of the (non-leaf) outputs of the graph-broken call while it resumes
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning")
def test_torch_compile_runs() -> None:
    torch.manual_seed(0)
    wrapped = WrappedJaxFunction(linear_tanh, make_params())
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), wrapped, torch.nn.ReLU())
    compiled = torch.compile(model)  # the default backend; graph breaks around JAX
    x = torch.randn(2, 5)
    try:
        out = compiled(x)
        torch.testing.assert_close(out, model(x))
        out.sum().backward()
        grad_w = wrapped.params["w"].grad.clone()
        model.zero_grad()
        model(x).sum().backward()
        torch.testing.assert_close(grad_w, wrapped.params["w"].grad)
        assert model[0].weight.grad is not None
    finally:
        torch._dynamo.reset()


def test_seed_readme_example() -> None:
    def some_jax_function(params: jax.Array, x: jax.Array) -> jax.Array:
        return jnp.dot(x, params)

    module = WrappedJaxFunction(some_jax_function, jax.random.normal(jax.random.key(0), (2, 1)))
    module = module.to("cpu")
    assert list(dict(module.state_dict())) == ["params.0"]
    x, y = torch.randn(2), torch.rand(1)
    loss = torch.nn.functional.mse_loss(module(x), y)
    loss.backward()
    assert module.params[0].grad.shape == (2, 1)
    model = torch.nn.Sequential(torch.nn.Linear(123, 2), module)
    assert model(torch.randn(5, 123)).shape == (5, 1)


# ---------------------------------------------------------------------------------------
# backend selection and the torch-only import


class TorchBackend:
    """A real VjpBackend that computes with torch (stands in for a remote worker)."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        self.released: list[int] = []
        self.backwards = 0

    def flat_call(self, call: Call, tensors: list[torch.Tensor]) -> tuple[list, Any, Any]:
        args, kwargs = call.arguments(tensors)
        with torch.no_grad():
            return [self.fn(*args, **kwargs)], LEAF_SPEC, None

    def flat_forward(self, call: Call, tensors: list[torch.Tensor]
                     ) -> tuple[list, Any, Any, Any]:
        leaves = [t.detach().requires_grad_(t.requires_grad) for t in tensors]
        args, kwargs = call.arguments(leaves)
        with torch.enable_grad():
            out = self.fn(*args, **kwargs)
        return [out.detach()], LEAF_SPEC, None, (out, leaves)

    def flat_backward(self, handle: Any, cotangents: Any, *, retain: bool) -> list[Any]:
        self.backwards += 1
        out, leaves = handle
        wanted = [leaf for leaf in leaves if leaf.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, cotangents, retain_graph=retain))
        return [next(grads) if leaf.requires_grad else None for leaf in leaves]

    def release(self, handle: Any) -> None:
        self.released.append(id(handle))


class RemoteLikeFunction:
    def __init__(self) -> None:
        self.backend = TorchBackend(lambda p, x: (x * p).sin())

    def __torch_jax_interop_backend__(self) -> TorchBackend:
        return self.backend


def test_backend_from_the_function_object_is_used() -> None:
    function = RemoteLikeFunction()
    module = WrappedJaxFunction(function, torch.ones(3))  # torch params, as a client has
    assert module.backend is function.backend
    x = torch.randn(3, requires_grad=True)
    module(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.cos(x.detach()))
    torch.testing.assert_close(module.params[0].grad, x.detach() * torch.cos(x.detach()))
    assert function.backend.backwards == 1
    out = module(x)
    del out
    gc.collect()
    assert len(function.backend.released) == 1


def test_importing_wrapped_does_not_import_jax(run_python: Any) -> None:
    result = run_python(
        """
        import sys
        import torch_jax_interop._wrapped as wrapped
        import torch
        assert "jax" not in sys.modules, sorted(m for m in sys.modules if m.startswith("jax"))
        print("ok")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_repeated_calls_take_the_plan_and_stay_exact(dtype: torch.dtype) -> None:
    """The first run of a signature decides how its tensors cross (numpy views or DLPack
    in, checked or direct exports out); later runs take that plan: same values, same
    gradients, integer outputs still without gradient, odd cotangent layouts still fine."""

    def fn(p: dict[str, jax.Array], x: jax.Array) -> Any:
        h = x @ p["w"] + p["b"]
        return jnp.tanh(h), (h > 0).astype(jnp.int32)

    module = WrappedJaxFunction(fn, make_params(jnp.dtype(str(dtype).split(".")[1])))
    backend = module.backend
    assert isinstance(backend, LocalJaxBackend)
    tolerance = {"rtol": 2e-2, "atol": 2e-2} if dtype != torch.float32 else {}
    for step in range(3):
        reference = torch_copies(module)
        x = torch.randn(5, 4).to(dtype)
        out, positive = module(x)
        assert positive.dtype == torch.int32 and not positive.requires_grad
        expected = torch_linear_tanh(reference, x)
        torch.testing.assert_close(out, expected, **tolerance)
        cotangent = torch.randn(3, 5).to(dtype).t() if step == 1 else None  # strided
        if cotangent is None:
            out.sum().backward()  # an expanded (stride 0) cotangent
            expected.sum().backward()
        else:
            out.backward(cotangent)
            expected.backward(cotangent)
        for name in ("w", "b"):
            torch.testing.assert_close(module.params[name].grad, reference[name].grad,
                                       **tolerance)
        module.zero_grad()
    (program,) = backend.engine.programs.values()
    plan = program.bridge
    assert plan.numpy_inputs == (dtype != torch.bfloat16)  # bfloat16 has no numpy view
    assert plan.export_outputs and plan.export_grads
    assert backend.engine.live_residuals == 0
