"""A worker that uses all its devices (docs/scaling.md, "A worker on every local device").

One real worker started with ``XLA_FLAGS=--xla_force_host_platform_device_count=2`` serves
``support.served_sharded``'s functions (the batch and the hidden layer of an MLP split over
both CPU devices with ``sharded``) next to the same functions unsharded. Outputs and
gradients that arrive through shared memory and inline bytes must equal the unsharded ones
and the in-process JAX reference; a batch the mesh does not divide is refused with
INVALID_ARGUMENT, and the worker keeps serving.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator

import jax
import numpy as np
import pytest
import torch
from support import served
from support.workers import WorkerProcess, start_worker, stop_worker

from torch_jax_interop import WrappedJaxFunction
from torch_jax_interop.client import connect
from torch_jax_interop.errors import InvalidArgumentError

DEVICES = 2
SHARDED = {name: f"support.served_sharded:{name}" for name in ("mlp_apply", "mlp_loss",
                                                               "batch_sum")}
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}  # float32: only the order of the sums differs


@pytest.fixture(scope="module")
def sharded_worker() -> Iterator[WorkerProcess]:
    """A worker on two forced host devices, serving the sharded functions as ``sharded_*``
    next to ``support.served``'s unsharded ones."""
    extra = [arg for name, target in SHARDED.items()
             for arg in ("--function", f"sharded_{name}={target}")]
    env = {"XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES}",
           "JAX_PLATFORMS": "cpu"}
    with tempfile.TemporaryDirectory(prefix="tji", dir="/tmp") as tmp:
        process = start_worker(tmp, extra=extra, env=env)
        try:
            yield process
        finally:
            assert stop_worker(process) == 0, process.log()


def _params(seed: int = 0, inputs: int = 784, hidden: int = 256) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w1": torch.randn(inputs, hidden, generator=g) * 0.05,
            "b1": torch.randn(hidden, generator=g) * 0.1,
            "w2": torch.randn(hidden, 10, generator=g) * 0.05,
            "b2": torch.randn(10, generator=g) * 0.1}


def _numpy(tree: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in tree.items()}


def test_the_worker_runs_the_functions_over_both_devices(
        sharded_worker: WorkerProcess) -> None:
    log = sharded_worker.log()
    for name in SHARDED:
        assert f"`sharded_{name}` runs sharded over the mesh data={DEVICES}" in log, log
    assert "`mlp_apply` runs sharded" not in log  # the unsharded reference is not


@pytest.mark.parametrize("transport", ["shm", "inline"])
def test_outputs_and_gradients_equal_the_unsharded_function(
        sharded_worker: WorkerProcess, transport: str) -> None:
    """Data parallel over a batch of 64 (32 rows per device), w1's columns and w2's rows on
    two devices: the outputs, the parameters' gradients and the input's gradient equal those
    of the unsharded function on the same worker and of JAX in this process."""
    x = torch.randn(64, 784, generator=torch.Generator().manual_seed(1))
    params = _params()
    results = {}
    with connect(sharded_worker.address, transport=transport) as worker:
        for name in ("sharded_mlp_apply", "mlp_apply"):
            module = WrappedJaxFunction(worker.function(name), params, clone_params=True)
            xi = x.clone().requires_grad_(True)
            out = module(xi)
            (out.square().mean() + out[:, 0].sum()).backward()
            results[name] = (out.detach().clone(),
                             {k.removeprefix("params."): p.grad.clone()
                              for k, p in module.named_parameters()},
                             xi.grad.clone())
        if transport == "shm":  # outputs and gradients came back through shared memory
            assert worker.stats.shared_memory_bytes > 0
    got, unsharded = results["sharded_mlp_apply"], results["mlp_apply"]

    def loss(p: dict[str, np.ndarray], xs: np.ndarray) -> jax.Array:
        out = served.mlp_apply(p, xs)
        return (out * out).mean() + out[:, 0].sum()

    reference_grads, reference_x_grad = jax.grad(loss, argnums=(0, 1))(_numpy(params),
                                                                       x.numpy())
    reference_out = np.asarray(served.mlp_apply(_numpy(params), x.numpy()))
    torch.testing.assert_close(got[0], unsharded[0], **TOLERANCE)
    torch.testing.assert_close(got[0], torch.tensor(reference_out), **TOLERANCE)
    assert set(got[1]) == {"w1", "b1", "w2", "b2"}
    for key in got[1]:
        torch.testing.assert_close(got[1][key], unsharded[1][key], **TOLERANCE)
        torch.testing.assert_close(got[1][key], torch.tensor(
            np.asarray(reference_grads[key])), **TOLERANCE)
    torch.testing.assert_close(got[2], unsharded[2], **TOLERANCE)
    torch.testing.assert_close(got[2], torch.tensor(np.asarray(reference_x_grad)),
                               **TOLERANCE)
    assert got[1]["w1"].abs().max() > 1e-3  # gradients that could be wrong


def test_a_scalar_loss_with_integer_labels_trains_like_the_unsharded_one(
        sharded_worker: WorkerProcess) -> None:
    """The fused path (gradients computed with the forward pass) with an integer input
    sharded over the batch: three SGD steps end with the same parameters."""
    def train(worker, name: str) -> dict[str, torch.Tensor]:  # noqa: ANN001
        module = WrappedJaxFunction(worker.function(name), _params(2), clone_params=True)
        optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
        for step in range(3):
            g = torch.Generator().manual_seed(10 + step)
            x = torch.randn(32, 784, generator=g)
            labels = torch.randint(0, 10, (32,), generator=g, dtype=torch.int32)
            loss = module(x, labels)
            assert loss.shape == ()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return {k: v.detach().clone() for k, v in module.state_dict().items()}

    with connect(sharded_worker.address) as worker:
        got, expected = train(worker, "sharded_mlp_loss"), train(worker, "mlp_loss")
    start = _params(2)
    assert (got["params.w1"] - start["w1"]).abs().max() > 1e-4  # training moved them
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], **TOLERANCE)


def test_a_batch_the_mesh_does_not_divide_is_refused_and_the_worker_keeps_serving(
        sharded_worker: WorkerProcess) -> None:
    with connect(sharded_worker.address) as worker:
        module = WrappedJaxFunction(worker.function("sharded_mlp_apply"), _params())
        with pytest.raises(InvalidArgumentError, match=(
                r"`sharded_mlp_apply`: args\[1\] has shape \[5, 784\], and its dimension 0 "
                r"\(5\) is split over mesh axis `data` \(2\): 5 is not divisible by 2\. "
                r"Send a size that is a multiple of 2 \(pad the batch\)")):
            module(torch.randn(5, 784))
        with pytest.raises(InvalidArgumentError, match=r"args\[0\] has shape \[3, 2\].*"
                                                       r"3 is not divisible by 2"):
            worker.function("sharded_batch_sum")(torch.ones(3, 2))
        # the same function, a divisible batch, same session: served
        out = worker.function("sharded_batch_sum")(torch.arange(8.0).reshape(4, 2))
        torch.testing.assert_close(out, torch.tensor([12.0, 16.0]))
        assert module(torch.randn(6, 784)).shape == (6, 10)
    assert sharded_worker.process.poll() is None
    assert "Traceback" not in sharded_worker.log()


def test_outputs_larger_than_the_inline_threshold_are_written_shard_by_shard(
        sharded_worker: WorkerProcess) -> None:
    """A 2 MiB output sharded over both devices lands whole in the client's arena."""
    x = torch.randn(1024, 512, generator=torch.Generator().manual_seed(5))
    with connect(sharded_worker.address, transport="shm") as worker:
        params = _params(3, inputs=512, hidden=512)
        params["w2"] = torch.eye(512)  # the hidden layer comes out: 1024 x 512 floats
        params["b2"] = torch.zeros(512)
        got = worker.function("sharded_mlp_apply")(params, x)
        expected = worker.function("mlp_apply")(params, x)
        assert worker.stats.shared_memory_bytes >= 2 * x.numel() * 4
    assert got.shape == (1024, 512)
    torch.testing.assert_close(got, expected, **TOLERANCE)
