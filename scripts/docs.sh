#!/usr/bin/env bash
# Builds the documentation site into site/ with `mkdocs build --strict` (what CI checks, in
# tests/test_docs.py). Sets up .venv first (scripts/setup.sh installs the `docs` group) unless
# given --no-setup. Extra arguments go to mkdocs build; `.venv/bin/mkdocs serve` previews.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--no-setup" ]; then shift; else bash scripts/setup.sh; fi
export NO_MKDOCS_2_WARNING=1  # Material's banner about MkDocs 2, printed on every build
exec .venv/bin/mkdocs build --strict "$@"
