#!/usr/bin/env bash
# The base image of `make test-image`, made without a registry: a minimal Debian bookworm
# (debootstrap --variant=minbase) imported into podman as $IMAGE_BASE. The root file system's
# tarball is cached, so a rerun on the same machine only re-imports it when podman lost it.
#   scripts/image-base.sh        prints the image name on stdout
set -euo pipefail
log() { printf '[image-base] %s\n' "$*" >&2; }

CACHE=${IMDSWATCH_CACHE:-/var/cache/imdswatch}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
IMAGE_BASE=${IMAGE_BASE:-localhost/imdswatch-base:bookworm}
TAR="$CACHE/image/debian-bookworm-minbase.tar"

if podman image exists "$IMAGE_BASE"; then
  echo "$IMAGE_BASE"; exit 0
fi
if [ ! -s "$TAR" ]; then
  mkdir -p "$CACHE/image"
  rootfs=$(mktemp -d "$CACHE/image/rootfs.XXXXXX")
  trap 'rm -rf "$rootfs"' EXIT
  log "debootstrap bookworm (minbase) from $MIRROR"
  debootstrap --variant=minbase bookworm "$rootfs" "$MIRROR" >/dev/null
  # The suites an official debian:bookworm image lists, so security updates install.
  rm -f "$rootfs/etc/apt/sources.list"
  cat > "$rootfs/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $MIRROR
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $SECURITY
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  # What a container base does not carry: package caches and lists, logs, machine identity.
  rm -rf "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
         "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/*.log "$rootfs"/var/log/apt/*
  : > "$rootfs/etc/machine-id"
  tar --numeric-owner -C "$rootfs" -cf "$TAR.new" .
  mv "$TAR.new" "$TAR"
fi
log "importing $TAR as $IMAGE_BASE"
podman import --change 'CMD ["bash"]' "$TAR" "$IMAGE_BASE" >/dev/null
echo "$IMAGE_BASE"
