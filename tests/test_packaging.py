"""What users install: the wheel's metadata and contents, extras per role, and types.

* The wheel holds the licence file, the package with ``py.typed``, and nothing of the
  repository's benchmarks or tests; its metadata has the authors, URLs and classifiers.
* Each extra pulls only what its role imports: the client (torch side) neither needs tqdm
  nor grpc_health; ``all`` leaves out ``bench`` (the benchmarks are not in the wheel); both
  cupy builds have an extra.
* ``connect()`` is typed: a type checker knows it returns a ``Worker`` (or, with
  ``functions=``, an ``InprocWorker``).
"""

from __future__ import annotations

import email.parser
import re
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(out),
         str(ROOT)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    (path,) = out.glob("torch_jax_interop-*.whl")
    return zipfile.ZipFile(path)


def _metadata(wheel: zipfile.ZipFile) -> email.message.Message:
    (name,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    return email.parser.Parser().parsestr(wheel.read(name).decode())


def _extras(metadata: email.message.Message) -> dict[str, set[str]]:
    extras: dict[str, set[str]] = {name: set() for name in metadata.get_all("Provides-Extra")}
    for requirement in metadata.get_all("Requires-Dist"):
        match = re.fullmatch(r"(?P<name>[A-Za-z0-9_.-]+)\S*; extra == '(?P<extra>[^']+)'",
                             requirement)
        if match:
            extras[match["extra"]].add(match["name"])
    return extras


def test_the_wheel_ships_the_licence_and_the_package_only(wheel: zipfile.ZipFile) -> None:
    names = wheel.namelist()
    licence = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
    assert licence, "the wheel has no LICENSE in its .dist-info/licenses/"
    assert wheel.read(licence[0]).decode() == (ROOT / "LICENSE").read_text()
    assert "MIT License" in (ROOT / "LICENSE").read_text()
    assert "torch_jax_interop/py.typed" in names
    outside = {n.split("/")[0] for n in names} - {"torch_jax_interop"}
    assert all(top.endswith(".dist-info") for top in outside), f"extra top-level: {outside}"


def test_the_metadata_names_licence_authors_urls_and_classifiers(
    wheel: zipfile.ZipFile,
) -> None:
    metadata = _metadata(wheel)
    assert metadata["License-Expression"] == "MIT"
    assert metadata["Author"] or metadata["Author-email"]
    urls = dict(u.split(", ", 1) for u in metadata.get_all("Project-URL"))
    assert {"Homepage", "Documentation", "Repository", "Issues"} <= set(urls)
    classifiers = metadata.get_all("Classifier")
    assert "Programming Language :: Python :: 3.11" in classifiers
    assert "Typing :: Typed" in classifiers
    assert metadata["Description-Content-Type"] == "text/markdown"


def test_each_extra_pulls_only_what_its_role_uses(wheel: zipfile.ZipFile) -> None:
    extras = _extras(_metadata(wheel))
    assert extras["server"] >= {"jax", "grpcio", "protobuf", "grpcio-health-checking"}
    assert "torch" not in extras["server"]
    assert extras["client"] == {"torch", "grpcio", "protobuf"}, extras["client"]
    assert "jax" not in extras["client"] and "tqdm" not in extras["client"]
    assert extras["library"] == {"torch", "jax"}
    assert extras["cuda12"] == {"cupy-cuda12x"} and extras["cuda13"] == {"cupy-cuda13x"}
    assert "matplotlib" not in extras["all"], "`all` pulls the benchmarks' matplotlib"
    assert extras["all"] >= extras["library"] | extras["server"] | extras["client"]


def test_the_client_and_the_demo_run_without_tqdm_and_grpc_health(run_python) -> None:  # noqa: ANN001
    """Both packages are hidden: the client trains through a function, and the demo's
    training loop reports progress in plain lines instead of a bar."""
    code = textwrap.dedent("""
        import sys

        # None in sys.modules: `import tqdm` raises ImportError, find_spec says absent
        sys.modules["tqdm"] = sys.modules["grpc_health"] = None
        from torch_jax_interop.client import connect
        from torch_jax_interop.demo import train

        functions = {"mlp": "torch_jax_interop.examples.mlp:apply"}
        with connect("inproc", functions=functions) as worker:
            losses, _ = train(worker.function("mlp"), steps=20, progress=True, label="t")
        assert len(losses) == 20
        assert sys.modules["tqdm"] is None and sys.modules["grpc_health"] is None
    """)
    result = run_python(code, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "t: step 0/20, loss" in result.stdout and "t: step 10/20" in result.stdout


@pytest.mark.slow
def test_connect_is_typed_as_returning_the_worker_class(tmp_path: Path) -> None:
    snippet = tmp_path / "uses_connect.py"
    snippet.write_text(textwrap.dedent("""
        from torch_jax_interop.client import connect

        reveal_type(connect("unix:///tmp/tji/worker.sock"))
        reveal_type(connect("inproc", functions={"f": "package.module:f"}))
        with connect("unix:///tmp/tji/worker.sock") as worker:
            reveal_type(worker.function("f"))
    """))
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-error-summary", "--ignore-missing-imports",
         "--cache-dir", str(tmp_path / "cache"), "--config-file", "", str(snippet)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT / "src"), "HOME": str(tmp_path)},
    )
    revealed = re.findall(r'Revealed type is "([^"]+)"', result.stdout)
    assert revealed == [
        "torch_jax_interop.client._connect.Worker",
        "torch_jax_interop.interop_core._inproc.InprocWorker",
        "torch_jax_interop.client._remote.RemoteFunction",
    ], result.stdout + result.stderr
