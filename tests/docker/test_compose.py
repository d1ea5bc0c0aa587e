"""docker/compose.yaml and the Dockerfiles, checked without a Docker engine.

Three layers, from cheapest to most telling:

1. ``docker-compose config -q`` validates the file against Compose's schema and cross-service
   references (skipped, with the reason, where the ``docker-compose`` binary is absent).
2. The invariants that make shared memory and CUDA IPC work between containers are read from
   the YAML: shared IPC (and, for the gpu profile, PID) namespace, ``shm_size``, the socket on
   a shared named volume, a healthcheck through ``torch-jax-interop health``, the trainer
   waiting for a healthy worker, non-root images with one UID, as many workers as trainer
   ranks on one socket template.
3. Each `cpu`-profile service's command runs as a local process with that service's
   environment (the image's ``ENV`` plus the service's ``environment``); container paths on
   the socket volume map to a short temporary directory, and ``${VAR:-default}`` is filled as
   Compose fills it. The healthcheck command runs until every worker is healthy, the
   trainer (``torchrun``, two ranks) finishes the demo, and SIGTERM stops the workers
   cleanly; the parameters rank 0 saved match the same training in one process. This is
   what ``docker compose --profile cpu up --exit-code-from torch-trainer`` does, minus the
   images and the namespaces (tests/docker/test_images.py runs that too, where it can).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.dockerfiles import COMPOSE_FILE, DOCKER_DIR, arg_defaults, final_stage, instructions

CLI = "torch-jax-interop"
SOCKET_VOLUME_TARGET = "/run/torch-jax-interop"
SHM_DIR = "/dev/shm"

# (worker, trainer) pairs and the profile that enables them.
PAIRS = [("jax-worker", "torch-trainer", "cpu"), ("jax-worker-gpu", "torch-trainer-gpu", "gpu")]


# --- helpers ----------------------------------------------------------------------------------


_VARIABLE = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def _interpolate(value: Any) -> Any:
    """``${NAME:-default}`` / ``${NAME-default}`` / ``${NAME}`` filled from the environment,
    in every string of the loaded file, as Compose does before it reads the file."""
    if isinstance(value, str):
        return _VARIABLE.sub(lambda m: os.environ.get(m.group(1)) or (m.group(2) or ""), value)
    if isinstance(value, list):
        return [_interpolate(v) for v in value]
    if isinstance(value, dict):
        return {k: _interpolate(v) for k, v in value.items()}
    return value


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    with COMPOSE_FILE.open() as f:
        return _interpolate(yaml.safe_load(f))


def _torchrun_args(command: list[str]) -> tuple[argparse.Namespace, argparse.Namespace]:
    """A ``torchrun ... -m torch_jax_interop.demo.ddp ...`` command, parsed by torchrun's own
    parser and then by the training script's."""
    from torch.distributed.run import get_args_parser

    from torch_jax_interop.demo.ddp import build_parser

    assert command[0] == "torchrun", command
    launcher = get_args_parser().parse_args(command[1:])
    assert launcher.module and launcher.training_script == "torch_jax_interop.demo.ddp", command
    return launcher, build_parser().parse_args(launcher.training_script_args)


def _service(compose: dict[str, Any], name: str) -> dict[str, Any]:
    assert name in compose["services"], f"compose.yaml has no service `{name}`"
    return compose["services"][name]


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # the `- KEY=value` form
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def _option(command: list[str], flag: str) -> str:
    """The value after ``flag`` in an exec-form command (``--flag value``)."""
    assert flag in command, f"{flag} missing from {command}"
    return command[command.index(flag) + 1]


def _unix_path(address: str) -> str:
    assert address.startswith("unix://"), f"expected a unix:// address, got {address!r}"
    return address[len("unix://"):]


def _volume_mounts(service: dict[str, Any]) -> dict[str, str]:
    """target -> source for the service's volumes (short ``source:target[:mode]`` form)."""
    mounts = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            mounts[volume["target"]] = volume["source"]
        else:
            source, target = volume.split(":")[:2]
            mounts[target] = source
    return mounts


def _parse_size(text: str | int) -> int:
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"(\d+)\s*([kmg]?)b?", str(text).strip().lower())
    assert match, f"unparseable size {text!r}"
    return int(match.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[match.group(2)]


def _parse_duration(text: str) -> float:
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"unparseable duration {text!r}"
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * scale[u] for n, u in parts)


def _dockerfile_of(service: dict[str, Any]) -> Path:
    build = service["build"]
    return (DOCKER_DIR / build["context"] / build["dockerfile"]).resolve()


# --- 1. docker-compose config -----------------------------------------------------------------


@pytest.mark.parametrize(("worker", "trainer", "profile"), PAIRS, ids=[p[2] for p in PAIRS])
def test_compose_config_validates(
        worker: str, trainer: str, profile: str) -> None:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("`docker-compose` is not installed (Debian package docker-compose; .ci/run "
                    "installs it when apt-get works), so compose.yaml was not schema-checked")
    argv = [exe, "-f", str(COMPOSE_FILE), "--profile", profile]
    result = subprocess.run([*argv, "config", "-q"], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, f"{shlex.join(argv)} config -q:\n{result.stderr}"
    # docker-compose 1.29's `config --services` lists every service whatever the profile, so
    # which services a profile starts is read from the YAML below, and scripts/docker_e2e.sh
    # checks that `--profile cpu up` started the cpu pair and nothing else.


# --- 2. invariants read from the YAML and the Dockerfiles ------------------------------------


def test_every_service_is_in_one_profile_built_here(compose: dict[str, Any]) -> None:
    # With a service outside every profile, `--profile gpu up` would start it as well.
    by_profile: dict[str, set[str]] = {}
    for name, service in compose["services"].items():
        assert len(service.get("profiles", [])) == 1, f"{name}: profiles {service.get('profiles')}"
        by_profile.setdefault(service["profiles"][0], set()).add(name)
        # container_name would make `--scale` impossible.
        assert "container_name" not in service, name
        # The images are this repository's: built, never pulled from a registry.
        assert service["pull_policy"] == "build", name
        assert "build" in service and "image" in service, name
    assert by_profile == {p: {w, t} for w, t, p in PAIRS}


@pytest.mark.parametrize(("worker", "trainer", "profile"), PAIRS, ids=[p[0] for p in PAIRS])
def test_workers_restart_and_trainers_do_not(
        compose: dict[str, Any], worker: str, trainer: str, profile: str) -> None:
    assert _service(compose, worker)["restart"] in ("unless-stopped", "always", "on-failure")
    # A finished training must not start again (and `up --exit-code-from` waits for it).
    assert _service(compose, trainer)["restart"] == "no"


@pytest.mark.parametrize(("worker", "trainer", "profile"), PAIRS, ids=[p[0] for p in PAIRS])
def test_trainer_shares_the_workers_ipc_namespace_and_socket(
    compose: dict[str, Any], worker: str, trainer: str, profile: str
) -> None:
    w, t = _service(compose, worker), _service(compose, trainer)
    assert w["profiles"] == t["profiles"] == [profile]
    assert w["ipc"] == "shareable"
    assert t["ipc"] == f"service:{worker}"
    assert t["depends_on"][worker]["condition"] == "service_healthy"

    # The socket lives on one named volume mounted at the same place in both containers.
    listen = _option(w["command"], "--listen")
    assert _option(t["command"], "--address") == listen
    socket_dir = os.path.dirname(_unix_path(listen))
    w_mounts, t_mounts = _volume_mounts(w), _volume_mounts(t)
    assert socket_dir in w_mounts and socket_dir in t_mounts
    assert w_mounts[socket_dir] == t_mounts[socket_dir]
    assert w_mounts[socket_dir] in (compose.get("volumes") or {}), "not a named volume"
    assert len(_unix_path(listen.format(local_rank=999)).encode()) < 107

    # As many workers as trainer ranks, all from the template the ranks fill.
    ranks = int(_option(w["command"], "--ranks"))
    assert ranks >= 1
    assert int(_option(t["command"], "--nproc_per_node")) == ranks
    assert int(_option(w["healthcheck"]["test"], "--ranks")) == ranks
    assert "{local_rank}" in listen, "each rank's worker needs its own socket"

    # Both sides look for regions in the same directory.
    shm_dir = _environment(w).get("TORCH_JAX_INTEROP_SHM_DIR", SHM_DIR)
    assert _environment(t).get("TORCH_JAX_INTEROP_SHM_DIR", SHM_DIR) == shm_dir == SHM_DIR
    assert _option(t["command"], "--transport") == "auto"
    assert int(_option(t["command"], "--steps")) > 0


@pytest.mark.parametrize("worker", [p[0] for p in PAIRS])
def test_worker_shm_size_is_set_and_explained(compose: dict[str, Any], worker: str) -> None:
    w = _service(compose, worker)
    assert _parse_size(w["shm_size"]) >= 256 << 20, "Docker's 64 MiB default is too small"
    text = COMPOSE_FILE.read_text()
    for why in ("64 MiB", "SIGBUS", "posix_fallocate"):
        assert why in text, f"the shm_size comment should mention {why}"


@pytest.mark.parametrize("worker", [p[0] for p in PAIRS])
def test_healthcheck_uses_the_grpc_health_cli(compose: dict[str, Any], worker: str) -> None:
    w = _service(compose, worker)
    test = w["healthcheck"]["test"]
    assert test[0] == "CMD", "exec form: no shell needed in the slim image"
    assert test[1:3] == [CLI, "health"]
    assert test[3] == _option(w["command"], "--listen")
    for key in ("interval", "timeout", "start_period"):
        assert _parse_duration(w["healthcheck"][key]) > 0
    assert w["healthcheck"]["retries"] >= 1
    assert w["command"][:2] == [CLI, "worker"]


@pytest.mark.parametrize("name", [n for pair in PAIRS for n in pair[:2]])
def test_commands_parse_with_the_cli(compose: dict[str, Any], name: str) -> None:
    from torch_jax_interop._launch import STOP_MARGIN_S
    from torch_jax_interop.cli import build_parser  # imports neither torch nor jax

    service = _service(compose, name)
    parser = build_parser()
    if service["command"][0] == "torchrun":
        launcher, script = _torchrun_args(service["command"])
        assert launcher.standalone and int(launcher.nproc_per_node) >= 1
        assert script.address == _option(service["command"], "--address")
    else:
        args = parser.parse_args(service["command"][1:])
        if "healthcheck" in service:
            parser.parse_args(service["healthcheck"]["test"][2:])
        if args.command == "worker":
            # Docker's SIGKILL must not cut the workers' own drain short (the launcher of
            # `--ranks N` waits STOP_MARGIN_S past it before it kills them).
            margin = STOP_MARGIN_S if args.ranks is not None else 0.0
            assert _parse_duration(service["stop_grace_period"]) > args.grace + margin
    # The image's default command (`docker run IMAGE`) is a valid one too.
    cmd = [rest for kw, rest in final_stage(_dockerfile_of(service)) if kw == "CMD"]
    default = json.loads(cmd[-1])
    assert default[0] == CLI
    parser.parse_args(default[1:])


def test_gpu_profile_reserves_gpus_and_shares_pid(compose: dict[str, Any]) -> None:
    worker, trainer = _service(compose, "jax-worker-gpu"), _service(compose, "torch-trainer-gpu")
    assert trainer["pid"] == "service:jax-worker-gpu", "CUDA IPC needs one PID namespace"
    for service in (worker, trainer):
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert any("gpu" in d.get("capabilities", []) for d in devices), devices
        assert service["build"]["args"]["VARIANT"] == "cuda"
    for name in ("jax-worker", "torch-trainer"):
        service = _service(compose, name)
        assert service["build"]["args"]["VARIANT"] == "cpu"
        assert "deploy" not in service
    # The workers map sealed regions only, found through /proc/<trainer pid>/fd.
    assert "pid" not in _service(compose, "jax-worker")
    assert _service(compose, "torch-trainer")["pid"] == "service:jax-worker"


def test_images_share_one_uid(compose: dict[str, Any]) -> None:
    # The worker's unix socket is mode 0600: only the same UID can connect.
    uids = {arg_defaults(_dockerfile_of(_service(compose, s)))["APP_UID"]
            for s in ("jax-worker", "torch-trainer")}
    assert len(uids) == 1, uids


def test_trainer_uses_the_pytorch_cpu_index_by_default(compose: dict[str, Any]) -> None:
    dockerfile = _dockerfile_of(_service(compose, "torch-trainer"))
    args = arg_defaults(dockerfile)
    assert args["VARIANT"] == "cpu"
    assert args["TORCH_CPU_INDEX"] == "https://download.pytorch.org/whl/cpu"
    assert args["TORCH_FIND_LINKS"] == ""  # a folder of wheels replaces the index only if set
    runs = " ".join(rest for kw, rest in instructions(dockerfile) if kw == "RUN")
    assert 'cpu)  set -- --index-url "$TORCH_CPU_INDEX"' in runs
    assert '--no-deps "$@" "torch==${TORCH_VERSION}"' in runs


# --- 3. the services' commands as local processes ---------------------------------------------


class _LocalServices:
    """Runs compose services' commands as local processes, each in its own process group."""

    def __init__(self, compose: dict[str, Any], path_map: dict[str, str]) -> None:
        self.compose = compose
        self.path_map = path_map
        self.logs = Path(tempfile.mkdtemp(prefix="tji-logs-"))
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def _map(self, value: str) -> str:
        for container_path, local_path in self.path_map.items():
            value = value.replace(container_path, local_path)
        return value

    def argv(self, command: list[str]) -> list[str]:
        command = [self._map(str(a)) for a in command]
        if command[0] == "torchrun":  # the image's console script is this module
            return [sys.executable, "-m", "torch.distributed.run", *command[1:]]
        assert command[0] == CLI, command
        # The image puts the venv's bin first on PATH; here that is this interpreter's venv.
        exe = shutil.which(CLI, path=os.path.dirname(sys.executable))
        return [exe, *command[1:]] if exe else [sys.executable, "-m", "torch_jax_interop.cli",
                                                *command[1:]]

    def env(self, name: str) -> dict[str, str]:
        service = _service(self.compose, name)
        env = dict(os.environ)
        for keyword, rest in final_stage(_dockerfile_of(service)):
            if keyword == "ENV":
                for item in shlex.split(rest):
                    key, _, value = item.partition("=")
                    if key != "PATH":
                        env[key] = value
        env.update({k: self._map(v) for k, v in _environment(service).items()})
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
        return env

    def start(self, name: str, command: list[str]) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("wb")
        proc = subprocess.Popen(self.argv(command), env=self.env(name), stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        log.close()
        self.procs[name] = proc
        return proc

    def run(self, name: str, command: list[str], timeout: float) -> tuple[int, str]:
        result = subprocess.run(self.argv(command), env=self.env(name), capture_output=True,
                                text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                                check=False, start_new_session=True)
        return result.returncode, result.stdout + result.stderr

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def group_alive(self, name: str) -> bool:
        try:
            os.killpg(self.procs[name].pid, 0)
        except ProcessLookupError:
            return False
        return True

    def close(self) -> None:
        for name, proc in self.procs.items():
            if self.group_alive(name):
                os.killpg(proc.pid, signal.SIGKILL)
            if proc.poll() is None:
                proc.wait(timeout=30)
        shutil.rmtree(self.logs, ignore_errors=True)


@pytest.fixture
def local_services(compose: dict[str, Any]) -> Iterator[_LocalServices]:
    # The socket volume becomes a short private directory: a unix socket path must stay
    # under 107 bytes, which pytest's tmp_path does not guarantee.
    socket_dir = tempfile.mkdtemp(prefix="tji", dir="/tmp")
    services = _LocalServices(compose, {SOCKET_VOLUME_TARGET: socket_dir})
    try:
        yield services
    finally:
        services.close()
        shutil.rmtree(socket_dir, ignore_errors=True)


def _regions_of(pids: list[int]) -> list[str]:
    """Shared-memory entries named after one of ``pids`` (``tji-<owner pid>-<hex>``)."""
    try:
        names = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if any(n.startswith(f"tji-{pid}-") for pid in pids))


@pytest.mark.slow
def test_cpu_services_run_as_local_processes(
    compose: dict[str, Any], local_services: _LocalServices
) -> None:
    worker, trainer = _service(compose, "jax-worker"), _service(compose, "torch-trainer")
    health = worker["healthcheck"]

    proc = local_services.start("jax-worker", worker["command"])

    # Docker's rule: healthy on the first passing check; unhealthy after `retries` failures
    # once the start period is over.
    deadline = time.monotonic() + _parse_duration(health["start_period"]) + (
        health["retries"] * (_parse_duration(health["interval"])
                             + _parse_duration(health["timeout"])))
    while True:
        assert proc.poll() is None, (
            f"worker exited with {proc.returncode}:\n{local_services.log('jax-worker')}")
        code, output = local_services.run("jax-worker", health["test"][1:],
                                          timeout=_parse_duration(health["timeout"]))
        if code == 0:
            break
        assert time.monotonic() < deadline, (
            f"worker never became healthy; last check: {output}\n"
            f"{local_services.log('jax-worker')}")
        time.sleep(min(_parse_duration(health["interval"]), 1.0))
    ranks = int(_option(worker["command"], "--ranks"))
    assert output.count(": SERVING") == ranks, output

    # The compose file trains for longer than a test should; a few steps show the same path.
    command = list(trainer["command"])
    command[command.index("--steps") + 1] = "3"
    started = time.monotonic()
    trainer_proc = local_services.start("torch-trainer", command)
    try:
        code = trainer_proc.wait(timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail(f"trainer still running after 300 s:\n{local_services.log('torch-trainer')}")
    out = local_services.log("torch-trainer")
    assert code == 0, f"trainer exited with {code}:\n{out}\nworker:\n" + local_services.log(
        "jax-worker")
    # One host and one /dev/shm, so `--transport auto` must have picked shared memory, in
    # every rank, each with the worker of its own local rank.
    found = re.findall(r"rank (\d+)/(\d+) \(pid (\d+)\): worker (\S+); transport\W+"
                       r"(shm|shared[- ]memory|inline|cuda[-_ ]?ipc)", out, re.IGNORECASE)
    assert sorted(int(f[0]) for f in found) == list(range(ranks)), (
        f"the trainer's output does not name each rank's worker and transport:\n{out}")
    template = local_services._map(_option(worker["command"], "--listen"))
    for rank, world, _pid, address, transport in found:
        assert int(world) == ranks and address == template.format(local_rank=int(rank)), out
        assert transport.lower() in ("shm", "shared memory", "shared-memory"), out
    rank_pids = [int(f[2]) for f in found]
    worker_pids = [int(p) for p in re.findall(r"worker for local rank \d+ \(pid (\d+)\)",
                                              local_services.log("jax-worker"))]
    assert len(worker_pids) == ranks, local_services.log("jax-worker")
    assert time.monotonic() - started < 300

    # `docker compose stop` / the end of `up --exit-code-from`: SIGTERM, then a grace period.
    proc.send_signal(signal.SIGTERM)
    grace = _parse_duration(worker.get("stop_grace_period", "10s"))
    try:
        worker_code = proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pytest.fail(f"worker ignored SIGTERM for {grace} s:\n{local_services.log('jax-worker')}")
    assert worker_code == 0, f"worker exited with {worker_code} on SIGTERM:\n" + (
        local_services.log("jax-worker"))

    for name in ("jax-worker", "torch-trainer"):
        assert not local_services.group_alive(name), f"a process of {name} outlived it"
    for rank in range(ranks):
        socket_path = _unix_path(template.format(local_rank=rank))
        assert not os.path.exists(socket_path), "a worker left its socket file behind"
    # Region names carry the owner's pid, so this sees only this test's regions even when
    # other test runs share /dev/shm.
    pids = [proc.pid, trainer_proc.pid, *rank_pids, *worker_pids]
    assert _regions_of(pids) == [], "shared-memory regions outlived their processes"

    # Rank 0 saved its parameters where the service says (on the socket volume): the same
    # training in one process, the JAX function run in-process, ends with the same ones.
    saved = local_services._map(_option(trainer["command"], "--save"))
    compare = subprocess.run(
        [sys.executable, "-m", "torch_jax_interop.demo.ddp", "--compare", saved],
        capture_output=True, text=True, timeout=300, check=False)
    assert compare.returncode == 0, compare.stdout + compare.stderr
    assert "parameters match in-process training: True (" in compare.stdout
