"""FSDP2 (``fully_shard``) around a model holding a ``WrappedJaxFunction``, with a real
``torch.distributed`` process group (gloo, world size 1, in this process).

Library mode is refused when ``fully_shard`` swaps in the first DTensor parameter, at wrap
time (Note [Sharded parameters in library mode] in ``_wrapped.py``); through a worker,
FSDP2 trains like the unwrapped model (two ranks: tests/distributed/test_ddp.py).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
from support import served
from support.workers import WorkerProcess
from torch.distributed.fsdp import fully_shard

from torch_jax_interop import WrappedJaxFunction
from torch_jax_interop.client import connect
from torch_jax_interop.errors import UnsupportedTensorError

REFUSAL = (r"cannot make the parameter `(w1|w2|b1|b2)` of a WrappedJaxFunction a DTensor "
           r"\(FSDP2's `fully_shard`.*reads the parameters in place.*Serve the function "
           r"from a JAX worker")


@pytest.fixture
def process_group() -> Iterator[None]:
    """A one-rank gloo group on a file store, destroyed afterwards."""
    with tempfile.TemporaryDirectory(prefix="tji") as tmp:
        store = dist.FileStore(os.path.join(tmp, "store"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


def _params(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w1": torch.randn(784, 32, generator=g) * 0.05, "b1": torch.zeros(32),
            "w2": torch.randn(32, 10, generator=g) * 0.05, "b2": torch.zeros(10)}


def _model(function) -> torch.nn.Sequential:  # noqa: ANN001
    torch.manual_seed(0)
    return torch.nn.Sequential(WrappedJaxFunction(function, _params(), clone_params=True),
                               torch.nn.Linear(10, 1))


def _train(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(16, 784, generator=g), torch.randn(16, 1, generator=g)
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in model.state_dict().items()}


@pytest.mark.parametrize("wrapped", ["the WrappedJaxFunction", "the whole model"])
@pytest.mark.parametrize("where", ["plain JAX function", "inproc"])
def test_fully_shard_is_refused_at_wrap_time_in_library_mode(process_group: None,
                                                              where: str, wrapped: str) -> None:
    if where == "inproc":
        with connect("inproc", functions={"mlp": served.mlp_apply}) as local:
            model = _model(local.function("mlp"))
    else:
        model = _model(served.mlp_apply)
    with pytest.raises(UnsupportedTensorError, match=REFUSAL):
        fully_shard(model[0] if wrapped == "the WrappedJaxFunction" else model)
    # refused before the first of them was swapped
    assert not any(type(p).__name__ == "DTensor" for p in model[0].parameters())


# The outputs are views of the client's output arena (they share its memory); FSDP2 warns
# about any view output, since an in-place op on one would skip its pre-backward hook.
@pytest.mark.filterwarnings("ignore:FSDP2-wrapped module .* returned a view tensor")
def test_fully_shard_trains_through_a_worker_like_the_unwrapped_model(
        process_group: None, worker: WorkerProcess) -> None:
    with connect(worker.address) as remote:
        expected = _train(_model(remote.function("mlp_apply")))
        model = _model(remote.function("mlp_apply"))
        fully_shard(model[0])
        fully_shard(model)
        assert {type(p).__name__ for p in model.parameters()} == {"DTensor"}
        got = _train(model)
    assert (got["0.params.w1"] - _params()["w1"]).abs().max() > 1e-4  # training moved it
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)
