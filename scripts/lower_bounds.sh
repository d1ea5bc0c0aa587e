#!/usr/bin/env bash
# Tests the declared lower bounds: a separate venv (.cache/lower-bounds-venv) gets exactly the
# lowest versions pyproject.toml allows of jax/jaxlib, grpcio, grpcio-health-checking,
# protobuf and numpy (`==` on each bound, read from pyproject.toml, never typed here), the
# torch 2.13.0 CPU wheel, pytest, and the project with --no-deps; then the generated protobuf
# code is imported and the library- and service-mode smoke tests run. A failure means a bound
# in pyproject.toml is false: raise it to the lowest version that passes.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=.cache/lower-bounds-venv
PIP=(-m pip install -q --disable-pip-version-check)

# "name==bound" for each package named here, from the extras and dependencies of pyproject.toml
mapfile -t PINS < <("$PYTHON" - <<'EOF'
import re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
requirements = list(project["dependencies"])
for extra in project["optional-dependencies"].values():
    requirements += extra
wanted = ("jax", "grpcio", "grpcio-health-checking", "protobuf", "numpy")
bounds = {}
for requirement in requirements:
    match = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", requirement)
    if match and match[1] in wanted:
        assert bounds.setdefault(match[1], match[2]) == match[2], f"two bounds for {match[1]}"
missing = set(wanted) - set(bounds)
assert not missing, f"pyproject.toml declares no `>=` bound for {sorted(missing)}"
bounds["jaxlib"] = bounds["jax"]  # jax and jaxlib are released together
for name, bound in sorted(bounds.items()):
    print(f"{name}=={bound}")
EOF
)
# pytest and its plugin at the versions of the dev group
mapfile -t TOOLS < <("$PYTHON" -c '
import tomllib
dev = tomllib.load(open("pyproject.toml", "rb"))["dependency-groups"]["dev"]
print("\n".join(r for r in dev if r.split("==")[0] in ("pytest", "pytest-timeout")))')

echo "lower bounds: ${PINS[*]}"
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" "${PIP[@]}" --upgrade "pip>=25.1"
"$VENV/bin/python" "${PIP[@]}" "torch==2.13.0" "${PINS[@]}" "${TOOLS[@]}"
"$VENV/bin/python" "${PIP[@]}" --no-deps -e .
"$VENV/bin/python" -m pip check
"$VENV/bin/python" -m pip list --format=freeze | grep -iE '^(jax|jaxlib|grpcio|grpcio-health-checking|protobuf|numpy|torch)=='

# The checked-in generated code imports with the lowest protobuf and grpcio.
"$VENV/bin/python" -c '
import google.protobuf, grpc
from torch_jax_interop.proto.v1 import interop_pb2, interop_pb2_grpc
request = interop_pb2.CallRequest(function="f")
assert interop_pb2.CallRequest.FromString(request.SerializeToString()).function == "f"
print(f"generated code imports with protobuf {google.protobuf.__version__}, grpcio {grpc.__version__}")'

# Smoke tests: library mode (conversions, WrappedJaxFunction, torch_module_to_jax) and service
# mode (real workers: calls and training through them). -p no:cacheprovider: no .pytest_cache.
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider -o addopts="-ra --strict-markers" \
  tests/interop_core/test_convert.py tests/interop_core/test_wrapped.py \
  tests/interop_core/test_torch_module.py tests/client/test_calls.py \
  tests/client/test_remote_autograd.py "$@"
