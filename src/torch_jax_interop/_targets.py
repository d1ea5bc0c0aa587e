"""Served functions: ``NAME=package.module:attr`` specs, and how a worker (or
``connect("inproc")``) describes what it serves. Imports no framework (a target may)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class FunctionInfo:
    """A function a worker serves (what ``worker.functions()`` lists)."""

    name: str
    signature: str
    doc: str
    target: str


def load_function(spec: str) -> tuple[str, Callable[..., Any], str]:
    """Parse ``name=package.module:attr`` (or ``package.module:attr``) and import it.

    Returns ``(name, function, "package.module:attr")``. Raises ``ValueError`` for a
    malformed spec or a target that is not callable, and the import's own error when the
    module or attribute does not exist.
    """
    name, sep, target = spec.partition("=")
    if not sep:
        name, target = spec.rpartition(":")[2], spec
    module_name, colon, attr = target.partition(":")
    if not colon or not module_name or not attr or not name:
        raise ValueError(
            f"bad function spec `{spec}`; expected NAME=package.module:attr, e.g. "
            "mlp=torch_jax_interop.examples.mlp:apply"
        )
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"`{target}` is not callable")
    return name, obj, target
