"""Counts behind the Reliability page's table, written by the reliability tests.

Each test module records its figures under its own key in ``.cache/reliability.json`` (at the
repository root, git-ignored), together with the command line that produced them. The docs
site renders its table from that file (``scripts/docs_tables.py``; the committed snapshot
``docs/data/reliability.json`` when the last run lacks a section), so a key renamed here must
be renamed there.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

PATH = Path(__file__).resolve().parents[2] / ".cache" / "reliability.json"


def _command() -> str:
    if sys.argv and sys.argv[0].endswith(("pytest", os.path.join("pytest", "__main__.py"))):
        return " ".join(["python -m pytest", *sys.argv[1:]])
    return " ".join(["python", *sys.argv])


def record(section: str, **counts: Any) -> None:
    """Merge ``counts`` into the JSON file under ``section`` (replacing the old entry)."""
    PATH.parent.mkdir(parents=True, exist_ok=True)
    try:
        data = json.loads(PATH.read_text())
    except (FileNotFoundError, ValueError):
        data = {}
    data[section] = {
        **counts,
        "command": _command(),
        "recorded": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    tmp = PATH.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, PATH)
