#!/usr/bin/env bash
# Sets up .venv and runs the checks CI runs: ruff, buf, mypy, the layer contracts, then the
# tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m ruff check .
# The protocol: Buf's lint and breaking-change check (buf.yaml says how to move the baseline).
BUF=(npx --yes @bufbuild/buf@1.75.0)
"${BUF[@]}" lint
"${BUF[@]}" breaking --against proto/baseline.binpb
.venv/bin/python -m mypy
.venv/bin/lint-imports --no-cache  # layer rules: pyproject.toml [tool.importlinter]
.venv/bin/python -m pytest "$@"
