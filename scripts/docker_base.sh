#!/usr/bin/env bash
# Builds a local stand-in for the images' base, python:3.11-slim-bookworm, where no container
# registry can be reached: a minimal Debian bookworm (debootstrap --variant=minbase, the
# variant Debian's own images are made with) holding Debian's python3.11, python3-venv and
# ca-certificates, imported as an image. The Dockerfiles take it through their BASE_IMAGE
# build argument (docs/deployment.md, "Building without a registry").
#
#   sudo scripts/docker_base.sh [TAG]        # TAG: tji-stand-in/python:3.11-slim-bookworm
#
# Needs root (debootstrap, chroot) and a running Docker engine; installs debootstrap with
# apt-get when it is missing. DEBIAN_MIRROR overrides the mirror (deb.debian.org).
# An image already under TAG is kept unless REBUILD=1.
set -euo pipefail

TAG=${1:-tji-stand-in/python:3.11-slim-bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
DOCKER=${DOCKER:-docker}

if [ "$(id -u)" != 0 ]; then
  echo "error: $0 needs root (debootstrap and chroot); run it with sudo" >&2
  exit 2
fi
if [ "${REBUILD:-0}" != 1 ] && "$DOCKER" image inspect "$TAG" >/dev/null 2>&1; then
  echo "base image $TAG exists (REBUILD=1 rebuilds it)"
  exit 0
fi
if ! command -v debootstrap >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
fi

rootfs=$(mktemp -d /var/tmp/tji-rootfs.XXXXXX)
trap 'rm -rf --one-file-system "$rootfs"' EXIT

# passwd: `useradd` for the images' non-root user (python:*-slim has it too).
debootstrap --variant=minbase --include=python3.11,python3-venv,ca-certificates,passwd \
  bookworm "$rootfs" "$MIRROR" >"$rootfs.log" 2>&1 || {
    tail -n 30 "$rootfs.log" >&2; rm -f "$rootfs.log"
    echo "error: debootstrap failed (mirror $MIRROR; DEBIAN_MIRROR picks another)" >&2
    exit 1
  }
rm -f "$rootfs.log"
# What an image needs no more of: package lists and downloaded .debs.
chroot "$rootfs" apt-get clean
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin

# The same environment python:3.11-slim sets.
tar --numeric-owner -C "$rootfs" -c . | "$DOCKER" import \
  --change 'ENV LANG=C.UTF-8' \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'CMD ["python3"]' \
  - "$TAG" >/dev/null
echo "built $TAG: $("$DOCKER" run --rm "$TAG" python3 --version)"
