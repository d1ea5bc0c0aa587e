"""Group `autograd`: WrappedJaxFunction and torch_module_to_jax against plain JAX / torch."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import _models
from ._suite import ERROR, Record, Suite, Target

GROUP = "autograd"
TINY = "WrappedJaxFunction fwd+bwd, tiny fn"
LINEAR = "torch_module_to_jax(Linear(3,2)) under jax.jit"
MLP = "MLP 784-256-10 train step, batch 256"
MLP_BYTES = _models.MLP_BATCH * _models.MLP_SIZES[0] * 4  # the input batch, float32
TINY_REFERENCE = "raw jax.jit(jax.vjp) fwd + jitted bwd"
LINEAR_REFERENCE = "torch forward (no_grad)"
MLP_REFERENCE = "pure JAX (jit, hand-written SGD)"


def tasks(suite: Suite) -> list[tuple[str, Callable[[], None]]]:
    try:
        import jax  # noqa: F401
        import torch  # noqa: F401
    except ImportError as error:
        reason = f"skipped: torch and jax are both needed ({error})"
        return [("autograd: skipped", lambda: suite.skip(GROUP, "all", reason))]
    # registered up front, so that a case that cannot run still shows its target as n/a
    target = Target("<=", 10.0, "autograd issue")
    suite.compare(GROUP, TINY, 0, "ours", TINY_REFERENCE, Target("<=", 3.0, "autograd issue"))
    suite.compare(GROUP, LINEAR, 0, "ours", LINEAR_REFERENCE, target)
    suite.compare(GROUP, MLP, MLP_BYTES, "ours", MLP_REFERENCE, Target("<=", 1.3, "autograd issue"))
    return [
        ("autograd tiny fwd+bwd", lambda: _guard(suite, TINY, lambda: tiny_case(suite))),
        ("autograd torch_module_to_jax", lambda: _guard(suite, LINEAR, lambda: linear_case(suite))),
        ("autograd MLP train step", lambda: _guard(suite, MLP, lambda: mlp_case(suite))),
    ]


def _guard(suite: Suite, name: str, run: Callable[[], None]) -> None:
    """A missing API skips its case; any other failure is recorded, and the suite goes on."""
    try:
        run()
    except ImportError as error:
        suite.skip(GROUP, name, f"skipped: {error}")
    except NotImplementedError as error:
        suite.skip(GROUP, name, f"skipped: not implemented yet ({str(error) or 'a stub'})")
    except Exception as error:
        suite.add(
            Record(
                GROUP, name, "ours", 0, status=ERROR, note=f"{type(error).__name__}: {error}"[:300]
            )
        )


def wrapped_jax_function() -> Any:
    try:
        from torch_jax_interop import WrappedJaxFunction
    except (ImportError, AttributeError) as error:
        raise ImportError(f"WrappedJaxFunction is not available yet ({error})") from None
    return WrappedJaxFunction


def tiny_case(suite: Suite) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    wrapper_class = wrapped_jax_function()
    params_np = _models.tiny_params()
    x_np = np.random.default_rng(2).standard_normal((4, 3)).astype(np.float32)

    module = wrapper_class(_models.tiny, jax.tree.map(jnp.asarray, params_np))
    x_torch = torch.tensor(x_np)  # torch allocates 64-byte aligned; numpy may not
    cotangent_torch = torch.ones(4, 2)

    def ours() -> None:
        module.zero_grad()
        module(x_torch).backward(cotangent_torch)

    # the floor: the same forward (keeping residuals) and backward as two jitted JAX calls
    params = jax.tree.map(jnp.asarray, params_np)
    x = jnp.asarray(x_np)
    cotangent = jnp.ones((4, 2), jnp.float32)
    forward = jax.jit(lambda p, x: jax.vjp(lambda q: _models.tiny(q, x), p))
    backward = jax.jit(lambda vjp_fn, ct: vjp_fn(ct))

    def raw() -> None:
        _, vjp_fn = forward(params, x)
        jax.block_until_ready(backward(vjp_fn, cotangent))

    reference = TINY_REFERENCE
    suite.measure(GROUP, TINY, 0, {"ours": ours, reference: raw}, references=(reference,))


def linear_case(suite: Suite) -> None:
    import jax
    import torch

    try:
        from torch_jax_interop import torch_module_to_jax
    except (ImportError, AttributeError) as error:
        raise ImportError(f"torch_module_to_jax is not available yet ({error})") from None

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    x_torch = torch.randn(4, 3)
    x = jax.numpy.asarray(x_torch.numpy())
    apply, params = torch_module_to_jax(model)
    jitted = jax.jit(apply)
    try:
        jitted(params, x).block_until_ready()
    except Exception:  # the original API needed an example output to trace under jit
        apply, params = torch_module_to_jax(model, example_output=model(x_torch).detach())
        jitted = jax.jit(apply)

    def ours() -> None:
        jitted(params, x).block_until_ready()

    def torch_forward() -> None:
        with torch.no_grad():
            model(x_torch)

    reference = LINEAR_REFERENCE
    suite.measure(
        GROUP, LINEAR, 0, {"ours": ours, reference: torch_forward}, references=(reference,)
    )


def mlp_case(suite: Suite) -> None:
    import jax
    import jax.numpy as jnp

    wrapper_class = wrapped_jax_function()
    ours = make_torch_training_step(lambda params: wrapper_class(_models.mlp_apply, params))

    step = _models.make_sgd_step()
    x_np, y_np = _models.mlp_batch()
    x, y = jnp.asarray(x_np), jnp.asarray(y_np)
    state = {"params": jax.tree.map(jnp.asarray, _models.mlp_params())}

    def pure_jax() -> None:
        state["params"], loss = step(state["params"], x, y)
        loss.block_until_ready()

    reference = MLP_REFERENCE
    suite.measure(
        GROUP, MLP, MLP_BYTES, {"ours": ours, reference: pure_jax}, references=(reference,)
    )


def make_torch_training_step(build: Callable[[Any], Any]) -> Callable[[], None]:
    """A torch SGD step through a module built from the MLP's JAX parameters."""
    import jax
    import jax.numpy as jnp
    import torch

    module = build(jax.tree.map(jnp.asarray, _models.mlp_params()))
    optimizer = torch.optim.SGD(module.parameters(), lr=_models.LEARNING_RATE)
    x_np, y_np = _models.mlp_batch()
    x_torch = torch.tensor(x_np)  # torch allocates 64-byte aligned; numpy may not
    y_torch = torch.tensor(y_np).long()

    def step() -> None:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(module(x_torch), y_torch)
        loss.backward()
        optimizer.step()

    return step
