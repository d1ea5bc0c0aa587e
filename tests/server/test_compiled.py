"""The worker's CompiledFunction over the engine: which leaves it differentiates, scalar
outputs, residuals that are inputs, and the compile cache keeping no request's arrays."""

from __future__ import annotations

import gc
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support.served import mlp_apply, mlp_loss

from torch_jax_interop import _pytree
from torch_jax_interop._errors import InvalidArgumentError
from torch_jax_interop.server._compiled import PARAMS_ATTRIBUTE, CompiledFunction


def _params() -> dict[str, jax.Array]:
    k1, k2 = jax.random.split(jax.random.key(0))
    return {"w1": jax.random.normal(k1, (8, 5)) * 0.3, "b1": jnp.zeros(5),
            "w2": jax.random.normal(k2, (5, 3)) * 0.3, "b2": jnp.zeros(3)}


def _program(function: CompiledFunction, args: tuple, diff: tuple[int, ...],
             has_aux: bool = False) -> tuple[object, list]:
    """What the servicer does with a decoded request: the wire structure and flat arrays."""
    arrays, spec = _pytree.flatten(args, is_leaf=lambda v: isinstance(v, (jax.Array,
                                                                         np.ndarray)))
    key = (spec, tuple((a.dtype, a.shape) for a in arrays))
    return function.program(key, spec, None, has_aux, diff), arrays


def test_leaves_without_gradient_are_not_differentiated() -> None:
    function = CompiledFunction("mlp_apply", mlp_apply)
    params, x = _params(), np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    # leaves, in JAX's order (sorted keys): b1, b2, w1, w2, then x (4)
    program, arrays = _program(function, (params, x), (0, 1, 2, 3))
    out, _, residuals = function.call_with_vjp(program, arrays)
    cotangent = np.ones(out.shape, np.float32)
    (grad_params, grad_x), grad_kwargs = function.backward(residuals, [cotangent],
                                                           retain=False)
    assert grad_x is None and grad_kwargs == {}  # the input's gradient was never computed
    expected = jax.grad(lambda p: jnp.sum(mlp_apply(p, x)))(params)
    for name in params:
        np.testing.assert_allclose(grad_params[name], expected[name], rtol=1e-5, atol=1e-6)
    # `x @ w1` keeps x: the residual is the input array itself (Note [Residuals that are
    # inputs]), not a copy returned by the jitted forward
    assert 4 in program.saved_inputs
    # everything differentiated
    program, arrays = _program(function, (params, x), (0, 1, 2, 3, 4))
    _, _, residuals = function.call_with_vjp(program, arrays)
    (_, grad_x), _ = function.backward(residuals, [cotangent], retain=False)
    expected_x = jax.grad(lambda x: jnp.sum(mlp_apply(params, x)))(x)
    np.testing.assert_allclose(grad_x, expected_x, rtol=1e-5, atol=1e-6)


def test_scalar_output_keeps_gradients_and_scales_them() -> None:
    function = CompiledFunction("mlp_loss", mlp_loss)
    params = _params()
    x = np.random.default_rng(1).standard_normal((4, 8)).astype(np.float32)
    labels = np.array([0, 2, 1, 2], np.int32)
    program, arrays = _program(function, (params, x, labels), (0, 1, 2, 3))
    loss, _, residuals = function.call_with_vjp(program, arrays)
    assert program.fused and residuals.residuals.kept is None  # gradients, no vjp function
    expected_loss, expected = jax.value_and_grad(mlp_loss)(params, x, labels)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-6)
    (grad_params, grad_x, grad_labels), _ = function.backward(
        residuals, [np.float32(2.5) * np.ones((), np.float32)], retain=False
    )
    assert grad_x is None and grad_labels is None
    for name in params:
        np.testing.assert_allclose(grad_params[name], 2.5 * expected[name], rtol=1e-5,
                                   atol=1e-7)


def test_the_compile_cache_keeps_no_request_arrays() -> None:
    function = CompiledFunction("mlp_apply", mlp_apply)
    params, x = _params(), np.ones((4, 8), np.float32)
    program, arrays = _program(function, (params, x), (0, 1, 2, 3))
    out, _, residuals = function.call_with_vjp(program, arrays)
    function.backward(residuals, [np.ones(out.shape, np.float32)], retain=False)
    function.call(*_program(function, (params, x), ()))
    watched = weakref.ref(x)
    del x, arrays, residuals, out
    gc.collect()
    assert watched() is None  # programs (and their traces) hold no input of a request
    assert len(function.engine.programs) == 2


def test_declared_params_rebuild_a_flat_list() -> None:
    def apply(params: dict[str, jax.Array], x: jax.Array) -> jax.Array:
        return x * params["a"] + params["b"]

    setattr(apply, PARAMS_ATTRIBUTE, lambda: {"b": jnp.zeros(2), "a": jnp.ones(2)})
    function = CompiledFunction("apply", apply)
    a, b, x = np.full(2, 3.0, np.float32), np.full(2, 1.0, np.float32), np.ones(2, np.float32)
    program, arrays = _program(function, ([a, b], x), (0, 1))  # JAX order: a, b
    out, _, residuals = function.call_with_vjp(program, arrays)
    np.testing.assert_allclose(out, [4.0, 4.0])
    (grads, grad_x), _ = function.backward(residuals, [np.ones(2, np.float32)], retain=False)
    np.testing.assert_allclose(grads[0], x)  # the gradients come back as the flat list
    np.testing.assert_allclose(grads[1], [1.0, 1.0])
    assert grad_x is None
    with pytest.raises(InvalidArgumentError, match="declares parameters with 2 arrays"):
        _program(function, ([a, b, b], x), ())


def test_the_compile_cache_is_bounded() -> None:
    traces: list[tuple[int, ...]] = []

    def add_one(x: jax.Array) -> jax.Array:
        traces.append(x.shape)  # runs only while JAX traces
        return x + 1

    function = CompiledFunction("add_one", add_one, max_programs=2)
    for n in (1, 2, 3, 2, 1):
        out, _ = function.call(*_program(function, (np.ones(n, np.float32),), ()))
        np.testing.assert_array_equal(out, np.full(n, 2.0))
    assert len(function.engine.programs) == 2
    # (2,) stayed cached; (1,) was the least recently used when (3,) came: traced again
    assert traces == [(1,), (2,), (3,), (1,)]
    # a hit counts as a use: (2,) (used after (3,)) is still there, (3,) went for (1,)
    function.call(*_program(function, (np.ones(2, np.float32),), ()))
    assert traces == [(1,), (2,), (3,), (1,)]


def test_a_result_of_inputs_passed_through_is_those_inputs_on_every_call() -> None:
    """Outputs that are inputs passed through (in any structure, aux too) come back as the
    input arrays themselves, call after call; a result with a computed leaf runs XLA."""
    def regroup(x: jax.Array, y: jax.Array) -> tuple[dict[str, jax.Array], jax.Array]:
        return {"b": y, "a": x}, x

    def partly_computed(x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
        return x, y * 2

    x, y = np.arange(3, dtype=np.float32), np.ones((2, 2), np.float32)
    function = CompiledFunction("regroup", regroup)
    program, arrays = _program(function, (x, y), (), has_aux=True)
    function.describe(program, arrays)
    for _ in range(3):
        out, aux = function.call(program, arrays)
        assert out["a"] is arrays[0] and out["b"] is arrays[1] and aux is arrays[0]
        assert program.out_treedef == jax.tree_util.tree_structure({"a": 0, "b": 0})
        assert program.out_float == (True, True)
        assert program.out_shapes == ((3,), (2, 2))
    function = CompiledFunction("partly_computed", partly_computed)
    program, arrays = _program(function, (x, y), ())
    function.describe(program, arrays)
    for _ in range(2):
        (first, second), aux = function.call(program, arrays)
        assert aux is None
        assert first is not arrays[0]  # XLA's copy: the result was computed
        np.testing.assert_array_equal(first, x)
        np.testing.assert_array_equal(second, 2 * y)
