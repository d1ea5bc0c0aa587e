"""Reading docker/Dockerfile.*, docker/compose.yaml and docker/lock/*.txt without an engine."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCKER_DIR = ROOT / "docker"
COMPOSE_FILE = DOCKER_DIR / "compose.yaml"
LOCK_DIR = DOCKER_DIR / "lock"
DOCKERFILES = {"worker": DOCKER_DIR / "Dockerfile.worker",
               "trainer": DOCKER_DIR / "Dockerfile.trainer"}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    result: list[tuple[str, str]] = []
    current = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        keyword, _, rest = current.partition(" ")
        result.append((keyword.upper(), rest.strip()))
        current = ""
    return result


def stages(path: Path) -> list[list[tuple[str, str]]]:
    """The instructions of each stage, from its FROM on (global ARGs before the first FROM
    are left out)."""
    result: list[list[tuple[str, str]]] = []
    for keyword, rest in instructions(path):
        if keyword == "FROM":
            result.append([])
        if result:
            result[-1].append((keyword, rest))
    return result


def final_stage(path: Path) -> list[tuple[str, str]]:
    return stages(path)[-1]


def arg_defaults(path: Path) -> dict[str, str]:
    """Every ``ARG NAME=default`` of the file (a later one wins; names differ here)."""
    defaults = {}
    for keyword, rest in instructions(path):
        if keyword == "ARG" and "=" in rest:
            name, value = rest.split("=", 1)
            defaults[name] = value
    return defaults


def substitute(text: str, values: dict[str, str]) -> str:
    """``${NAME}`` / ``$NAME`` replaced by ``values[NAME]`` (the Dockerfile's own ARGs)."""
    for name, value in sorted(values.items(), key=lambda kv: -len(kv[0])):
        text = text.replace("${" + name + "}", value).replace("$" + name, value)
    return text


def read_lock(name: str) -> dict[str, str]:
    """docker/lock/<name>.txt as {distribution: version}; every line must be ``name==version``."""
    pins = {}
    for line in (LOCK_DIR / f"{name}.txt").read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        dist, sep, version = line.partition("==")
        assert sep and dist and version and " " not in line, f"{name}.txt: not a pin: {line!r}"
        pins[canonical(dist)] = version
    return pins


def canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")
