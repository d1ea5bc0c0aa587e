"""Group `original`: this project against torch-jax-interop 0.0.8, what users run today.

0.0.8 imports as `torch_jax_interop` too, so it lives in its own virtual environment,
``.cache/bench-original-venv``, built on first use:

* ``torch==2.13.0`` first, pinned: the CPU wheel this machine has on disk. An unpinned
  ``torch`` would download a multi-GB CUDA build;
* then ``jax==0.10.2 torch-jax-interop==0.0.8 chex``: 0.0.8 imports ``chex`` at import time
  (``torch_jax_interop/types.py``) without declaring it.

Both sides run ``_original_runner.py`` (the same code and timing settings) in a subprocess,
one after the other, and the runner prints its figures as JSON.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ._processes import REPO_ROOT
from ._suite import ERROR, Record, Suite
from ._timing import Stats

GROUP = "original"
VENV = REPO_ROOT / ".cache" / "bench-original-venv"
RUNNER = Path(__file__).resolve().parent / "_original_runner.py"
ORIGINAL_VERSION = "0.0.8"
REQUIREMENTS = (
    ("torch==2.13.0",),
    ("jax==0.10.2", f"torch-jax-interop=={ORIGINAL_VERSION}", "chex"),
)
OURS = "ours"
ORIGINAL = f"original {ORIGINAL_VERSION}"


def tasks(suite: Suite) -> list[tuple[str, Callable[[], None]]]:
    state: dict[str, Any] = {}
    return [
        ("original: venv (first run builds it, ~1 min)", lambda: prepare(suite, state)),
        ("original: measure 0.0.8", lambda: run_side(suite, state, ORIGINAL)),
        ("original: measure ours", lambda: run_side(suite, state, OURS)),
        ("original: compare", lambda: compare(suite, state)),
    ]


def venv_python() -> Path:
    return VENV / "bin" / "python"


def _probe(python: Path) -> str | None:
    """The installed original's version, or None when the venv is missing or broken."""
    if not python.exists():
        return None
    result = subprocess.run(
        [
            str(python),
            "-c",
            "import torch_jax_interop, importlib.metadata as m; "
            "print(m.version('torch-jax-interop'))",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd="/",
    )
    return result.stdout.strip() if result.returncode == 0 else None


def prepare(suite: Suite, state: dict[str, Any]) -> None:
    python = venv_python()
    if _probe(python) == ORIGINAL_VERSION:
        state["python"] = python
        return
    try:
        if not python.exists():
            VENV.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(
                [sys.executable, "-m", "venv", str(VENV)],
                check=True,
                capture_output=True,
                timeout=300,
            )
        for group in REQUIREMENTS:
            result = subprocess.run(
                [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *group],
                capture_output=True,
                text=True,
                timeout=900,
            )
            if result.returncode != 0:
                raise RuntimeError(f"pip install {' '.join(group)} failed: {result.stderr[-400:]}")
    except Exception as error:
        state["error"] = f"skipped: cannot build {VENV.name} (no network?): {error}"[:500]
        return
    version = _probe(python)
    if version != ORIGINAL_VERSION:
        state["error"] = (
            f"skipped: {VENV.name} has torch-jax-interop {version}, not {ORIGINAL_VERSION}"
        )
        return
    state["python"] = python


def run_side(suite: Suite, state: dict[str, Any], variant: str) -> None:
    if "error" in state:
        return
    python = state["python"] if variant == ORIGINAL else Path(sys.executable)
    argv = [str(python), str(RUNNER), *(["--quick"] if suite.quick else [])]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=900, cwd="/")
    if result.returncode != 0:
        state.setdefault("side_errors", {})[variant] = (
            f"error: runner exited {result.returncode}: {result.stderr[-300:]}"
        )
        return
    state[variant] = json.loads(result.stdout.strip().splitlines()[-1])


def compare(suite: Suite, state: dict[str, Any]) -> None:
    if "error" in state:
        suite.skip(GROUP, "all", state["error"])
        return
    facts = suite.extra.setdefault(GROUP, {})
    names: list[tuple[str, int]] = []
    for variant in (OURS, ORIGINAL):
        side = state.get(variant)
        if side is None:
            note = state.get("side_errors", {}).get(variant, "error: no result")
            suite.add(Record(GROUP, "all", variant, 0, status=ERROR, note=note))
            continue
        facts[variant] = {"version": side["version"], "module": side["module"]}
        for item in side["records"]:
            key = (item["name"], item["bytes"])
            if key not in names:
                names.append(key)
            if "error" in item:
                suite.add(
                    Record(
                        GROUP,
                        item["name"],
                        variant,
                        item["bytes"],
                        status=ERROR,
                        note=item["error"],
                    )
                )
                continue
            stats = Stats(
                item["median_s"], item["p10_s"], item["p90_s"], item["repetitions"], item["loops"]
            )
            suite.add(
                Record(
                    GROUP,
                    item["name"],
                    variant,
                    item["bytes"],
                    reference=variant == ORIGINAL,
                    stats=stats,
                )
            )
    for name, nbytes in names:
        suite.compare(GROUP, name, nbytes, OURS, ORIGINAL)
