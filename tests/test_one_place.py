"""Facts the package defines once (README, house style "One place for each fact"): private
framework APIs only behind ``_compat``, framework dtype lookups only in ``_dtypes_torch`` /
``_dtypes_jax``, transport names only in ``_names`` (and every user-facing list agrees)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import torch_jax_interop
from torch_jax_interop._names import TRANSPORTS

PACKAGE = Path(torch_jax_interop.__file__).resolve().parent
README = PACKAGE.parents[1] / "README.md"


def _sources() -> list[tuple[str, ast.Module]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative.startswith("proto/"):
            continue  # generated code
        out.append((relative, ast.parse(path.read_text(), filename=str(path))))
    return out


def _private_framework_uses(tree: ast.Module) -> list[str]:
    """``torch._x`` / ``jax._x`` attributes, imports of ``jax._src`` / ``jaxlib`` /
    ``torch._x``, and ``getattr(torch, "_x")``."""
    found = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in ("torch", "jax") and node.attr.startswith("_")):
            found.append(f"line {node.lineno}: {node.value.id}.{node.attr}")
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                     else [alias.name for alias in node.names])
            for name in names:
                parts = name.split(".")
                if (parts[0] == "jaxlib" or name.startswith("jax._src")
                        or (parts[0] in ("torch", "jax") and len(parts) > 1
                            and parts[1].startswith("_"))):
                    found.append(f"line {node.lineno}: import {name}")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id == "getattr" and len(node.args) >= 2
              and isinstance(node.args[0], ast.Name) and node.args[0].id in ("torch", "jax")
              and isinstance(node.args[1], ast.Constant)
              and str(node.args[1].value).startswith("_")):
            found.append(f"line {node.lineno}: getattr({node.args[0].id}, {node.args[1].value!r})")
    return found


def test_private_framework_apis_only_in_compat() -> None:
    offenders = {
        relative: uses
        for relative, tree in _sources()
        if not relative.startswith("_compat/") and (uses := _private_framework_uses(tree))
    }
    assert not offenders, (
        "private jax/jaxlib/torch APIs outside torch_jax_interop._compat (put each behind "
        f"_compat/_jax.py or _compat/_torch.py with a public fallback): {offenders}"
    )


def test_the_checker_sees_private_uses() -> None:
    tree = ast.parse("import torch\nfrom jax._src import config\nx = torch._C\n"
                     "y = getattr(torch, '_disable_dynamo')\nimport jaxlib\n")
    assert len(_private_framework_uses(tree)) == 4


def test_framework_dtype_lookups_are_derived_in_one_place_per_framework() -> None:
    """``getattr(torch, name)`` / ``getattr(jnp, name)`` build dtype tables: only in the one
    module per framework, from the table in ``_dtypes``."""
    allowed = {"_dtypes_torch.py": "torch", "_dtypes_jax.py": "jnp"}
    offenders = []
    for relative, tree in _sources():
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id == "getattr" and node.args
                    and isinstance(node.args[0], ast.Name)
                    and node.args[0].id in ("torch", "jnp", "np", "numpy", "jax")
                    and not isinstance(node.args[1], ast.Constant)
                    and allowed.get(relative) != node.args[0].id):
                offenders.append(f"{relative}:{node.lineno}")
    assert not offenders, f"dtype lookups built outside _dtypes_torch/_dtypes_jax: {offenders}"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_every_transport_name_is_accepted_and_documented(transport: str) -> None:
    from torch_jax_interop.cli import build_parser
    from torch_jax_interop.client import connect

    for command in (["train", "--address", "unix:///x"], ["demo"]):
        args = build_parser().parse_args([*command, "--transport", transport])
        assert args.transport == transport
    assert f'"{transport}"' in (connect.__doc__ or ""), f"connect() does not document {transport}"
    assert f'"{transport}"' in README.read_text(), f"README does not name {transport}"


def test_an_unknown_transport_is_refused_everywhere() -> None:
    from torch_jax_interop._names import check_transport
    from torch_jax_interop.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--transport", "tcp"])
    with pytest.raises(ValueError, match="transport must be one of 'auto', 'cuda_ipc'.*'tcp'"):
        check_transport("tcp")
