#!/usr/bin/env bash
# Creates (or updates) .venv with everything the project, its tests, benchmarks and docs site need.
# torch comes from `torch==2.13.0`, the CPU wheel on this machine's disk; the project's
# extras only put lower bounds on torch, so pip never replaces it with a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade "pip>=25.1"
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[all,bench]" --group dev --group docs
