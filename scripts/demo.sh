#!/usr/bin/env bash
# Sets up .venv and runs the main job: the local demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m torch_jax_interop.demo "$@"
