"""Group `torch_module`: a torch CNN's training step driven from JAX vs the same step in torch.

``torch_module_to_jax`` turns the CNN into ``apply(params, x)``; the step is
``jax.jit(jax.value_and_grad(loss))`` with the loss (cross-entropy) in JAX. The backward
reuses the forward's torch graph (Note [Randomness and the kept graph] in
``interop_core/_torch_module_autograd.py``) instead of running the forward again; the
reference is the same forward + backward in pure torch (``loss.backward()``), gradients
included, optimizer step excluded on both sides.
"""

from __future__ import annotations

from collections.abc import Callable

from ._suite import ERROR, Record, Suite, Target

GROUP = "torch_module"
CNN = "small CNN train step (conv16-conv32-dropout-linear), batch 32x3x32x32"
BATCH, CHANNELS, SIZE, CLASSES = 32, 3, 32, 10
CNN_BYTES = BATCH * CHANNELS * SIZE * SIZE * 4  # the input batch, float32
REFERENCE = "pure torch (forward + loss.backward())"


def tasks(suite: Suite) -> list[tuple[str, Callable[[], None]]]:
    try:
        import jax  # noqa: F401
        import torch  # noqa: F401
    except ImportError as error:
        reason = f"skipped: torch and jax are both needed ({error})"
        return [("torch_module: skipped", lambda: suite.skip(GROUP, "all", reason))]
    suite.compare(GROUP, CNN, CNN_BYTES, "ours", REFERENCE, Target("<=", 1.3, "issue 14"))
    return [("torch_module small CNN step", lambda: _guard(suite, lambda: cnn_case(suite)))]


def _guard(suite: Suite, run: Callable[[], None]) -> None:
    try:
        run()
    except Exception as error:
        suite.add(
            Record(
                GROUP, CNN, "ours", CNN_BYTES, status=ERROR,
                note=f"{type(error).__name__}: {error}"[:300],
            )
        )


def make_cnn() -> object:
    import torch

    return torch.nn.Sequential(
        torch.nn.Conv2d(CHANNELS, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Dropout(0.1),
        torch.nn.Linear(32 * (SIZE // 4) ** 2, CLASSES),
    ).train()


def cnn_case(suite: Suite) -> None:
    import jax
    import jax.numpy as jnp
    import torch

    from torch_jax_interop import torch_module_to_jax

    torch.manual_seed(0)
    model = make_cnn()
    assert isinstance(model, torch.nn.Module)
    x_torch = torch.randn(BATCH, CHANNELS, SIZE, SIZE)
    y_torch = torch.randint(0, CLASSES, (BATCH,))
    apply, params = torch_module_to_jax(model)
    x = jnp.asarray(x_torch.numpy())
    y = jnp.asarray(y_torch.numpy().astype("int32"))

    def loss(params: object, x: jax.Array, y: jax.Array) -> jax.Array:
        logits = apply(params, x)
        picked = jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1)
        return -jnp.mean(picked)

    step = jax.jit(jax.value_and_grad(loss))

    def ours() -> None:
        jax.block_until_ready(step(params, x, y))

    def pure_torch() -> None:
        for p in model.parameters():
            p.grad = None
        torch.nn.functional.cross_entropy(model(x_torch), y_torch).backward()

    ours()
    suite.measure(
        GROUP, CNN, CNN_BYTES, {"ours": ours, REFERENCE: pure_torch}, references=(REFERENCE,)
    )
