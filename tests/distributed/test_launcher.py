"""``torch-jax-interop worker --ranks N``: N real worker processes from one address template,
checked by ``health --ranks N``, stopped cleanly, and never left behind."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from torch_jax_interop.cli import _worker_argv, build_parser

FUNCTION = "mlp=torch_jax_interop.examples.mlp:apply"
CLI = [sys.executable, "-m", "torch_jax_interop.cli"]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in "ZX"
    except FileNotFoundError:
        return False


def wait_until(condition, timeout: float, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {timeout:.0f} s"
        time.sleep(0.1)


class Launcher:
    """``worker --ranks 2`` in its own process group, with its ready file and log."""

    def __init__(self, directory: Path) -> None:
        self.template = f"unix://{directory}/worker-{{local_rank}}.sock"
        self.ready = directory / "ready.json"
        self.log_path = directory / "launcher.log"
        self.started = time.time() - 1
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [*CLI, "worker", "--ranks", "2", "--listen", self.template, "--function",
                 FUNCTION, "--grace", "5", "--ready-file", str(self.ready)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        deadline = time.monotonic() + 180
        while not self.ready.exists():
            assert self.process.poll() is None, f"the launcher exited:\n{self.log()}"
            assert time.monotonic() < deadline, f"no ready file after 180 s:\n{self.log()}"
            time.sleep(0.1)
        self.document = json.loads(self.ready.read_text())
        self.worker_pids = [w["pid"] for w in self.document["workers"]]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def sockets(self) -> list[str]:
        return [a.removeprefix("unix://") for a in self.document["addresses"]]

    def health(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*CLI, "health", "--ranks", "2", self.template, "--timeout", "3"],
                              capture_output=True, text=True, timeout=60, check=False)

    def close(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in self.worker_pids:  # reparented if the launcher died first
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.process.wait(timeout=30)


@pytest.fixture
def launcher() -> Iterator[Launcher]:
    directory = Path(tempfile.mkdtemp(prefix="tji", dir="/tmp"))  # socket paths < 107 bytes
    started = None
    try:
        started = Launcher(directory)
        yield started
    finally:
        if started is not None:
            started.close()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.slow
def test_workers_serve_one_socket_per_rank_and_stop_on_sigterm(launcher: Launcher) -> None:
    document = launcher.document
    assert document["pid"] == launcher.process.pid
    assert [w["local_rank"] for w in document["workers"]] == [0, 1]
    assert document["addresses"] == [launcher.template.format(local_rank=i) for i in (0, 1)]
    assert len(set(launcher.worker_pids)) == 2 and all(map(alive, launcher.worker_pids))
    for path in launcher.sockets():
        assert os.stat(path).st_mode & 0o777 == 0o600

    health = launcher.health()
    assert health.returncode == 0, health.stderr
    assert health.stdout.count(": SERVING") == 2, health.stdout

    launcher.process.send_signal(signal.SIGTERM)
    assert launcher.process.wait(timeout=60) == 0, launcher.log()
    assert not any(map(alive, launcher.worker_pids))
    assert not any(os.path.exists(p) for p in launcher.sockets()), "a worker left its socket"
    assert not launcher.ready.exists(), "the launcher left its ready file"
    assert "all 2 workers stopped" in launcher.log()


@pytest.mark.slow
def test_a_dead_worker_stops_the_group(launcher: Launcher) -> None:
    os.kill(launcher.worker_pids[1], signal.SIGKILL)
    assert launcher.process.wait(timeout=60) == 1, launcher.log()
    assert not alive(launcher.worker_pids[0]), "the other worker outlived the launcher"
    assert "the worker for local rank 1 exited with code -9" in launcher.log()
    assert launcher.health().returncode == 1


@pytest.mark.slow
def test_workers_follow_a_killed_launcher(launcher: Launcher) -> None:
    # SIGKILL gives the launcher no chance to stop its workers: the kernel does
    # (PR_SET_PDEATHSIG), and each drains as on SIGTERM.
    started = launcher.started
    os.kill(launcher.process.pid, signal.SIGKILL)
    launcher.process.wait(timeout=30)
    wait_until(lambda: not any(map(alive, launcher.worker_pids)), 60,
               "the workers did not exit after their launcher was killed")
    assert not any(os.path.exists(p) for p in launcher.sockets())
    # The workers' own ready files went as soon as the launcher had read them.
    assert not [d for d in os.listdir(tempfile.gettempdir()) if d.startswith("tji-ranks-")
                and os.stat(os.path.join(tempfile.gettempdir(), d)).st_uid == os.getuid()
                and os.path.getmtime(os.path.join(tempfile.gettempdir(), d)) >= started]


@pytest.mark.slow
def test_local_rank_serves_one_rank_of_a_template(tmp_path: Path) -> None:
    directory = Path(tempfile.mkdtemp(prefix="tji", dir="/tmp"))  # socket paths < 107 bytes
    ready = tmp_path / "ready.json"
    process = subprocess.Popen(
        [*CLI, "worker", "--local-rank", "1", "--listen",
         f"unix://{directory}/worker-{{local_rank}}.sock", "--function", FUNCTION,
         "--grace", "5", "--ready-file", str(ready)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        wait_until(lambda: ready.exists() or process.poll() is not None, 180,
                   "the worker did not serve")
        assert process.poll() is None, process.stderr.read().decode()  # type: ignore[union-attr]
        assert json.loads(ready.read_text())["addresses"] == [f"unix://{directory}/worker-1.sock"]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        assert process.stderr is not None
        process.stderr.close()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.parametrize(("argv", "message"), [
    (["worker", "--listen", "unix:///tmp/w-{local_rank}.sock", "--function", FUNCTION],
     "is an address template: give --ranks N"),
    (["worker", "--ranks", "2", "--listen", "unix:///tmp/w.sock", "--function", FUNCTION],
     r"2 workers need 2 addresses"),
    (["worker", "--ranks", "2", "--listen", "unix:///tmp/w-{rank}.sock", "--function",
      FUNCTION], r"names `\{rank\}`, which a launcher on one host cannot fill"),
    (["worker", "--ranks", "2", "--listen", "unix:///tmp/w-{local_rank}.sock"],
     "give at least one --function"),
    (["health", "--ranks", "2", "unix:///tmp/w.sock"], "2 workers need 2 addresses"),
    (["health", "unix:///tmp/w-{local_rank}.sock"], "is an address template: give --ranks N"),
    (["worker", "--local-rank", "1", "--listen", "unix:///tmp/w-{local_world_size}.sock",
      "--function", FUNCTION], r"\$LOCAL_WORLD_SIZE is not set"),
    (["worker", "--local-rank", "1", "--ranks", "2", "--listen", "unix:///tmp/w.sock",
      "--function", FUNCTION], "not allowed with argument"),
])
def test_bad_rank_options_fail_before_starting_anything(argv: list[str], message: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_WORLD_SIZE", "LOCAL_RANK")}
    result = subprocess.run([*CLI, *argv], capture_output=True, text=True, timeout=60,
                            check=False, env=env)
    assert result.returncode == 2, result.stderr
    assert re.search(message, result.stderr), result.stderr


def test_every_worker_option_reaches_the_workers() -> None:
    """``worker --ranks N`` passes each option of ``worker`` on, except those it sets per
    worker; a new option of ``worker`` fails this test until ``_worker_argv`` passes it."""
    parser = build_parser()
    per_worker = {"listen", "ranks", "local_rank", "ready_file", "help", "version"}
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    worker_parser = subparsers.choices["worker"]
    values = {"function": ["a=m:f", "b=m:g"], "token_env": "MY_TOKEN", "shm_dir": "/dev/shm/x",
              "max_sessions": 3, "max_residuals": 7, "max_tensor_bytes": 1234,
              "max_inline_bytes": 567, "grace": 2.5}
    values["allow_unsealed_regions"] = True  # a switch: given without a value
    values.update(token_file="/run/secrets/t", tls_cert="c.pem", tls_key="k.pem",
                  tls_client_ca="ca.pem", insecure=True, max_connections=9,
                  handshake_timeout=1.5, idle_timeout=60.0, max_streams_per_connection=5)
    values.update({"max_residual_bytes": 8901, "max_leaves": 12, "max_compiled_signatures": 34})
    values.update(no_fast_path=True, max_frame_bytes=4321, spin_us=350)
    values.update(app_dir="/srv/app", metrics_listen="127.0.0.1:910{local_rank}",
                  log_level="warning", log_format="json", debug=True)
    options = {a.dest for a in worker_parser._actions if a.option_strings} - per_worker
    assert options == set(values), "a worker option is not covered: add it to _worker_argv"
    argv = ["worker", "--ranks", "2", "--listen", "unix:///tmp/w-{local_rank}.sock"]
    for dest, value in values.items():
        flag = "--" + dest.replace("_", "-")
        if value is True:  # a switch
            argv.append(flag)
            continue
        for item in value if isinstance(value, list) else [value]:
            argv += [flag, str(item)]
    forwarded = _worker_argv(parser.parse_args(argv))
    again = parser.parse_args(["worker", "--listen", "unix:///tmp/w0.sock", *forwarded])
    for dest, value in values.items():
        assert getattr(again, dest) == value, dest
