"""Code written for torch-jax-interop 0.0.8 keeps working: ``WrappedJaxScalarFunction`` and
state_dicts saved by 0.0.8's ``WrappedJaxFunction`` (see docs/migration.md)."""

from __future__ import annotations

import copy
import inspect
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from support.pytree_models import init_dense, init_mlp, mlp_apply

import torch_jax_interop
from torch_jax_interop import (
    WrappedJaxFunction,
    WrappedJaxScalarFunction,
    interop_core,
    jax_to_torch,
    torch_to_jax,
)

pytestmark = pytest.mark.usefixtures("jax_default_cpu")


# ---------------------------------------------------------------------------------------
# WrappedJaxScalarFunction


def _loss_with_aux(params: dict[str, jax.Array], x: jax.Array, y: jax.Array) -> Any:
    logits = x @ params["w"] + params["b"]
    return jnp.mean((logits - y) ** 2), {"logits": logits}


def _params() -> dict[str, jax.Array]:
    return {"w": jax.random.normal(jax.random.key(0), (4, 3)), "b": jnp.full((3,), 0.1)}


def test_scalar_function_has_the_seed_signature_and_exports() -> None:
    signature = inspect.signature(WrappedJaxScalarFunction.__init__)
    assert list(signature.parameters) == ["self", "jax_function", "jax_params", "has_aux",
                                          "clone_params"]
    assert signature.parameters["has_aux"].default is True  # as in 0.0.8
    assert signature.parameters["clone_params"].default is False
    assert issubclass(WrappedJaxScalarFunction, WrappedJaxFunction)
    assert interop_core.WrappedJaxScalarFunction is WrappedJaxScalarFunction
    assert "WrappedJaxScalarFunction" in torch_jax_interop.__all__


def test_scalar_function_with_aux_gives_value_and_grad_gradients(x64: None) -> None:
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), _params())
    module = WrappedJaxScalarFunction(_loss_with_aux, params, clone_params=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(5, 3, generator=g, dtype=torch.float64)
    loss, aux = module(x, y)
    assert loss.shape == () and loss.requires_grad
    assert not aux["logits"].requires_grad
    (2.0 * loss).backward()  # 0.0.8 asserted a cotangent of 1; any cotangent is exact here
    (value, expected_aux), (grad_params, grad_x) = jax.value_and_grad(
        _loss_with_aux, argnums=(0, 1), has_aux=True)(params, x.detach().numpy(), y.numpy())
    np.testing.assert_allclose(loss.item(), float(value), rtol=1e-12)
    np.testing.assert_allclose(aux["logits"].numpy(), np.asarray(expected_aux["logits"]))
    for name in ("w", "b"):
        np.testing.assert_allclose(module.params[name].grad.numpy(),
                                   2.0 * np.asarray(grad_params[name]), rtol=1e-12)
    np.testing.assert_allclose(x.grad.numpy(), 2.0 * np.asarray(grad_x), rtol=1e-12)
    engine = module.backend.engine
    assert engine.fused_calls == engine.vjp_calls == 1  # gradients came with the forward
    assert engine.live_residuals == 0


def test_scalar_function_without_aux_returns_the_loss_alone() -> None:
    module = WrappedJaxScalarFunction(lambda p, x: jnp.sum(jnp.sin(x * p)), jnp.ones(3),
                                      has_aux=False)
    x = torch.tensor([0.1, 0.2, 0.3])
    loss = module(x)
    assert isinstance(loss, torch.Tensor) and loss.shape == ()
    loss.backward()
    torch.testing.assert_close(module.params[0].grad, x * torch.cos(x))
    with torch.no_grad():
        torch.testing.assert_close(module(x), torch.sin(x).sum())


@pytest.mark.parametrize(
    ("fn", "has_aux", "got"),
    [
        (lambda p, x: x * p, False, r"gave a \(3,\) torch.float32 tensor"),
        (lambda p, x: (x * p, None), True, r"`\(loss, aux\)`; .* gave a \(3,\) torch.float32"),
        (lambda p, x: (jnp.sum(x * p).astype(jnp.int32), 0), True, r"gave a \(\) torch.int32"),
        (lambda p, x: (jnp.sum(x * p),), False, "gave a `tuple`"),
    ],
)
@pytest.mark.parametrize("grad", [True, False])
def test_scalar_function_refuses_other_outputs(fn: Any, has_aux: bool, got: str,
                                               grad: bool) -> None:
    module = WrappedJaxScalarFunction(fn, jnp.ones(3), has_aux=has_aux)
    with torch.set_grad_enabled(grad), pytest.raises(
            TypeError, match=rf"one real floating-point scalar .*{got}.* WrappedJaxFunction"):
        module(torch.ones(3))


def test_scalar_function_with_has_aux_needs_a_pair() -> None:
    module = WrappedJaxScalarFunction(lambda p, x: jnp.sum(x * p), jnp.ones(3))  # has_aux=True
    for grad in (True, False):
        with torch.set_grad_enabled(grad), pytest.raises(
                TypeError, match=r"has_aux=True .* pair `\(output, aux\)`.* pass has_aux=False"):
            module(torch.ones(3))


# ---------------------------------------------------------------------------------------
# state_dicts saved by 0.0.8


class SeedWrappedJaxFunction(torch.nn.Module):
    """How 0.0.8's ``WrappedJaxFunction.__init__`` stored the parameters: a ParameterList of
    ``jax.tree.flatten(jax_params)`` converted with ``jax_to_torch``, so the state_dict keys
    are ``params.0``, ``params.1``, ... in JAX's leaf order (other leaves are attributes)."""

    def __init__(self, jax_params: Any) -> None:
        super().__init__()
        flat_params, self.params_treedef = jax.tree.flatten(jax_params)
        self.params = torch.nn.ParameterList(map(jax_to_torch, flat_params))


def _nested() -> dict[str, Any]:
    """Keys by path and by leaf index disagree, and a node holds leaves and sub-trees."""
    key = jax.random.key(3)
    a, b, c, d, e = jax.random.split(key, 5)
    return {"dense": {"kernel": jax.random.normal(a, (4, 3)), "bias": jax.random.normal(b, (3,))},
            "scale": jax.random.normal(c, (3,)),
            "blocks": [jax.random.normal(d, (2,)), {"w": jax.random.normal(e, (3, 3))}]}


@pytest.mark.parametrize("make", [_nested, init_dense, init_mlp, lambda: [jnp.ones(2)]],
                         ids=["nested-dict", "flax-struct", "equinox-mlp", "flat-list"])
def test_seed_state_dict_loads_by_leaf_index(make: Any) -> None:
    saved = make()
    seed_state = SeedWrappedJaxFunction(saved).state_dict()
    leaves = jax.tree_util.tree_leaves(saved)
    arrays = [leaf for leaf in leaves if isinstance(leaf, jax.Array)]
    assert len(seed_state) == len(arrays)
    assert all(key.startswith("params.") for key in seed_state)

    fresh = jax.tree_util.tree_map(
        lambda leaf: jnp.zeros_like(leaf) if isinstance(leaf, jax.Array) else leaf, saved)
    module = WrappedJaxFunction(lambda p, x: x, fresh, clone_params=True)
    result = module.load_state_dict(seed_state)
    assert not result.missing_keys and not result.unexpected_keys
    # every leaf got the value of the same leaf of the saved tree (JAX's leaf order)
    loaded = jax.tree_util.tree_leaves(module.parameter_tree())
    expected = [np.asarray(leaf) for leaf in leaves if isinstance(leaf, jax.Array)]
    got = [leaf.detach().numpy() for leaf in loaded if isinstance(leaf, torch.Tensor)]
    assert len(got) == len(expected)
    for ours, theirs in zip(got, expected, strict=True):
        np.testing.assert_array_equal(ours, theirs)
    # and our own keys still load as they are
    again = WrappedJaxFunction(lambda p, x: x, fresh, clone_params=True)
    again.load_state_dict(module.state_dict())
    for ours, theirs in zip(again.parameters(), module.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs)


def test_seed_state_dict_inside_a_container_and_trains_on() -> None:
    params = _nested()
    seed = torch.nn.Sequential(torch.nn.Linear(2, 4), SeedWrappedJaxFunction(params))
    fresh = jax.tree_util.tree_map(jnp.zeros_like, params)

    def apply(p: dict[str, Any], x: jax.Array) -> jax.Array:
        h = x @ p["dense"]["kernel"] + p["dense"]["bias"] * p["scale"]
        return h @ p["blocks"][1]["w"] + p["blocks"][0].sum()

    model = torch.nn.Sequential(torch.nn.Linear(2, 4),
                                WrappedJaxFunction(apply, fresh, clone_params=True))
    model.load_state_dict(seed.state_dict())
    x = torch.randn(5, 2)
    expected = apply(params, seed[0](x).detach().numpy())
    out = model(x)
    np.testing.assert_allclose(out.detach().numpy(), np.asarray(expected), rtol=1e-5,
                               atol=1e-6)
    out.sum().backward()
    assert model[1].params["blocks"][1]["w"].grad.abs().sum() > 0


def test_seed_state_dict_with_another_leaf_count_is_refused() -> None:
    seed_state = SeedWrappedJaxFunction(_nested()).state_dict()
    del seed_state["params.4"]
    module = WrappedJaxFunction(lambda p, x: x, _nested(), clone_params=True)
    before = [p.detach().clone() for p in module.parameters()]
    for strict in (True, False):
        with pytest.raises(RuntimeError, match=r"has 4 parameter\(s\) in torch-jax-interop "
                           r"0.0.8's layout .* have 5 array leaves"):
            module.load_state_dict(seed_state, strict=strict)
    for old, new in zip(before, module.parameters(), strict=True):
        torch.testing.assert_close(old, new)  # nothing was loaded


def test_seed_state_dict_with_another_shape_is_refused() -> None:
    saved = _nested()
    saved["scale"] = jnp.ones(7)
    seed_state = SeedWrappedJaxFunction(saved).state_dict()
    module = WrappedJaxFunction(lambda p, x: x, _nested())
    # JAX's leaf order: blocks.0, blocks.1.w, dense.bias, dense.kernel, scale
    with pytest.raises(RuntimeError, match=r"`params.4` .* is leaf 4, which is `params.scale` "
                       r"here: shape \(7,\) in the state_dict, \(3,\) in this module"):
        module.load_state_dict(seed_state)


def test_seed_index_of_a_leaf_that_is_not_an_array_is_refused() -> None:
    model = init_mlp()
    seed_state = SeedWrappedJaxFunction(model).state_dict()
    leaves = jax.tree_util.tree_leaves(model)
    function_leaf = next(i for i, leaf in enumerate(leaves) if not isinstance(leaf, jax.Array))
    last = max(int(key.split(".")[1]) for key in seed_state)
    seed_state[f"params.{function_leaf}"] = seed_state.pop(f"params.{last}")
    module = WrappedJaxFunction(mlp_apply, init_mlp())
    with pytest.raises(RuntimeError, match=rf"`params.{function_leaf}` .* names leaf "
                       rf"{function_leaf}, which is not an array"):
        module.load_state_dict(seed_state)


def test_a_deep_copy_trains_on_its_own() -> None:
    """``copy.deepcopy(module)`` (EMA models, 0.0.8 code) works: the copy owns its
    parameters and compiles its own programs."""
    module = WrappedJaxFunction(lambda p, x: jnp.tanh(x @ p["w"]), {"w": jnp.ones((3, 2))},
                                clone_params=True)
    x = torch.randn(4, 3)
    module(x).sum().backward()  # compiled before the copy
    twin = copy.deepcopy(module)
    assert twin.params["w"].data_ptr() != module.params["w"].data_ptr()
    with torch.no_grad():
        twin.params["w"].add_(1.0)
    twin.zero_grad()
    twin(x).sum().backward()
    torch.testing.assert_close(module.params["w"].detach(), torch.ones(3, 2))
    expected = torch.func.grad(lambda w: torch.tanh(x @ w).sum())(torch.full((3, 2), 2.0))
    torch.testing.assert_close(twin.params["w"].grad, expected)
    assert twin.backend.engine.vjp_calls == 1 and module.backend.engine.vjp_calls == 1
    twin.load_state_dict({"params.0": torch.zeros(3, 2)})  # 0.0.8 keys reach the copy
    torch.testing.assert_close(twin.params["w"].detach(), torch.zeros(3, 2))


def _flax_like() -> dict[str, Any]:
    keys = jax.random.split(jax.random.key(7), 4)
    return {"params": {"Dense_0": {"kernel": jax.random.normal(keys[0], (4, 5)),
                                   "bias": jax.random.normal(keys[1], (5,))},
                       "Dense_1": {"kernel": jax.random.normal(keys[2], (5, 2)),
                                   "bias": jax.random.normal(keys[3], (2,))}}}


def _flax_like_apply(variables: dict[str, Any], x: jax.Array) -> jax.Array:
    p = variables["params"]
    h = jnp.tanh(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
    return h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]


def test_parameters_order_is_jax_leaf_order_but_own_arrays_come_first() -> None:
    """As README and docs/migration.md say: JAX's leaf order, except that torch lists a
    node's own arrays before its sub-trees; Flax variables and Equinox modules have no such
    node, so 0.0.8's positions (an optimiser's state) hold for them."""
    mixed = WrappedJaxFunction(lambda p, x: x, {"a": {"x": jnp.ones(1)}, "b": jnp.ones(2)})
    assert [name for name, _ in mixed.named_parameters()] == ["params.b", "params.a.x"]
    for params in (_flax_like(), init_mlp(), init_dense()):
        module = WrappedJaxFunction(lambda p, x: x, params)
        arrays = [leaf for leaf in jax.tree_util.tree_leaves(params)
                  if isinstance(leaf, jax.Array)]
        assert [tuple(p.shape) for p in module.parameters()] == [a.shape for a in arrays]
        for parameter, array in zip(module.parameters(), arrays, strict=True):
            assert parameter.data_ptr() == array.unsafe_buffer_pointer()  # the same leaf


def test_seed_model_and_optimiser_state_resume_training() -> None:
    """A 0.0.8 checkpoint (model and Adam state, saved mid-training) resumes here exactly
    as an uninterrupted run of this package would have continued."""
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(6, 4, generator=g), torch.randn(6, 2, generator=g)) for _ in range(4)]

    def step(module: torch.nn.Module, optimiser: torch.optim.Optimizer, x: Any, y: Any) -> None:
        optimiser.zero_grad()
        torch.mean((module(x) - y) ** 2).backward()
        optimiser.step()

    # the uninterrupted run
    reference = WrappedJaxFunction(_flax_like_apply, _flax_like(), clone_params=True)
    reference_opt = torch.optim.Adam(reference.parameters(), lr=0.05)
    for x, y in data:
        step(reference, reference_opt, x, y)

    # "0.0.8" trained two steps: its parameters() were its ParameterList, JAX's leaf order,
    # which is ours for Flax variables (test above), so its Adam state is this one's...
    seed_like = WrappedJaxFunction(_flax_like_apply, _flax_like(), clone_params=True)
    seed_opt = torch.optim.Adam(seed_like.parameters(), lr=0.05)
    for x, y in data[:2]:
        step(seed_like, seed_opt, x, y)
    saved = _flax_like()
    trained = [p.detach().numpy() for p in seed_like.parameters()]
    leaves, treedef = jax.tree.flatten(saved)
    checkpoint = SeedWrappedJaxFunction(jax.tree.unflatten(treedef, [jnp.asarray(t) for t in
                                                                     trained])).state_dict()
    assert list(checkpoint) == [f"params.{i}" for i in range(len(leaves))]

    # ...and this package resumes from its checkpoint
    fresh = jax.tree_util.tree_map(jnp.zeros_like, _flax_like())
    resumed = WrappedJaxFunction(_flax_like_apply, fresh, clone_params=True)
    resumed.load_state_dict(checkpoint)
    resumed_opt = torch.optim.Adam(resumed.parameters(), lr=0.05)
    resumed_opt.load_state_dict(seed_opt.state_dict())
    for x, y in data[2:]:
        step(resumed, resumed_opt, x, y)
    for ours, theirs in zip(resumed.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def test_torch_to_jax_of_a_module_names_torch_module_to_jax() -> None:
    """0.0.8 converted a module with ``torch_to_jax``; here that says what to call (a
    two-layer ``nn.Sequential`` would otherwise unpack into two layers without a word)."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Tanh())
    with pytest.raises(TypeError, match=r"not a `Sequential` module: use `apply, params = "
                       r"torch_module_to_jax\(module\)`"):
        torch_to_jax(model)
    tree = torch_to_jax({"model": model, "x": torch.ones(2)})  # inside a pytree: a leaf
    assert tree["model"] is model and isinstance(tree["x"], jax.Array)
