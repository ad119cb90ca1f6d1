#!/usr/bin/env bash
# BCC compiles its programs against /lib/modules/$(uname -r)/build. Hosts that ship their
# kernel's headers already have it; kernels without a headers package (cloud VMs with a custom
# kernel) get Debian's newest cloud headers linked in, which is enough for tracepoints, whose
# layout BCC reads from tracefs rather than from the headers. Real headers are never replaced.
set -euo pipefail
log() { printf '[kernel-headers] %s\n' "$*" >&2; }

K=$(uname -r)
MOD=/lib/modules/$K
if [ -e "$MOD/build/include/linux/kconfig.h" ] || [ -e "$MOD/build/Makefile" ]; then
  log "headers present at $MOD/build"
  exit 0
fi
# BCC can also use the kernel's built-in header archive.
if [ -e /sys/kernel/kheaders.tar.xz ]; then
  log "kernel provides /sys/kernel/kheaders.tar.xz; BCC will use it"
  exit 0
fi

newest_installed() { ls -d /usr/src/linux-headers-*-cloud-amd64 2>/dev/null | sort -V | tail -1 || true; }
pkg=$(newest_installed)
if [ -z "$pkg" ]; then
  apt-get update -qq
  # A versioned package (linux-headers-6.12.117+deb12-cloud-amd64), not the meta-package.
  name=$(apt-cache search --names-only '^linux-headers-[0-9]+\.[0-9]+\.[0-9].*-cloud-amd64$' \
         | awk '{print $1}' | sort -V | tail -1)
  [ -n "$name" ] || { log "no linux-headers-*-cloud-amd64 package found"; exit 1; }
  log "installing $name"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$name" >/dev/null
  pkg=$(newest_installed)
  [ -n "$pkg" ] || { log "$name installed no /usr/src/linux-headers-*-cloud-amd64"; exit 1; }
fi
common=$(ls -d "${pkg%-cloud-amd64}-common" 2>/dev/null || true)
mkdir -p "$MOD"
# Only fill in what is missing: a dangling or absent link, never a real directory.
if [ ! -e "$MOD/build" ]; then
  ln -sfn "$pkg" "$MOD/build"
  log "linked $MOD/build -> $pkg"
fi
if [ -n "$common" ] && [ ! -e "$MOD/source" ]; then
  ln -sfn "$common" "$MOD/source"
  log "linked $MOD/source -> $common"
fi
