"""``torch_jax_interop.errors``: the whole hierarchy, public, drawn in its docstring."""

from __future__ import annotations

import inspect

import pytest

import torch_jax_interop
from torch_jax_interop import _errors, errors


def _classes() -> dict[str, type]:
    return {
        name: value for name, value in vars(_errors).items()
        if inspect.isclass(value) and issubclass(value, errors.InteropError)
    }


def test_every_error_is_public_and_in_the_tree() -> None:
    classes = _classes()
    assert set(errors.__all__) == set(classes)
    doc = errors.__doc__ or ""
    for name, cls in classes.items():
        assert getattr(errors, name) is cls
        assert f" {name}" in doc, f"{name} is missing from the tree in errors' docstring"


def test_tree_in_the_docstring_matches_the_classes() -> None:
    """Each class is drawn under its parent (indentation = depth below InteropError)."""
    drawn_parent: dict[str, str | None] = {}
    last_at_level: dict[int, str] = {}
    base_indent = None
    for line in (errors.__doc__ or "").splitlines():
        stripped = line.lstrip(" │├└─")
        name = stripped.split(" ", 1)[0]
        if name not in errors.__all__:
            continue
        indent = len(line) - len(stripped)
        base_indent = indent if base_indent is None else base_indent
        level = (indent - base_indent) // 4
        drawn_parent[name] = last_at_level.get(level - 1) if level else None
        last_at_level[level] = name
    for name in errors.__all__:
        cls = getattr(errors, name)
        parents = [b.__name__ for b in cls.__bases__ if issubclass(b, errors.InteropError)]
        assert drawn_parent[name] == (parents[0] if parents else None), (
            f"{name} is drawn under {drawn_parent[name]}, but derives from {parents}"
        )


@pytest.mark.parametrize("name", ["TransportError", "DoubleBackwardError",
                                  "RemoteExecutionError", "CopyRequiredError"])
def test_documented_errors_import_from_the_public_module(name: str) -> None:
    assert issubclass(getattr(errors, name), errors.InteropError)


def test_remote_execution_error_is_a_remote_error() -> None:
    assert issubclass(errors.RemoteExecutionError, errors.RemoteError)


def test_top_level_re_exports_are_the_same_classes() -> None:
    for name in ("ConversionError", "CopyRequiredError", "IntegerOverflowError",
                 "InteropError", "UnsupportedTensorError"):
        assert getattr(torch_jax_interop, name) is getattr(errors, name)


def test_builtin_bases_still_catch() -> None:
    with pytest.raises(OverflowError):
        raise errors.IntegerOverflowError("x")
    with pytest.raises(ConnectionError):
        raise errors.WorkerUnavailableError("x")
