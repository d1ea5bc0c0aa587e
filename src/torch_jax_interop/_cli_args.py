"""What the command line checks before it starts anything: option values (sizes, counts,
durations), addresses, served-function specs, and the extras a subcommand needs.

Every refusal is a :class:`UsageError` whose message says what is wrong and how to fix it;
``cli.main`` prints it as one ``error: ...`` line and exits with status 2 (argparse's own
usage errors exit 2 too). Imports no framework and not grpc: a client-only or a worker-only
install can run every check.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import re
import sys
from collections.abc import Callable
from typing import Any

from ._names import MAX_SPIN_US

UNIX_PATH_MAX = 107
"""Bytes of a unix socket path (``sun_path`` holds 108 with the terminating NUL)."""


class UsageError(ValueError):
    """A mistake in the command line or its environment: ``error: <what>; <how to fix>``,
    exit status 2, no traceback (unless ``--debug``). The command line's own control flow,
    not part of :mod:`torch_jax_interop.errors`; a ``ValueError`` for library callers of
    the one check the worker shares (``parse_metrics_listen``)."""


class CliHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written (plain text), and every option's default in its help
    (unless it has none: ``None``, ``False``, an empty list)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("%(default)" in text or not action.option_strings or default is None
                or default is False or default == [] or default is argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


class CliParser(argparse.ArgumentParser):
    """argparse's usage errors as ONE ``error:`` line, exit status 2 (Note [Exit statuses
    of the command line] in ``cli.py``); help in :class:`CliHelpFormatter` by default."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", CliHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> Any:  # argparse declares NoReturn
        self.exit(2, f"error: {message}; see `{self.prog} --help`\n")


# -- option values ----------------------------------------------------------------------------

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE = re.compile(r"(?P<number>\d+(?:\.\d+)?)\s*(?P<unit>[kmgt]?)(?P<suffix>i?b?)", re.I)


def parse_size(text: str) -> int:
    """Bytes from ``64MiB``, ``64M``, ``1.5GiB``, ``1G`` or plain ``1048576``: K, M, G, T
    (with or without ``iB``) are powers of 1024. ``MB``/``GB`` are refused as ambiguous
    (1000 or 1024?). Raises ``argparse.ArgumentTypeError`` unless at least 1 byte."""
    match = _SIZE.fullmatch(text.strip())
    example = "write e.g. 64MiB, 1G or 1048576 (bytes; K, M, G, T are powers of 1024)"
    if match is None:
        raise argparse.ArgumentTypeError(f"`{text}` is not a size; {example}")
    unit, suffix = match["unit"].lower(), match["suffix"].lower()
    if (unit and suffix == "b") or (not unit and suffix not in ("", "b")):
        raise argparse.ArgumentTypeError(
            f"`{text}` is ambiguous (1000 or 1024?); write {match['number']}"
            f"{unit.upper()}iB for powers of 1024, or the plain number of bytes")
    value = int(float(match["number"]) * _UNITS[unit])
    if value < 1:
        raise argparse.ArgumentTypeError(f"`{text}` is below 1 byte; {example}")
    return value


def format_size(value: int) -> str:
    """``4294967296`` -> ``4GiB``: the largest unit that divides ``value`` (for help text)."""
    for unit in ("T", "G", "M", "K"):
        factor = _UNITS[unit.lower()]
        if value % factor == 0:
            return f"{value // factor}{unit}iB"
    return str(value)


def positive_int(text: str) -> int:
    """A whole number of at least 1 (``argparse.ArgumentTypeError`` otherwise)."""
    try:
        value = int(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"`{text}` is not a whole number; give one of at "
                                         "least 1, e.g. 64") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}; e.g. 64")
    return value


def non_negative_int(text: str) -> int:
    """A whole number of at least 0 (a local rank)."""
    try:
        value = int(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"`{text}` is not a whole number; give one of at "
                                         "least 0, e.g. 0") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def spin_microseconds(text: str) -> int:
    """``--spin-us``: a whole number of microseconds from 0 to ``MAX_SPIN_US``."""
    value = non_negative_int(text)
    if value > MAX_SPIN_US:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_SPIN_US} (0.1 s), got "
                                         f"{value}; e.g. 200, or 0 to sleep at once")
    return value


def _seconds(text: str, *, allow_zero: bool) -> float:
    bound = "at least 0" if allow_zero else "above 0"
    try:
        value = float(text.strip().removesuffix("s"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"`{text}` is not a number of seconds; give one "
                                         f"{bound}, e.g. 30 or 0.5") from None
    if not (value >= 0 if allow_zero else value > 0) or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds {bound}, got "
                                         f"`{text}`; e.g. 30 or 0.5")
    return value


def positive_seconds(text: str) -> float:
    """Seconds above 0 (``30``, ``0.5``, ``30s``): a timeout."""
    return _seconds(text, allow_zero=False)


def non_negative_seconds(text: str) -> float:
    """Seconds of at least 0 (``--grace 0``: stop without waiting for in-flight calls)."""
    return _seconds(text, allow_zero=True)


# -- addresses --------------------------------------------------------------------------------

_NO_SCHEME = ("write unix:///path/to/worker.sock for a unix socket or HOST:PORT (e.g. "
              "127.0.0.1:50051) for TCP")


def _tcp_port(address: str) -> int | None:
    host, colon, port = address.rpartition(":")
    if not colon or not host or not port.isdigit() or "/" in host:
        return None
    value = int(port)
    return value if value <= 65535 else None


def check_listen_address(address: str, option: str = "--listen") -> None:
    """A worker's listen address: ``unix:PATH`` (a path short enough, in a directory that
    exists and only this user can write) or ``HOST:PORT``. ``UsageError`` otherwise."""
    from .transport._unix_socket import check_socket_directory, unix_socket_path

    if address.startswith("unix-abstract:"):
        raise UsageError(f"{option} `{address}`: abstract unix sockets are refused (any local "
                         "user could connect); use a unix:///path socket in a private "
                         "directory")
    path = unix_socket_path(address)
    if path is not None:
        if not path:
            raise UsageError(f"{option} `{address}` names no socket path; {_NO_SCHEME}")
        if len(path.encode()) > UNIX_PATH_MAX:
            raise UsageError(
                f"{option} `{address}`: the socket path is {len(path.encode())} bytes, the "
                f"limit is {UNIX_PATH_MAX}; use a shorter directory (e.g. "
                "unix:///tmp/tji/worker.sock)")
        try:
            check_socket_directory(path)  # missing, or writable by others
        except OSError as error:
            raise UsageError(f"{option}: {error}") from error
        return
    if _tcp_port(address) is None:
        raise UsageError(f"{option} `{address}` has no scheme or port; {_NO_SCHEME}")


def check_connect_address(address: str, option: str = "ADDRESS") -> None:
    """A worker's address as a client gives it: ``unix:PATH``, ``HOST:PORT``, or a gRPC
    target with a resolver scheme (``dns:``, ``ipv4:``, ``ipv6:``)."""
    if address.startswith(("unix:", "dns:", "ipv4:", "ipv6:")):
        return
    if address.startswith("unix-abstract:"):
        raise UsageError(f"{option} `{address}`: abstract unix sockets are refused; use the "
                         "worker's unix:///path socket")
    if _tcp_port(address) is None:
        raise UsageError(f"{option} `{address}` has no scheme or port; {_NO_SCHEME}")


def parse_metrics_listen(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:9100`` for IPv6; port 0 picks a free one) -> ``(host,
    port)``. The host is required: the metrics server binds only where it is told."""
    port = _tcp_port(address)
    host = address.rpartition(":")[0]
    if port is None or not host:
        raise UsageError(
            f"--metrics-listen (metrics_listen=) `{address}` is not HOST:PORT; write e.g. "
            "127.0.0.1:9100 (the metrics server binds exactly there: choose a loopback or "
            "private address)")
    return host.removeprefix("[").removesuffix("]"), port


def check_directory(path: str | None, option: str, what: str) -> None:
    """``UsageError`` unless ``path`` (if given) is an existing directory."""
    if path is not None and not os.path.isdir(path):
        raise UsageError(f"{option} `{path}` is not a directory; give {what}")


def check_output_file(path: str | None, option: str) -> None:
    """``UsageError`` unless the directory that will hold ``path`` exists and is writable
    (found now, not after the worker started)."""
    if path is None:
        return
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory) or not os.access(directory, os.W_OK):
        raise UsageError(f"{option} `{path}`: the directory `{directory}` does not exist or "
                         "this user cannot write it; create it or choose another path")


# -- served functions -------------------------------------------------------------------------


def add_import_paths(app_dir: str | None) -> None:
    """Put ``app_dir`` (if given) and then the current directory first on ``sys.path``, so
    that ``--function`` finds modules as ``python -m`` does (a console script's
    ``sys.path[0]`` is its own ``bin/`` directory, not the current one)."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    if app_dir is not None:
        directory = os.path.abspath(app_dir)
        if not os.path.isdir(directory):
            raise UsageError(f"--app-dir `{app_dir}` is not a directory; give the directory "
                             "that holds the module of --function")
        if directory in sys.path:
            sys.path.remove(directory)
        sys.path.insert(0, directory)


def split_function_spec(spec: str) -> tuple[str, str, str]:
    name, sep, target = spec.partition("=")
    if not sep:
        name, target = spec.rpartition(":")[2], spec
    module, colon, attr = target.partition(":")
    if not colon or not module or not attr or not name:
        raise UsageError(f"--function `{spec}` is not NAME=package.module:attr; write e.g. "
                         "--function mlp=torch_jax_interop.examples.mlp:apply")
    return name, module, attr


def check_function_specs(specs: list[str]) -> None:
    """Well-formed specs, no name twice, and each top-level module findable: what a
    launcher can check without importing anything (its workers import the targets)."""
    if not specs:
        raise UsageError("give at least one --function NAME=package.module:attr, e.g. "
                         "--function mlp=torch_jax_interop.examples.mlp:apply")
    seen: set[str] = set()
    for spec in specs:
        name, module, _attr = split_function_spec(spec)
        if name in seen:
            raise UsageError(f"--function names `{name}` twice; give each served function "
                             "its own NAME")
        seen.add(name)
        top = module.partition(".")[0]
        try:
            found = importlib.util.find_spec(top) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise _missing_module(spec, module, top)


def _missing_module(spec: str, module: str, missing: str) -> UsageError:
    return UsageError(
        f"--function `{spec}`: no module named `{missing}` in the current directory "
        f"({os.getcwd()}) or on the Python path; check the spelling, run from the directory "
        "that holds it, or give --app-dir DIR")


def load_functions(specs: list[str]) -> dict[str, Callable[..., Any]]:
    """Import every ``NAME=package.module:attr``; a ``UsageError`` naming the spec for a
    missing module or attribute, a module that fails to import, or a non-callable."""
    check_function_specs(specs)
    functions: dict[str, Callable[..., Any]] = {}
    for spec in specs:
        name, module_name, attr = split_function_spec(spec)
        try:
            obj: Any = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            missing = error.name or module_name
            if module_name == missing or module_name.startswith(f"{missing}."):
                raise _missing_module(spec, module_name, missing) from error
            raise UsageError(
                f"--function `{spec}`: importing `{module_name}` failed because it imports "
                f"`{missing}`, which is not installed; install it into this environment"
            ) from error
        except Exception as error:
            raise UsageError(
                f"--function `{spec}`: importing `{module_name}` raised "
                f"{type(error).__name__}: {error}; fix the module (--debug shows the "
                "traceback)") from error
        for part in attr.split("."):
            try:
                obj = getattr(obj, part)
            except AttributeError:
                candidates = sorted(n for n, v in vars(obj).items()
                                    if callable(v) and not n.startswith("_"))[:10]
                hint = (f"; it has {', '.join(candidates)}" if candidates else "")
                raise UsageError(
                    f"--function `{spec}`: `{module_name}` has no attribute `{attr}`{hint}; "
                    "check the name after the colon") from None
        if not callable(obj):
            raise UsageError(f"--function `{spec}`: `{module_name}:{attr}` is a "
                             f"{type(obj).__name__}, not a function; name a JAX function")
        functions[name] = obj
    return functions


# -- extras ---------------------------------------------------------------------------------


def require(command: str, extra: str, *modules: str) -> None:
    """``UsageError`` naming the extra to install when one of ``modules`` is not
    installed (checked without importing it)."""
    for module in modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise UsageError(
                f"`{command}` needs `{module.partition('.')[0]}`, which is not installed "
                f"here; install the {extra} extra: pip install 'torch-jax-interop[{extra}]'")
