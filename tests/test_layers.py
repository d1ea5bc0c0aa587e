"""The layers of README "Layout" hold: the import-linter contracts in pyproject.toml, and what
each entry point really loads in a fresh interpreter.

import-linter reads import statements (lazy ones inside functions included, minus the
crossings its contracts list with a reason); the subprocess checks below see what actually
gets imported, and run the client-only and worker-only halves with the other framework made
unimportable, as in an image that lacks it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import torch_jax_interop

SRC = Path(torch_jax_interop.__file__).resolve().parents[1]
ROOT = SRC.parent
FRAMEWORKS = ("torch", "jax", "jaxlib")

# Makes the named top-level packages unimportable, as in an image that lacks them, then runs
# the snippet and prints which frameworks ended up loaded.
_BLOCKER = """
import importlib.abc, json, sys
BLOCKED = {blocked!r}
class _NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by test_layers)")
        return None
sys.meta_path.insert(0, _NotInstalled())
{code}
print(json.dumps(sorted(m for m in {frameworks!r} if m in sys.modules)))
"""


def _loaded(run_python: Callable[..., subprocess.CompletedProcess[str]], code: str,
            blocked: tuple[str, ...] = ()) -> list[str]:
    source = _BLOCKER.format(blocked=blocked, code=code, frameworks=FRAMEWORKS)
    result = run_python(source, env={"PYTHONPATH": str(SRC)})
    assert result.returncode == 0, (
        f"with {', '.join(blocked) or 'nothing'} not installed, this failed:\n{code}\n"
        f"{result.stderr}"
    )
    loaded: list[str] = json.loads(result.stdout.strip().splitlines()[-1])
    return loaded


def test_import_linter_contracts_hold() -> None:
    lint_imports = Path(sys.executable).with_name("lint-imports")
    assert lint_imports.exists(), (
        f"{lint_imports} is missing: install the dev group (`pip install -e . --group dev`), "
        "which pins import-linter"
    )
    result = subprocess.run(
        [str(lint_imports), "--no-cache"], cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(SRC)}, timeout=300,
    )
    assert result.returncode == 0, (
        "a layer rule of pyproject.toml [tool.importlinter] is broken (README, Layout: base / "
        "torch side / JAX side / bridge). lint-imports says:\n" + result.stdout + result.stderr
    )
    assert "0 broken" in result.stdout


BASE_MODULES = (
    "torch_jax_interop", "torch_jax_interop.errors", "torch_jax_interop._dtypes",
    "torch_jax_interop._layout", "torch_jax_interop._names", "torch_jax_interop._targets",
    "torch_jax_interop._health", "torch_jax_interop._pytree", "torch_jax_interop._wire",
    "torch_jax_interop.proto", "torch_jax_interop.transport", "torch_jax_interop.cli",
    "torch_jax_interop._ranks", "torch_jax_interop._launch", "torch_jax_interop._cli_args",
    "torch_jax_interop._logging",
)


@pytest.mark.parametrize("module", BASE_MODULES)
def test_base_modules_load_no_framework(run_python, module: str) -> None:  # noqa: ANN001
    loaded = _loaded(run_python, f"import {module}", blocked=FRAMEWORKS)
    assert loaded == [], f"`import {module}` loaded {loaded}; the base imports no framework"


def test_client_loads_no_jax(run_python) -> None:  # noqa: ANN001
    code = """
import torch_jax_interop.client
from torch_jax_interop import WrappedJaxFunction
from torch_jax_interop.client import connect, RemoteFunction, Worker
from torch_jax_interop.errors import TransportError, RemoteExecutionError
"""
    loaded = _loaded(run_python, code, blocked=("jax", "jaxlib"))
    assert loaded == ["torch"], f"the client loaded {loaded}; it must never load JAX"


def test_worker_loads_no_torch(run_python) -> None:  # noqa: ANN001
    code = """
import torch_jax_interop.server
from torch_jax_interop.server import create_server, serve, WorkerConfig
"""
    loaded = _loaded(run_python, code, blocked=("torch",))
    assert loaded == ["jax", "jaxlib"], f"the worker loaded {loaded}; it must never load torch"


@pytest.fixture(scope="module")
def serving_worker() -> Iterator[str]:
    """A real worker on a unix socket, started as the README says; its address."""
    with tempfile.TemporaryDirectory(prefix="tji-layers-") as tmp:
        ready = os.path.join(tmp, "ready.json")
        process = subprocess.Popen(
            [sys.executable, "-m", "torch_jax_interop.server", "--listen",
             f"unix://{tmp}/w.sock", "--ready-file", ready, "--grace", "5",
             "--function", "mlp=torch_jax_interop.examples.mlp:apply"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(SRC)},
        )
        try:
            deadline = time.monotonic() + 120
            while not os.path.exists(ready):
                assert process.poll() is None, process.stderr.read().decode()  # type: ignore[union-attr]
                assert time.monotonic() < deadline, "the worker did not start within 120 s"
                time.sleep(0.05)
            with open(ready) as f:
                yield json.load(f)["addresses"][0]
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            assert process.stderr is not None
            process.stderr.close()


def test_health_command_loads_neither_framework(run_python, serving_worker: str) -> None:  # noqa: ANN001
    code = f"""
from torch_jax_interop.cli import main
code = main(["health", {serving_worker!r}, "--timeout", "30"])
assert code == 0, f"health returned {{code}}"
"""
    loaded = _loaded(run_python, code, blocked=FRAMEWORKS)
    assert loaded == [], f"`torch-jax-interop health` loaded {loaded}; a probe loads neither"


def test_health_command_reports_an_unreachable_worker(run_python) -> None:  # noqa: ANN001
    code = """
from torch_jax_interop.cli import main
code = main(["health", "unix:///nonexistent/tji-layers.sock", "--timeout", "0.2"])
assert code == 1, f"health returned {code}"
"""
    assert _loaded(run_python, code, blocked=FRAMEWORKS) == []


def test_client_trains_through_a_worker_without_jax(run_python, serving_worker: str) -> None:  # noqa: ANN001
    """A client-only install: forward, backward and a plain call, with JAX unimportable."""
    code = f"""
import torch
from torch_jax_interop import WrappedJaxFunction
from torch_jax_interop.client import connect

torch.manual_seed(0)
params = {{"w1": torch.randn(3, 8), "b1": torch.zeros(8), "w2": torch.randn(8, 2),
           "b2": torch.zeros(2)}}
x = torch.randn(5, 3)
with connect({serving_worker!r}, timeout=60) as worker:
    assert [f.name for f in worker.functions()] == ["mlp"]
    module = WrappedJaxFunction(worker.function("mlp"), params)
    out = module(x)
    out.square().sum().backward()
    expected = torch.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    with torch.no_grad():
        torch.testing.assert_close(worker.function("mlp")(params, x), expected,
                                   rtol=1e-5, atol=1e-5)
"""
    loaded = _loaded(run_python, code, blocked=("jax", "jaxlib"))
    assert loaded == ["torch"], f"the client loaded {loaded} while calling a worker"
