"""Usage errors of every entry point: ONE ``error: <what>; <how to fix>`` line on stderr,
exit status 2, no traceback unless ``--debug`` (Note [Exit statuses of the command line] in
``cli.py``). Each case runs the real command line in a fresh interpreter; none of them
starts a worker, and none leaves a socket or shared-memory file behind."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import torch_jax_interop

SRC = Path(torch_jax_interop.__file__).resolve().parents[1]
MLP = "mlp=torch_jax_interop.examples.mlp:apply"
ENTRY_POINTS = {
    "module": [sys.executable, "-m", "torch_jax_interop"],
    "cli": [sys.executable, "-m", "torch_jax_interop.cli"],
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A private directory (0700) holding a module that is not a function and a broken one."""
    directory = tmp_path_factory.mktemp("tji-cli")
    directory.chmod(0o700)
    (directory / "notfn.py").write_text("VALUE = 3\n")
    (directory / "broken.py").write_text("raise RuntimeError('broken on purpose')\n")
    (directory / "needsdep.py").write_text("import tji_no_such_dependency\n")
    (directory / "cert.pem").write_text("not a certificate\n")
    yield directory


def run(argv: list[str], cwd: Path, *, entry: str = "module",
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "PYTHONPATH": str(SRC), **(env or {})}
    full_env.pop("TORCH_JAX_INTEROP_TOKEN", None)
    return subprocess.run([*ENTRY_POINTS[entry], *argv], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=120, check=False)


def assert_usage_error(result: subprocess.CompletedProcess[str], match: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip() == errors[0], f"more than the error line:\n{result.stderr}"
    assert re.search(match, errors[0]), f"{match!r} not in {errors[0]!r}"


# (id, argv with {tmp} for the private directory, pattern the error line must match)
BAD = [
    ("spec-without-colon", ["worker", "--listen", "unix://{tmp}/w.sock", "--function", "bad"],
     r"--function `bad` is not NAME=package\.module:attr; write e\.g\."),
    ("spec-without-attr", ["worker", "--listen", "unix://{tmp}/w.sock", "--function",
                           "x=torch_jax_interop.examples.mlp"], r"is not NAME=package"),
    ("no-function", ["worker", "--listen", "unix://{tmp}/w.sock"],
     r"give at least one --function"),
    ("same-name-twice", ["worker", "--listen", "unix://{tmp}/w.sock", "--function", MLP,
                         "--function", MLP], r"names `mlp` twice"),
    ("missing-module", ["worker", "--listen", "unix://{tmp}/w.sock", "--function",
                        "f=tji_no_such_module:f"],
     r"no module named `tji_no_such_module`.*--app-dir DIR"),
    ("missing-dependency", ["worker", "--listen", "unix://{tmp}/w.sock", "--function",
                            "f=needsdep:f"],
     r"imports `tji_no_such_dependency`, which is not installed"),
    ("module-raises", ["worker", "--listen", "unix://{tmp}/w.sock", "--function",
                       "f=broken:f"], r"raised RuntimeError: broken on purpose; fix the module"),
    ("missing-attribute", ["worker", "--listen", "unix://{tmp}/w.sock", "--function",
                           "f=torch_jax_interop.examples.mlp:nope"],
     r"has no attribute `nope`; it has apply"),
    ("not-callable", ["worker", "--listen", "unix://{tmp}/w.sock", "--function",
                      "f=notfn:VALUE"], r"is a int, not a function"),
    ("socket-path-too-long", ["worker", "--listen", "unix://{tmp}/" + "s" * 120 + ".sock",
                              "--function", MLP], r"the limit is 107; use a shorter directory"),
    ("missing-socket-directory", ["worker", "--listen", "unix://{tmp}/nowhere/w.sock",
                                  "--function", MLP], r"does not exist.*mkdir -m 0700"),
    ("abstract-socket", ["worker", "--listen", "unix-abstract:tji", "--function", MLP],
     r"abstract unix sockets are refused"),
    ("tcp-without-token", ["worker", "--listen", "127.0.0.1:0", "--function", MLP],
     r"needs a token.*TORCH_JAX_INTEROP_TOKEN"),
    ("network-without-tls", ["worker", "--listen", "0.0.0.0:0", "--function", MLP],
     r"reachable from the network.*--tls-cert"),
    ("address-without-scheme", ["worker", "--listen", "{tmp}/w.sock", "--function", MLP],
     r"has no scheme or port; write unix:///"),
    ("host-without-port", ["worker", "--listen", "localhost", "--function", MLP],
     r"has no scheme or port"),
    ("template-without-ranks", ["worker", "--listen", "unix://{tmp}/w-{{local_rank}}.sock",
                                "--function", MLP], r"is an address template: give --ranks N"),
    ("template-without-local-rank", ["worker", "--ranks", "2", "--listen",
                                     "unix://{tmp}/w.sock", "--function", MLP],
     r"no `\{local_rank\}`"),
    ("negative-limit", ["worker", "--listen", "unix://{tmp}/w.sock", "--function", MLP,
                        "--max-sessions", "-1"], r"argument --max-sessions: must be at least 1"),
    ("zero-limit", ["worker", "--listen", "unix://{tmp}/w.sock", "--function", MLP,
                    "--max-leaves", "0"], r"argument --max-leaves: must be at least 1"),
    ("malformed-limit", ["worker", "--listen", "unix://{tmp}/w.sock", "--function", MLP,
                         "--max-residuals", "many"], r"--max-residuals: `many` is not a whole"),
    ("zero-size", ["worker", "--listen", "unix://{tmp}/w.sock", "--function", MLP,
                   "--max-tensor-bytes", "0"], r"--max-tensor-bytes: `0` is below 1 byte"),
    ("negative-size", ["worker", "--listen", "unix://{tmp}/w.sock", "--function", MLP,
                       "--max-inline-bytes=-5M"], r"--max-inline-bytes: `-5M` is not a size"),
    ("ambiguous-size", ["worker", "--listen", "unix://{tmp}/w.sock", "--function", MLP,
                        "--max-residual-bytes", "64MB"], r"ambiguous.*write 64MiB"),
    ("zero-timeout", ["worker", "--listen", "unix://{tmp}/w.sock", "--function", MLP,
                      "--idle-timeout", "0"], r"--idle-timeout: must be a finite number"),
    ("negative-grace", ["worker", "--listen", "unix://{tmp}/w.sock", "--function", MLP,
                        "--grace", "-1"], r"--grace: must be a finite number of seconds at least"),
    ("zero-ranks", ["worker", "--ranks", "0", "--listen", "unix://{tmp}/w.sock", "--function",
                    MLP], r"--ranks: must be at least 1"),
    ("cert-without-key", ["worker", "--listen", "unix://{tmp}/w.sock", "--function", MLP,
                          "--tls-cert", "{tmp}/cert.pem"], r"give --tls-cert and --tls-key"),
    ("client-ca-without-cert", ["worker", "--listen", "unix://{tmp}/w.sock", "--function", MLP,
                                "--tls-client-ca", "{tmp}/cert.pem"],
     r"--tls-client-ca needs --tls-cert"),
    ("unreadable-tls-files", ["worker", "--listen", "127.0.0.1:0", "--function", MLP,
                              "--tls-cert", "{tmp}/none.pem", "--tls-key", "{tmp}/none.pem"],
     r"cannot read the TLS .* file"),
    ("missing-token-file", ["worker", "--listen", "127.0.0.1:0", "--function", MLP,
                            "--token-file", "{tmp}/no-token"], r"--token-file: cannot read"),
    ("metrics-without-host", ["worker", "--listen", "unix://{tmp}/w.sock", "--function", MLP,
                              "--metrics-listen", "9100"], r"is not HOST:PORT; write e\.g\."),
    ("metrics-same-port-for-ranks", ["worker", "--ranks", "2", "--listen",
                                     "unix://{tmp}/w-{{local_rank}}.sock", "--function", MLP,
                                     "--metrics-listen", "127.0.0.1:9100"],
     r"needs its own metrics port"),
    ("app-dir-missing", ["worker", "--listen", "unix://{tmp}/w.sock", "--function", MLP,
                         "--app-dir", "{tmp}/nowhere"], r"--app-dir .* is not a directory"),
    ("missing-shm-dir", ["worker", "--listen", "unix://{tmp}/w.sock", "--function", MLP,
                         "--shm-dir", "{tmp}/no-shm"], r"--shm-dir .* is not a directory"),
    ("ready-file-in-missing-directory", ["worker", "--listen", "unix://{tmp}/w.sock",
                                         "--function", MLP, "--ready-file", "{tmp}/no/r.json"],
     r"--ready-file .*: the directory .* does not exist"),
    ("negative-spin", ["worker", "--listen", "unix://{tmp}/w.sock", "--function", MLP,
                       "--spin-us", "-1"], r"--spin-us: must be at least 0, got -1"),
    ("huge-spin", ["worker", "--listen", "unix://{tmp}/w.sock", "--function", MLP,
                   "--spin-us", "1000000"], r"--spin-us: must be at most 100000 \(0\.1 s\)"),
    ("unknown-option", ["worker", "--listen", "unix://{tmp}/w.sock", "--frobnicate"],
     r"unrecognized arguments: --frobnicate; see `torch-jax-interop --help`"),
    ("missing-listen", ["worker", "--function", MLP],
     r"the following arguments are required: --listen"),
    ("no-command", [], r"required: COMMAND"),
    ("unknown-command", ["serve"], r"invalid choice: 'serve'"),
    ("bad-log-level", ["--log-level", "loud", "health", "unix://{tmp}/w.sock"],
     r"argument --log-level: invalid choice.*'debug', 'info', 'warning', 'error'"),
    ("unknown-transport-train", ["train", "--address", "unix://{tmp}/w.sock", "--transport",
                                 "tcp"],
     r"invalid choice: 'tcp' \(choose from 'auto', 'cuda_ipc', 'shm', 'inline'\)"),
    ("unknown-transport-demo", ["demo", "--transport", "rdma"],
     r"invalid choice: 'rdma' \(choose from 'auto', 'cuda_ipc', 'shm', 'inline'\)"),
    ("train-address-without-scheme", ["train", "--address", "worker.sock"],
     r"--address `worker.sock` has no scheme or port"),
    ("train-zero-steps", ["train", "--address", "unix://{tmp}/w.sock", "--steps", "0"],
     r"--steps: must be at least 1"),
    ("health-address-without-scheme", ["health", "{tmp}/w.sock"], r"has no scheme or port"),
    ("health-template-without-ranks", ["health", "unix://{tmp}/w-{{local_rank}}.sock"],
     r"is an address template: give --ranks N"),
    ("health-key-without-cert", ["health", "127.0.0.1:1", "--tls-key", "{tmp}/cert.pem"],
     r"--tls-cert and --tls-key together"),
    ("health-zero-timeout", ["health", "127.0.0.1:1", "--timeout", "0"],
     r"--timeout: must be a finite number of seconds above 0"),
]


@pytest.mark.parametrize(("argv", "match"), [pytest.param(a, m, id=i) for i, a, m in BAD])
def test_usage_errors_print_one_line_and_exit_2(workdir: Path, argv: list[str],
                                                match: str) -> None:
    argv = [arg.replace("{tmp}", str(workdir)).replace("{{", "{").replace("}}", "}")
            for arg in argv]
    assert_usage_error(run(argv, workdir), match)
    assert not (workdir / "w.sock").exists()


@pytest.mark.parametrize("entry", ["cli", "server"])
def test_every_entry_point_follows_the_convention(workdir: Path, entry: str) -> None:
    """``python -m torch_jax_interop.cli`` and ``python -m torch_jax_interop.server`` (the
    ``worker`` subcommand) behave like ``python -m torch_jax_interop``."""
    argv = ["--listen", f"{workdir}/w.sock", "--function", MLP]
    if entry == "server":
        command = [sys.executable, "-m", "torch_jax_interop.server", *argv]
    else:
        command = [*ENTRY_POINTS["cli"], "worker", *argv]
    result = subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(SRC)}, check=False)
    assert_usage_error(result, r"has no scheme or port")


def test_console_script_follows_the_convention(workdir: Path) -> None:
    script = Path(sys.executable).with_name("torch-jax-interop")
    if not script.exists():
        pytest.skip(f"no console script next to {sys.executable} (install the project)")
    result = subprocess.run([str(script), "worker", "--listen", "localhost", "--function", MLP],
                            cwd=workdir, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(SRC)}, check=False)
    assert_usage_error(result, r"`localhost` has no scheme or port")


@pytest.mark.parametrize("flag", [["--debug"], ["--log-level", "debug"]])
def test_debug_shows_the_traceback_too(workdir: Path, flag: list[str]) -> None:
    result = run(["worker", *flag, "--listen", f"unix://{workdir}/w.sock", "--function",
                  "f=broken:f"], workdir)
    assert result.returncode == 2
    assert "Traceback (most recent call last)" in result.stderr
    assert "RuntimeError: broken on purpose" in result.stderr  # the cause, chained
    assert result.stderr.strip().splitlines()[-1].startswith("error: --function")


def test_an_address_in_use_is_a_usage_error(workdir: Path) -> None:
    """The error found only when binding (after JAX loaded): still one line, exit 2."""
    import socket

    directory = workdir / "inuse"
    directory.mkdir(mode=0o700, exist_ok=True)
    path = directory / "w.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(path))
        listener.listen(1)
        result = run(["worker", "--listen", f"unix://{path}", "--function", MLP], workdir)
    finally:
        listener.close()
        path.unlink()
    assert_usage_error(result, r"a worker already listens on .*; stop it first")


def test_a_metrics_port_in_use_is_a_usage_error(workdir: Path) -> None:
    import socket

    taken = socket.socket()
    try:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = run(["worker", "--listen", f"unix://{workdir}/w.sock", "--function", MLP,
                      "--metrics-listen", f"127.0.0.1:{port}"], workdir)
    finally:
        taken.close()
    assert_usage_error(result, rf"cannot serve metrics on 127\.0\.0\.1:{port} "
                               r"\(--metrics-listen\): Address already in use")
    assert not (workdir / "w.sock").exists()
