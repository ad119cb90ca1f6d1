#!/usr/bin/env bash
# Downloads and unpacks the Debian kernels of the matrix (`make test-kernels`), each with its
# headers and kbuild, into $IMDSWATCH_CACHE/kernels/<label>/root. Nothing is installed on the
# host: every kernel has its own apt source list and state (the host's apt is left alone), and
# the packages are unpacked with dpkg-deb -x, never into /boot. Cached: a rerun downloads only
# when the archive has a newer build (the archive keeps only the newest one).
#   scripts/kernels-fetch.sh [label...]     labels: 5.10 6.1 6.12 (default: all)
# Prints "<label> <kernel release> <root>" per kernel on stdout.
set -euo pipefail
log() { printf '[kernels-fetch] %s\n' "$*" >&2; }

CACHE=${IMDSWATCH_CACHE:-/var/cache/imdswatch}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
# How old (seconds) the package lists may be before a rerun refreshes them.
LISTS_MAX_AGE=${KERNEL_LISTS_MAX_AGE:-86400}

# label -> the suites whose linux-image-amd64 metapackage names the kernel.
suites() {
  case "$1" in
    5.10) echo "$MIRROR bullseye main|$SECURITY bullseye-security main" ;;
    6.1)  echo "$MIRROR bookworm main|$SECURITY bookworm-security main" ;;
    6.12) echo "$MIRROR bookworm-backports main" ;;
    *) log "unknown kernel label $1 (known: 5.10 6.1 6.12)"; return 1 ;;
  esac
}

apt_opts() {
  local d=$1
  printf '%s\n' -o "Dir::Etc::SourceList=$d/sources.list" -o "Dir::Etc::SourceParts=$d/none" \
    -o "Dir::Etc::Preferences=$d/none" -o "Dir::Etc::PreferencesParts=$d/none" \
    -o "Dir::State=$d/state" -o "Dir::State::Status=$d/state/status" \
    -o "Dir::Cache=$d/cache" -o "APT::Architecture=amd64" -o "APT::Architectures::=amd64" \
    -o "Debug::NoLocking=1" -o "APT::Sandbox::User=root" -o "APT::Get::List-Cleanup=0"
}

fetch() {
  local label=$1 dir="$CACHE/kernels/$1" apt="$CACHE/apt/$1"
  mkdir -p "$apt/state/lists/partial" "$apt/cache/archives/partial" "$apt/none" "$dir/debs"
  : > "$apt/sources.list.new"
  local IFS_OLD=$IFS; IFS='|'
  for s in $(suites "$label"); do
    echo "deb [signed-by=$KEYRING] $s" >> "$apt/sources.list.new"
  done
  IFS=$IFS_OLD
  mv "$apt/sources.list.new" "$apt/sources.list"
  touch "$apt/state/status"
  local opts; mapfile -t opts < <(apt_opts "$apt")

  local stamp="$apt/state/updated" now; now=$(date +%s)
  if [ ! -e "$stamp" ] || [ $((now - $(stat -c %Y "$stamp"))) -gt "$LISTS_MAX_AGE" ]; then
    if apt-get "${opts[@]}" -qq update >&2; then
      touch "$stamp"
    elif [ -e "$dir/release" ]; then
      log "$label: apt-get update failed; using the cached $(cat "$dir/release")"
      echo "$label $(cat "$dir/release") $dir/root"; return 0
    else
      log "$label: apt-get update failed and nothing is cached"; return 1
    fi
  fi
  # linux-image-amd64 -> linux-image-6.1.0-41-amd64; the generic flavour's unsigned build
  # has the same modules (9p, virtio) and is the one that can boot from a plain vmlinuz.
  local image release
  image=$(apt-cache "${opts[@]}" depends linux-image-amd64 \
          | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
  [ -n "$image" ] || { log "$label: linux-image-amd64 names no kernel"; return 1; }
  release=${image#linux-image-}
  if [ -e "$dir/release" ] && [ "$(cat "$dir/release")" = "$release" ] && [ -e "$dir/root/.done" ]; then
    log "$label: $release cached"
    echo "$label $release $dir/root"; return 0
  fi
  # The headers package pulls the common headers and the kbuild tools it was built with.
  local pkgs=("linux-image-$release-unsigned" "linux-headers-$release")
  mapfile -t -O 2 pkgs < <(apt-cache "${opts[@]}" depends "linux-headers-$release" \
          | awk '/Depends: linux-(headers|kbuild)-/ {print $2}' | sort -u)
  log "$label: downloading ${pkgs[*]}"
  rm -rf "$dir/debs.new" "$dir/root.new"
  mkdir -p "$dir/debs.new" "$dir/root.new"
  (cd "$dir/debs.new" && apt-get "${opts[@]}" -qq download "${pkgs[@]}" >&2)
  for deb in "$dir"/debs.new/*.deb; do dpkg-deb -x "$deb" "$dir/root.new"; done
  [ -n "$(ls "$dir"/root.new/boot/vmlinuz-* 2>/dev/null)" ] || { log "$label: no vmlinuz"; return 1; }
  # The package's postinst would build the module index: without it the VM cannot modprobe
  # (netfilter's NAT for the DNAT tests, for one).
  depmod -b "$dir/root.new" "$release"
  touch "$dir/root.new/.done"
  rm -rf "$dir/debs" "$dir/root"
  mv "$dir/debs.new" "$dir/debs"; mv "$dir/root.new" "$dir/root"
  echo "$release" > "$dir/release"
  log "$label: $release unpacked in $dir/root"
  echo "$label $release $dir/root"
}

labels=("$@")
[ "${#labels[@]}" -gt 0 ] || labels=(5.10 6.1 6.12)
for l in "${labels[@]}"; do fetch "$l"; done
