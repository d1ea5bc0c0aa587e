#!/usr/bin/env bash
# Builds both images and runs the compose file's `cpu` profile end to end, on a machine with
# root and no container registry (docs/deployment.md, "Building without a registry"):
#
#   1. installs docker.io, docker-compose and debootstrap with apt-get where missing, and
#      starts dockerd in the background if no engine answers (and stops it at the end);
#   2. builds the stand-in base image (scripts/docker_base.sh) unless it exists;
#   3. serves the CPU torch wheel named by pip's configuration (`pip config list`, find-links)
#      on 127.0.0.1 and builds both images with BuildKit, `--network host` and the host's CA
#      bundle as the `pip-ca` build secret, tagged as compose.yaml names them;
#   4. checks the worker image's own HEALTHCHECK turns healthy and SIGTERM stops it with 0;
#   5. `docker-compose --profile cpu up`: waits for the trainer, checks it exited 0 with every
#      rank on shared memory and that no region is left in the shared /dev/shm, stops the
#      workers (exit 0), and compares the trainer's saved parameters with the same training
#      in one process (`python -m torch_jax_interop.demo.ddp --compare`, run by $PYTHON,
#      which needs torch and JAX: the repository's .venv by default);
#   6. removes every container, volume and network it made, whatever happened (trap).
#
# Prints the time of each phase and the image sizes. Exit 0 only when every check passed.
# Variables: PYTHON, TJI_BASE_IMAGE (the stand-in's tag), TJI_RANKS (2, as in compose.yaml),
# TJI_WHEEL_PORT (38587: where the wheel is served).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

BASE_IMAGE=${TJI_BASE_IMAGE:-tji-stand-in/python:3.11-slim-bookworm}
# compose.yaml's `image:` of the cpu pair (tests/docker/test_images.py checks they agree).
WORKER_IMAGE=torch-jax-interop-worker:cpu
TRAINER_IMAGE=torch-jax-interop-trainer:cpu
TORCH_VERSION=$(sed -n 's/^ARG TORCH_VERSION=//p' docker/Dockerfile.trainer)
CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
PROJECT=tji-e2e-$$
COMPOSE=(docker-compose -f docker/compose.yaml -p "$PROJECT" --profile cpu)
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

log() { printf '[docker_e2e %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
fail() { printf 'docker_e2e: error: %s\n' "$*" >&2; exit 1; }
timed() {  # timed LABEL command...: runs it, logs its wall time
  local label=$1 start=$SECONDS; shift
  "$@"
  log "$label: $((SECONDS - start)) s"
}

if [ "$(id -u)" != 0 ]; then
  echo "docker_e2e: error: needs root (apt-get, dockerd, debootstrap); run it with sudo" >&2
  exit 2
fi

# --- 1. tools and engine ---------------------------------------------------------------------
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v docker-compose >/dev/null || missing+=(docker-compose)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
  log "apt-get install ${missing[*]}"
  timed "apt-get install" bash -c "apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq ${missing[*]} >/dev/null"
fi
# BuildKit (cache mounts, secrets): through buildx where the client has it, else through the
# engine's built-in BuildKit, which Debian's docker.io client (20.10, no buildx) drives.
DOCKER=docker
if ! docker buildx version >/dev/null 2>&1; then
  [ -x /usr/bin/docker ] && ! /usr/bin/docker buildx version >/dev/null 2>&1 \
    && DOCKER=/usr/bin/docker
fi
export DOCKER DOCKER_BUILDKIT=1

work=$(mktemp -d /tmp/tji-e2e.XXXXXX)
dockerd_pid="" http_pid="" health_container=""
cleanup() {
  local code=$?
  set +e
  [ -n "$health_container" ] && "$DOCKER" rm -f "$health_container" >/dev/null 2>&1
  if [ -n "$dockerd_pid" ] || "$DOCKER" info >/dev/null 2>&1; then
    "${COMPOSE[@]}" down --volumes --remove-orphans --timeout 40 >/dev/null 2>&1
    left=$("$DOCKER" ps -aq --filter "label=com.docker.compose.project=$PROJECT")
    left+=$("$DOCKER" volume ls -q --filter "label=com.docker.compose.project=$PROJECT")
    left+=$("$DOCKER" network ls -q --filter "label=com.docker.compose.project=$PROJECT")
    if [ -n "$left" ]; then
      echo "docker_e2e: error: left behind by project $PROJECT: $left" >&2
      code=1
    fi
  fi
  [ -n "$http_pid" ] && kill "$http_pid" 2>/dev/null && wait "$http_pid" 2>/dev/null
  if [ -n "$dockerd_pid" ]; then
    log "stopping the dockerd this script started (pid $dockerd_pid)"
    kill "$dockerd_pid" 2>/dev/null
    for _ in $(seq 60); do kill -0 "$dockerd_pid" 2>/dev/null || break; sleep 1; done
  fi
  rm -rf "$work"
  exit "$code"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if ! "$DOCKER" info >/dev/null 2>&1; then
  log "starting dockerd"
  dockerd >"$work/dockerd.log" 2>&1 &
  dockerd_pid=$!
  for _ in $(seq 60); do "$DOCKER" info >/dev/null 2>&1 && break; sleep 1; done
  "$DOCKER" info >/dev/null 2>&1 || { tail -n 20 "$work/dockerd.log" >&2; fail "dockerd did not start"; }
fi

# --- 2. base image ---------------------------------------------------------------------------
timed "base image $BASE_IMAGE" bash scripts/docker_base.sh "$BASE_IMAGE"

# --- 3. images -------------------------------------------------------------------------------
# The folder pip's configuration names (find-links) that holds the CPU torch wheel.
wheel_dir=""
for dir in ${PIP_FIND_LINKS:-} $(python3 -m pip config list 2>/dev/null \
    | sed -n "s/^[^=]*find-links='\(.*\)'$/\1/p"); do
  if compgen -G "$dir/torch-${TORCH_VERSION}+cpu-cp311-*.whl" >/dev/null; then
    wheel_dir=$dir; break
  fi
done
build_args=(--network host --build-arg "BASE_IMAGE=$BASE_IMAGE")
[ -s "$CA_BUNDLE" ] && build_args+=(--secret "id=pip-ca,src=$CA_BUNDLE")
torch_args=()
if [ -n "$wheel_dir" ]; then
  # A fixed port where it is free: the URL is a build argument, so a new port each run
  # would rebuild the dependency layer.
  port=${TJI_WHEEL_PORT:-38587}
  python3 -c "import socket; socket.create_server(('127.0.0.1', $port))" 2>/dev/null || port=0
  python3 -u -m http.server --bind 127.0.0.1 --directory "$wheel_dir" "$port" \
    >"$work/http.log" 2>&1 &
  http_pid=$!
  for _ in $(seq 50); do grep -q "port" "$work/http.log" && break; sleep 0.1; done
  port=$(sed -n 's/.* port \([0-9]*\) .*/\1/p' "$work/http.log" | head -n 1)
  [ -n "$port" ] || fail "the wheel server did not start: $(cat "$work/http.log")"
  torch_args=(--build-arg "TORCH_FIND_LINKS=http://127.0.0.1:$port/")
  log "torch $TORCH_VERSION from $wheel_dir, served on 127.0.0.1:$port"
else
  log "no torch-$TORCH_VERSION+cpu cp311 wheel in pip's find-links: from the PyTorch index"
fi
build() {  # build IMAGE DOCKERFILE [ARGS...]: builds, logs its wall time, or shows the log
  local image=$1 dockerfile=$2 start=$SECONDS; shift 2
  "$DOCKER" build "${build_args[@]}" "$@" -f "$dockerfile" -t "$image" . \
    >"$work/build.log" 2>&1 || { tail -n 40 "$work/build.log" >&2; fail "building $image failed"; }
  log "build $image: $((SECONDS - start)) s"
}
build "$WORKER_IMAGE" docker/Dockerfile.worker
build "$TRAINER_IMAGE" docker/Dockerfile.trainer "${torch_args[@]}"
for image in "$BASE_IMAGE" "$WORKER_IMAGE" "$TRAINER_IMAGE"; do
  log "size of $image: $("$DOCKER" image inspect -f '{{.Size}}' "$image" \
    | awk '{printf "%.0f MB", $1 / 1e6}')"
done

# --- 4. the worker image's own HEALTHCHECK and default command -------------------------------
health_container=$PROJECT-health
"$DOCKER" run -d --name "$health_container" "$WORKER_IMAGE" >/dev/null
start=$SECONDS status=""
while [ $((SECONDS - start)) -lt 180 ]; do
  status=$("$DOCKER" inspect -f '{{.State.Health.Status}}' "$health_container")
  [ "$status" = healthy ] && break
  [ "$("$DOCKER" inspect -f '{{.State.Running}}' "$health_container")" = true ] || break
  sleep 2
done
[ "$status" = healthy ] || { "$DOCKER" logs "$health_container" >&2; fail "the worker image's HEALTHCHECK says '$status'"; }
log "worker image HEALTHCHECK: healthy after $((SECONDS - start)) s"
"$DOCKER" stop -t 40 "$health_container" >/dev/null
code=$("$DOCKER" inspect -f '{{.State.ExitCode}}' "$health_container")
[ "$code" = 0 ] || { "$DOCKER" logs "$health_container" >&2; fail "the worker exited with $code on SIGTERM"; }
"$DOCKER" rm "$health_container" >/dev/null
health_container=""

# --- 5. docker-compose --profile cpu up ------------------------------------------------------
start=$SECONDS
"${COMPOSE[@]}" up --no-build --detach >"$work/up.log" 2>&1 \
  || { cat "$work/up.log" >&2; "${COMPOSE[@]}" logs --no-color >&2; fail "docker-compose up failed"; }
trainer=$("$DOCKER" ps -aq --filter "label=com.docker.compose.project=$PROJECT" \
  --filter "label=com.docker.compose.service=torch-trainer")
worker=$("$DOCKER" ps -aq --filter "label=com.docker.compose.project=$PROJECT" \
  --filter "label=com.docker.compose.service=jax-worker")
if [ -z "$trainer" ] || [ -z "$worker" ]; then
  fail "docker-compose up started no trainer or no worker"
fi
services=$("$DOCKER" ps -a --filter "label=com.docker.compose.project=$PROJECT" \
  --format '{{.Label "com.docker.compose.service"}}' | sort | tr '\n' ' ')
[ "$services" = "jax-worker torch-trainer " ] \
  || fail "--profile cpu up started '$services', not only the cpu pair"
code=$(timeout 900 "$DOCKER" wait "$trainer") || fail "the trainer did not finish in 900 s"
"${COMPOSE[@]}" logs --no-color torch-trainer >"$work/trainer.log" 2>&1
cat "$work/trainer.log"
log "docker-compose up: trainer exited with $code after $((SECONDS - start)) s (healthcheck wait included)"
[ "$code" = 0 ] || { "${COMPOSE[@]}" logs --no-color jax-worker >&2; fail "the trainer exited with $code"; }
ranks=$(grep -c "transport: shared memory" "$work/trainer.log" || true)
[ "$ranks" = "${TJI_RANKS:-2}" ] || fail "$ranks of ${TJI_RANKS:-2} ranks used shared memory"

# The trainer's ranks made their regions in the worker's /dev/shm (one IPC namespace).
left=$("$DOCKER" exec "$worker" sh -c 'ls -A /dev/shm' | grep '^tji-' || true)
[ -z "$left" ] || fail "shared-memory regions left in the containers' /dev/shm: $left"
"$DOCKER" cp "$trainer:/run/torch-jax-interop/ddp-result.pt" "$work/ddp-result.pt"
"${COMPOSE[@]}" stop --timeout 40 >/dev/null 2>&1
code=$("$DOCKER" inspect -f '{{.State.ExitCode}}' "$worker")
[ "$code" = 0 ] || { "${COMPOSE[@]}" logs --no-color jax-worker >&2; fail "the workers exited with $code on SIGTERM"; }
log "workers stopped with exit code 0"

PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m torch_jax_interop.demo.ddp \
  --compare "$work/ddp-result.pt" \
  || fail "the trainer's parameters differ from in-process training (or $PYTHON lacks torch/JAX: set PYTHON)"
log "end to end: passed"
