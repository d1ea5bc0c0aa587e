"""The command line's conventions besides usage errors: ``--version``, help with defaults
in plain text, sizes with units, the extra a client-only install lacks, ``--function``
modules from the current directory (also through the console script) and ``--app-dir``,
and log records as JSON lines that ``worker --ranks N`` passes on to its workers."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import torch_jax_interop
from torch_jax_interop._cli_args import format_size, parse_size
from torch_jax_interop.cli import build_parser

SRC = Path(torch_jax_interop.__file__).resolve().parents[1]
MODULE = [sys.executable, "-m", "torch_jax_interop"]


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    env.pop("TORCH_JAX_INTEROP_TOKEN", None)
    return env


@pytest.mark.parametrize("command", [
    [*MODULE, "--version"], [*MODULE, "health", "--version"],
    [sys.executable, "-m", "torch_jax_interop.server", "--version"],
], ids=["top", "after-a-command", "server-module"])
def test_version(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=60,
                            check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"torch-jax-interop {torch_jax_interop.__version__}"


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("command", [None, "worker", "health", "train", "demo"])
def test_help_is_plain_text_and_shows_defaults(command: str | None) -> None:
    argv = ["--help"] if command is None else [command, "--help"]
    result = subprocess.run([*MODULE, *argv], capture_output=True, text=True, env=_env(),
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    for markup in ("``", ":class:", ":func:", "Note [", "%(default)"):
        assert markup not in text, f"{markup!r} in the help of {command}"
    if command is None:
        return
    subparser = _subcommands()[command]
    for action in subparser._actions:
        if not action.option_strings or action.default in (None, False, [], argparse.SUPPRESS):
            continue
        assert f"(default: {action.default})" in " ".join(text.split()), (
            f"{command} --help does not show the default of {action.option_strings[0]}")
    if command == "worker":
        assert "(default: 64MiB)" in " ".join(text.split())  # a size, as a user writes one
        assert "(default: 4GiB)" in " ".join(text.split())


@pytest.mark.parametrize(("text", "expected"), [
    ("1048576", 1 << 20), ("64MiB", 64 << 20), ("64M", 64 << 20), ("64mi", 64 << 20),
    ("1G", 1 << 30), ("1.5GiB", 3 << 29), ("2K", 2048), ("2kib", 2048), ("1T", 1 << 40),
    ("100B", 100), (" 7 ", 7),
])
def test_sizes_accept_units(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(("text", "match"), [
    ("0", "below 1 byte"), ("-1", "is not a size"), ("64MB", "ambiguous"), ("1GB", "ambiguous"),
    ("lots", "is not a size"), ("", "is not a size"), ("0.1", "below 1 byte"),
    ("1X", "is not a size"),
])
def test_bad_sizes_are_refused_with_an_example(text: str, match: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=match):
        parse_size(text)


@pytest.mark.parametrize("value", [1, 1000, 64 << 20, 4 << 30, (1 << 20) + 1])
def test_sizes_shown_in_help_parse_back(value: int) -> None:
    assert parse_size(format_size(value)) == value


# Makes the named packages unimportable, as in an image that lacks them (tests/test_layers.py).
_BLOCKER = """
import importlib.abc, sys
BLOCKED = {blocked!r}
class _NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)")
        return None
sys.meta_path.insert(0, _NotInstalled())
from torch_jax_interop.cli import main
code = main({argv!r})
print("loaded:", sorted(m for m in ("torch", "jax") if m in sys.modules))
sys.exit(code)
"""


@pytest.mark.parametrize(("blocked", "argv", "extra"), [
    (("jax", "jaxlib"), ["worker", "--listen", "unix:///tmp/tji-no-jax.sock", "--function",
                         "mlp=torch_jax_interop.examples.mlp:apply"], "server"),
    (("jax", "jaxlib"), ["worker", "--ranks", "2", "--listen",
                         "unix:///tmp/tji-no-jax-{local_rank}.sock", "--function",
                         "mlp=torch_jax_interop.examples.mlp:apply"], "server"),
    (("torch",), ["train", "--address", "unix:///tmp/tji-no-torch.sock"], "client"),
    (("torch",), ["demo"], "server,client"),
    (("prometheus_client",), ["worker", "--listen", "unix://{tmp}/w.sock",
                              "--function", "mlp=torch_jax_interop.examples.mlp:apply",
                              "--metrics-listen", "127.0.0.1:0"], "server"),
], ids=["worker", "worker-ranks", "train", "demo", "metrics"])
def test_a_missing_extra_is_named(run_python: Callable[..., subprocess.CompletedProcess[str]],
                                  tmp_path: Path, blocked: tuple[str, ...], argv: list[str],
                                  extra: str) -> None:
    tmp_path.chmod(0o700)
    argv = [arg.replace("{tmp}", str(tmp_path)) for arg in argv]
    command = "--metrics-listen" if "--metrics-listen" in argv else argv[0]
    result = run_python(_BLOCKER.format(blocked=blocked, argv=argv),
                        env={"PYTHONPATH": str(SRC)})
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert re.fullmatch(rf"error: `{command}.*` needs `\w+`, which is not installed here; "
                        rf"install the {extra} extra: pip install "
                        rf"'torch-jax-interop\[{re.escape(extra)}\]'", line), line
    assert "loaded: []" in result.stdout  # refused before importing either framework


def _wait_for(path: Path, process: subprocess.Popen[bytes], log: Path,
              timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"exited with {process.returncode}:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"not ready after {timeout} s:\n{log.read_text()}"
        time.sleep(0.1)
    return json.loads(path.read_text())


def _stop(process: subprocess.Popen[bytes]) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise


def test_functions_come_from_the_current_directory_and_the_app_dir(tmp_path: Path) -> None:
    """Through the console script (whose ``sys.path[0]`` is its bin/ directory): a module
    in the current directory and one in ``--app-dir`` are served and called."""
    import torch

    from torch_jax_interop.client import connect

    script = Path(sys.executable).with_name("torch-jax-interop")
    command = [str(script)] if script.exists() else MODULE
    here, elsewhere = tmp_path / "project", tmp_path / "apps"
    here.mkdir(mode=0o700)
    elsewhere.mkdir(mode=0o700)
    (here / "tji_here_module.py").write_text("def double(x):\n    return x * 2\n")
    (elsewhere / "tji_app_module.py").write_text("def triple(x):\n    return x * 3\n")
    ready, log = tmp_path / "ready.json", tmp_path / "worker.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [*command, "worker", "--listen", f"unix://{tmp_path}/w.sock",
             "--function", "double=tji_here_module:double",
             "--function", "triple=tji_app_module:triple", "--app-dir", "../apps",
             "--ready-file", str(ready), "--grace", "5"],
            cwd=here, env=_env(), stdout=out, stderr=subprocess.STDOUT)
    try:
        document = _wait_for(ready, process, log)
        assert document["metrics"] is None  # off unless asked for
        x = torch.arange(3, dtype=torch.float32)
        with connect(document["addresses"][0]) as worker:
            torch.testing.assert_close(worker.function("double")(x), x * 2)
            torch.testing.assert_close(worker.function("triple")(x), x * 3)
    finally:
        assert _stop(process) == 0, log.read_text()
    # --log-format text (the default): time, level, logger, pid, message
    assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO torch_jax_interop\.server "
                     rf"\[pid {process.pid}\] serving double, triple on unix://",
                     log.read_text(), re.MULTILINE), log.read_text()


def test_ranks_pass_json_logs_and_metrics_on_to_their_workers(tmp_path: Path) -> None:
    """``worker --ranks 2 --log-format json --metrics-listen 127.0.0.1:0``: every line of
    the launcher and of both workers is a JSON record with time, level, logger and pid, and
    each worker serves its own metrics endpoint."""
    import urllib.request

    ready, log = tmp_path / "ready.json", tmp_path / "group.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [*MODULE, "worker", "--ranks", "2", "--listen",
             f"unix://{tmp_path}/w-{{local_rank}}.sock", "--function",
             "mlp=torch_jax_interop.examples.mlp:apply", "--ready-file", str(ready),
             "--grace", "5", "--log-format", "json", "--metrics-listen", "127.0.0.1:0"],
            env=_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        document = _wait_for(ready, process, log)
        worker_pids = {w["pid"] for w in document["workers"]}
        lines = log.read_text().splitlines()
        records = [json.loads(line) for line in lines]  # every line is JSON
        for record in records:
            assert set(record) >= {"time", "level", "logger", "pid", "message"}, record
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", record["time"])
        assert {r["pid"] for r in records} >= worker_pids | {process.pid}
        endpoints = [m[1] for r in records
                     if (m := re.fullmatch(r"Prometheus metrics on http://(\S+)/metrics",
                                           r["message"]))]
        assert len(endpoints) == 2 and len(set(endpoints)) == 2, endpoints
        for endpoint in endpoints:
            with urllib.request.urlopen(f"http://{endpoint}/metrics", timeout=30) as response:
                assert b"torch_jax_interop_sessions 0.0" in response.read()
    finally:
        assert _stop(process) == 0, log.read_text()
    assert not list(tmp_path.glob("w-*.sock"))


def test_train_reports_what_it_meets_when_it_connects(tmp_path: Path, worker) -> None:  # noqa: ANN001
    """A function the worker does not serve and a missing socket directory are usage errors
    (2); a worker that does not answer is a run-time failure (1). One line each."""
    cases = [
        (["--address", worker.address, "--function", "no_such_function"], 2,
         r"unknown function `no_such_function`; this worker serves: .*--function NAME="),
        (["--address", f"unix://{tmp_path}/nowhere/w.sock"], 2,
         r"no unix socket at .*does not exist.*mkdir -m 0700"),
        (["--address", f"unix://{tmp_path}/w.sock", "--timeout", "0.5"], 1,
         r"no worker answered at unix://.*; |no worker answered at unix://.*Start one with"),
    ]
    tmp_path.chmod(0o700)
    for argv, status, pattern in cases:
        result = subprocess.run([*MODULE, "train", "--steps", "1", *argv], capture_output=True,
                                text=True, env=_env(), timeout=120, check=False)
        assert result.returncode == status, (argv, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr, result.stderr
        [line] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert re.search(pattern, line), line
        assert result.stderr.strip().splitlines()[-1] == line
