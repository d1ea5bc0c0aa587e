#!/usr/bin/env bash
# Sets up .venv and runs the checks CI runs: ruff, mypy, the layer contracts, then the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m ruff check .
.venv/bin/python -m mypy
.venv/bin/lint-imports --no-cache  # layer rules: pyproject.toml [tool.importlinter]
.venv/bin/python -m pytest "$@"
