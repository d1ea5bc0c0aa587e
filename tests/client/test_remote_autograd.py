"""Training through a worker: remote gradients equal in-process ones."""

from __future__ import annotations

import gc

import pytest
import torch
from support.workers import FUNCTIONS, WorkerProcess

from torch_jax_interop import WrappedJaxFunction
from torch_jax_interop.client import WorkerUnavailableError, connect


def _params(seed: int = 0, hidden: int = 256) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w1": torch.randn(784, hidden, generator=g) * 0.05, "b1": torch.zeros(hidden),
            "w2": torch.randn(hidden, 10, generator=g) * 0.05, "b2": torch.zeros(10)}


def _grads(worker, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:  # noqa: ANN001
    module = WrappedJaxFunction(worker.function("mlp_apply"), _params())
    x = x.clone().requires_grad_(True)
    out = module(x)
    (out.square().mean() + out[:, 0].sum()).backward()
    grads = {name: p.grad.clone() for name, p in module.named_parameters()}
    return out.detach(), grads, x.grad.clone()


@pytest.mark.parametrize("transport", ["inline", "shm"])
def test_remote_gradients_equal_in_process_gradients(worker: WorkerProcess,
                                                     transport: str) -> None:
    x = torch.randn(256, 784)  # 784 KiB: shared memory for inputs, outputs and gradients
    with connect("inproc", functions=FUNCTIONS) as local:
        expected = _grads(local, x)
    with connect(worker.address, transport=transport) as remote:
        got = _grads(remote, x)
        assert remote.stats.shared_memory_bytes > 0 if transport == "shm" else \
            remote.stats.shared_memory_bytes == 0
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-6)
    assert set(got[1]) == {"params.w1", "params.b1", "params.w2", "params.b2"}
    for name in got[1]:
        torch.testing.assert_close(got[1][name], expected[1][name], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[2], expected[2], rtol=1e-5, atol=1e-6)


def test_remote_training_matches_in_process_training(worker: WorkerProcess) -> None:
    def train(w) -> dict[str, torch.Tensor]:  # noqa: ANN001
        torch.manual_seed(0)
        model = torch.nn.Sequential(WrappedJaxFunction(w.function("mlp_apply"), _params(1)),
                                    torch.nn.Linear(10, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for step in range(5):
            g = torch.Generator().manual_seed(step)
            x, y = torch.randn(32, 784, generator=g), torch.randn(32, 1, generator=g)
            loss = torch.nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    with connect("inproc", functions=FUNCTIONS) as local:
        expected = train(local)
    with connect(worker.address) as remote:
        got = train(remote)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)


def test_remote_scalar_loss_gradients_match_in_process(worker: WorkerProcess) -> None:
    """A scalar output: the worker computes the gradients with the forward pass and backward
    scales them by the cotangent; a retained graph gives the same gradients twice."""
    g = torch.Generator().manual_seed(3)
    x, labels = torch.randn(64, 784, generator=g), torch.randint(0, 10, (64,), generator=g)

    def grads(w) -> dict[str, torch.Tensor]:  # noqa: ANN001
        module = WrappedJaxFunction(w.function("mlp_loss"), _params(2))
        loss = module(x, labels.int())
        assert loss.shape == ()
        (3.0 * loss).backward(retain_graph=True)
        loss.backward()  # a second backward through the same graph: 3 g + g
        return {name: p.grad.clone() for name, p in module.named_parameters()}

    with connect("inproc", functions=FUNCTIONS) as local:
        expected = grads(local)
    with connect(worker.address) as remote:
        got = grads(remote)
    assert set(got) == {"params.w1", "params.b1", "params.w2", "params.b2"}
    for name in got:
        assert got[name].abs().sum() > 0
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7)


def test_remote_function_is_differentiable_when_inputs_require_grad(
        worker: WorkerProcess) -> None:
    with connect(worker.address) as w:
        x = torch.randn(5, requires_grad=True)
        scale = torch.tensor(3.0, requires_grad=True)
        w.function("scale")(scale, x).sum().backward()
    assert torch.allclose(x.grad, torch.full((5,), 3.0))
    assert torch.allclose(scale.grad, x.detach().sum())


def test_has_aux_output_has_no_gradient(worker: WorkerProcess) -> None:
    with connect(worker.address) as w:
        module = WrappedJaxFunction(w.function("with_aux"), torch.tensor(2.0), has_aux=True)
        out, aux = module(torch.tensor([3.0, 4.0]))
        assert not aux["norm"].requires_grad
        assert torch.allclose(aux["norm"], torch.tensor(5.0))
        out.sum().backward()
    assert torch.allclose(module.params[0].grad, torch.tensor(7.0))


def test_retain_graph_allows_two_backwards(worker: WorkerProcess) -> None:
    with connect(worker.address) as w:
        module = WrappedJaxFunction(w.function("scale"), torch.tensor(2.0))
        loss = module(torch.tensor([1.0, 2.0])).sum()
        loss.backward(retain_graph=True)
        loss.backward()
    assert torch.allclose(module.params[0].grad, torch.tensor(6.0))


def test_freed_graphs_release_their_residuals(worker: WorkerProcess) -> None:
    with connect(worker.address) as w:
        module = WrappedJaxFunction(w.function("scale"), torch.tensor(2.0))
        out = module(torch.tensor([1.0, 2.0]))
        del out
        gc.collect()
        assert len(w._pending_release) == 1
        with torch.no_grad():
            module(torch.tensor([1.0]))  # the next call sends the release
        assert not w._pending_release


def test_backward_after_the_worker_restarted_says_to_rerun_forward(short_tmp: str) -> None:
    from support.workers import start_worker, stop_worker

    first = start_worker(short_tmp)
    with connect(first.address, timeout=30) as w:
        module = WrappedJaxFunction(w.function("scale"), torch.tensor(2.0))
        loss = module(torch.tensor([1.0, 2.0])).sum()
        first.process.kill()
        first.process.wait()
        with pytest.raises(WorkerUnavailableError):
            loss.backward()
        second = start_worker(short_tmp)
        try:
            loss = module(torch.tensor([1.0, 2.0])).sum()  # training resumes
            loss.backward()
            assert torch.allclose(module.params[0].grad, torch.tensor(3.0))
        finally:
            assert stop_worker(second) == 0


def test_scalar_function_through_a_worker(worker: WorkerProcess) -> None:
    """0.0.8's WrappedJaxScalarFunction with a worker's function: the loss and its aux
    (the default has_aux=True), gradients equal in-process ones, and any other output
    refused on the torch side."""
    from torch_jax_interop import WrappedJaxScalarFunction

    g = torch.Generator().manual_seed(4)
    x, labels = torch.randn(16, 784, generator=g), torch.randint(0, 10, (16,), generator=g)

    def grads(w) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # noqa: ANN001
        module = WrappedJaxScalarFunction(w.function("mlp_loss"), _params(5), has_aux=False)
        loss = module(x, labels.int())
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in module.named_parameters()}

    with connect("inproc", functions=FUNCTIONS) as local:
        expected = grads(local)
    with connect(worker.address) as remote:
        got = grads(remote)
        module = WrappedJaxScalarFunction(remote.function("with_aux"), torch.tensor(2.0))
        loss, aux = module(torch.tensor(3.0))
        assert loss.shape == () and not aux["norm"].requires_grad
        loss.backward()
        assert torch.allclose(module.params[0].grad, torch.tensor(3.0))
        with pytest.raises(TypeError, match=r"one real floating-point scalar .* \(2,\)"):
            module(torch.tensor([3.0, 4.0]))
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-7)
    for name in got[1]:
        assert got[1][name].abs().sum() > 0
        torch.testing.assert_close(got[1][name], expected[1][name], rtol=1e-5, atol=1e-7)
