"""Sharded functions in library mode (``WrappedJaxFunction`` in this process): a function
stated with ``sharded`` runs over both devices and gives the unsharded results; parameters
that are themselves sharded JAX arrays are refused with a clear error.

Each check runs in a fresh interpreter started with two forced host devices (the device
count is fixed when JAX starts, and this process's JAX has one).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

TESTS = str(Path(__file__).resolve().parents[1])
ENV = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
       "PYTHONPATH": os.pathsep.join(p for p in (TESTS, os.environ.get("PYTHONPATH")) if p)}

_COMMON = f"""
import sys
sys.path.insert(0, {TESTS!r})
import jax, numpy as np, torch
from jax.sharding import NamedSharding, PartitionSpec as P
from support import served, served_sharded
from torch_jax_interop import WrappedJaxFunction
from torch_jax_interop.errors import InvalidArgumentError, UnsupportedTensorError
assert len(jax.devices()) == 2, jax.devices()
g = torch.Generator().manual_seed(0)
params = {{"w1": torch.randn(16, 8, generator=g), "b1": torch.randn(8, generator=g),
           "w2": torch.randn(8, 3, generator=g), "b2": torch.randn(3, generator=g)}}
jax_params = {{k: jax.numpy.asarray(v.numpy()) for k, v in params.items()}}
"""


def _run(run_python: Callable[..., subprocess.CompletedProcess[str]], code: str) -> str:
    result = run_python(_COMMON + code, env=ENV, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_a_sharded_function_trains_like_the_unsharded_one_in_this_process(
        run_python: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    out = _run(run_python, """
def run(fn):
    module = WrappedJaxFunction(fn, jax_params, clone_params=True)
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
    out = module(x)
    (out.square().mean() + out[:, 0].sum()).backward()
    return module, out.detach(), {k: p.grad for k, p in module.named_parameters()}, x.grad

sharded, out, grads, x_grad = run(served_sharded.mlp_apply)
_, ref_out, ref_grads, ref_x_grad = run(served.mlp_apply)
close = dict(rtol=1e-5, atol=1e-6)
torch.testing.assert_close(out, ref_out, **close)
torch.testing.assert_close(x_grad, ref_x_grad, **close)
for k in ref_grads:
    torch.testing.assert_close(grads[k], ref_grads[k], **close)
# the inputs really went to the mesh: the batch split over "data", w1 by columns
(program,) = sharded.backend.engine.programs.values()
specs = [s.spec for s in program.placement.shardings]
assert specs == [P("data"), P(), P(None, "data"), P("data", None), P("data")], specs
# the output was computed on both devices, and gathered for torch
assert len(program.out_shardings[0].device_set) == 2, program.out_shardings
try:
    sharded(torch.randn(5, 16))
except InvalidArgumentError as error:
    assert "5 is not divisible by 2" in str(error), error
else:
    raise AssertionError("a batch of 5 over 2 devices was not refused")
print("ok")
""")
    assert out.strip().endswith("ok")


def test_sharded_jax_parameters_are_refused_with_the_way_out(
        run_python: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    out = _run(run_python, """
mesh = served_sharded.all_devices()
placed = {k: jax.device_put(v, NamedSharding(mesh, served_sharded.PARAMS[k] or P()))
          for k, v in jax_params.items()}
try:
    WrappedJaxFunction(served.mlp_apply, placed)
except UnsupportedTensorError as error:
    print("refused:", error)
else:
    raise AssertionError("sharded parameters were accepted")
""")
    assert "refused: cannot convert an array sharded over 2 devices" in out, out
    assert "jax.device_put(a, jax.devices()[0])" in out, out
