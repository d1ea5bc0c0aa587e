"""Service mode with Flax ``struct.dataclass`` and Equinox parameters: a real worker serves
functions that declare their parameters' structure; the client sends the array leaves flat
(Note [Registered pytree nodes in service mode]) and trains like pure JAX."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator

import pytest
import torch
from pytree_models import (
    MODELS,
    SERVED,
    DenseParams,
    assert_trained_like_jax,
    batches,
    init_dense,
    train_in_torch,
)

from torch_jax_interop import WrappedJaxFunction
from torch_jax_interop._errors import InvalidArgumentError
from torch_jax_interop.client import connect

pytestmark = pytest.mark.usefixtures("jax_default_cpu")

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def pytree_worker() -> Iterator[str]:
    from service_workers import start_worker, stop_worker

    extra = [arg for name, target in SERVED.items()
             for arg in ("--function", f"{name}={target}")]
    path = os.pathsep.join(p for p in (TESTS, os.environ.get("PYTHONPATH")) if p)
    with tempfile.TemporaryDirectory(prefix="tji", dir="/tmp") as tmp:
        process = start_worker(tmp, extra=extra, env={"PYTHONPATH": path})
        try:
            yield process.address
        finally:
            assert stop_worker(process) == 0, process.log()


@pytest.mark.parametrize("transport", ["shm", "inline"])
@pytest.mark.parametrize("model", list(MODELS))
def test_registered_node_params_train_like_pure_jax(pytree_worker: str, model: str,
                                                    transport: str) -> None:
    apply, init = MODELS[model]
    data = batches()
    with connect(pytree_worker, transport=transport) as worker:
        module = WrappedJaxFunction(worker.function(model), init(), clone_params=True)
        train_in_torch(module, data)
        with torch.no_grad():
            module(data[0][0])  # a plain call sends the flat parameters too
    assert_trained_like_jax(module, apply, init, data)


def test_registered_nodes_in_other_arguments_are_refused(pytree_worker: str) -> None:
    with connect(pytree_worker) as worker:
        with pytest.raises(TypeError, match="registered with jax.tree_util"):
            worker.function("identity")(DenseParams(w=torch.ones(2), b=torch.ones(2)))
        # a flat list with a wrong number of arrays names the declared count
        wrapped = WrappedJaxFunction(worker.function("flax"), [torch.ones(4, 3)])
        with pytest.raises(InvalidArgumentError, match="declares parameters with 2 arrays"):
            wrapped(torch.ones(2, 4))
    assert isinstance(init_dense(), DenseParams)
