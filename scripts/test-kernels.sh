#!/usr/bin/env bash
# `make test-kernels`: the tracer on the kernels users run, each booted in a VM with this
# machine's root file system shared read-only (virtme-ng, QEMU without KVM: the host's
# paravirtual KVM cannot run a stock kernel). One boot per kernel runs everything inside it:
# `imdswatch doctor`, the tracer tests and the live agent in each probe mode
# (scripts/kernel-guest.sh). Prints one line per kernel with its time; exits 1 if any failed.
# About 10 minutes per kernel on an idle 2-core machine (BCC compiles under emulation).
#   scripts/test-kernels.sh [label...]   labels: 5.10 (Debian 11), 6.1 (Debian 12),
#                                         6.12 (bookworm-backports); default: all three
# Environment: KERNEL_JOBS (VMs at once, default 1), KERNEL_VM_CPUS (default 2),
# KERNEL_VM_MEMORY (default 3G), KERNEL_VM_TIMEOUT (seconds per VM, default 1500),
# MATRIX_DEADLINE (epoch seconds the whole matrix must end by: each VM gets at most what is
# left, and a kernel with no time left fails without booting; .ci/run sets it),
# IMDSWATCH_CACHE (default /var/cache/imdswatch), MATRIX_KEEP=1 keeps the VMs' outputs.
set -uo pipefail
cd "$(dirname "$0")/.."
log() { printf '[test-kernels] %s\n' "$*" >&2; }

CACHE=${IMDSWATCH_CACHE:-/var/cache/imdswatch}
VIRTME_NG_VERSION=1.42
JOBS=${KERNEL_JOBS:-1}
CPUS=${KERNEL_VM_CPUS:-2}
MEMORY=${KERNEL_VM_MEMORY:-3G}
VM_TIMEOUT=${KERNEL_VM_TIMEOUT:-1500}
labels=("$@")
[ "${#labels[@]}" -gt 0 ] || labels=(5.10 6.1 6.12)

[ "$(id -u)" -eq 0 ] || { log "needs root (BPF inside the VMs runs as the same user)"; exit 2; }

setup() {
  local missing=()
  for p in qemu-system-x86 busybox-static kmod; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    log "installing ${missing[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null || return 1
  fi
  # virtme-ng from PyPI in its own venv: Debian 12 does not package it.
  local venv="$CACHE/vng-venv"
  if ! "$venv/bin/vng" --version 2>/dev/null | grep -q "$VIRTME_NG_VERSION"; then
    log "installing virtme-ng $VIRTME_NG_VERSION into $venv"
    rm -rf "$venv" && python3 -m venv "$venv" \
      && "$venv/bin/pip" install -q "virtme-ng==$VIRTME_NG_VERSION" >/dev/null || return 1
  fi
  # vng runs its helpers (virtme-run) from PATH.
  export PATH="$venv/bin:$PATH"
}

# boot LABEL RELEASE ROOT: one VM, everything inside it; prints the kernel's line.
boot() {
  local label=$1 release=$2 root=$3 out t0 rc budget=$VM_TIMEOUT
  # The headers as one file, which the guest unpacks into its memory with one sequential
  # read over 9p instead of tens of thousands of small requests (kernel-guest.sh).
  local tarball
  tarball="$(dirname "$root")/headers-$release.tar"
  if [ ! -s "$tarball" ]; then
    (cd "$root/usr/src" && tar -cf "$tarball.tmp" linux-headers-*) && mv "$tarball.tmp" "$tarball" \
      || log "$label: could not pack the headers; the guest compiles from the share"
  fi
  out=$(mktemp -d "/tmp/imdswatch-matrix-$label.XXXXXX")
  t0=$(date +%s)
  if [ -n "${MATRIX_DEADLINE:-}" ]; then
    local left=$(( MATRIX_DEADLINE - t0 ))
    [ "$left" -lt "$budget" ] && budget=$left
    if [ "$budget" -lt 60 ]; then
      log "$label: FAIL, not booted: the matrix's deadline leaves ${budget}s"
      return 1
    fi
  fi
  # --rodir: the guest's /var/cache is a tmpfs, so the unpacked kernels are shared explicitly
  # (the VM's /lib/modules links into them). --rwdir: the one host directory it writes.
  timeout --kill-after=30 "$budget" vng --disable-kvm --run "$root/boot/vmlinuz-$release" \
    --cpus "$CPUS" --memory "$MEMORY" --name "imdswatch-$label" \
    --rodir="$CACHE/kernels" --rwdir="$out" \
    --exec "bash scripts/kernel-guest.sh $root $out" > "$out/vng.log" 2>&1 </dev/null
  rc=$?
  [ "$rc" -eq 124 ] && echo "the VM ran out of its ${budget}s" >> "$out/vng.log"
  python3 scripts/matrix_verdict.py "$label" "$out" "$(( $(date +%s) - t0 ))"
  rc=$?
  if [ "$rc" -ne 0 ] || [ -n "${MATRIX_KEEP:-}" ]; then
    log "$label: logs kept in $out (pytest-*.log, doctor.txt, vng.log)"
    if [ "$rc" -ne 0 ]; then
      for f in "$out"/pytest-*.log; do [ -f "$f" ] && tail -n 30 "$f" >&2; done
    fi
  else
    rm -rf "$out"
  fi
  return "$rc"
}

t_start=$(date +%s)
setup || { log "set-up failed"; exit 1; }
mapfile -t kernels < <(bash scripts/kernels-fetch.sh "${labels[@]}")
[ "${#kernels[@]}" -eq "${#labels[@]}" ] || { log "could not fetch every kernel"; exit 1; }
log "fetched in $(( $(date +%s) - t_start ))s; booting ${#kernels[@]} kernels, $JOBS at a time"

# Each kernel's status goes to a file: `wait -n` reaps jobs, so their statuses cannot be
# collected afterwards.
status_dir=$(mktemp -d /tmp/imdswatch-matrix-status.XXXXXX)
for k in "${kernels[@]}"; do
  read -r label release root <<< "$k"
  { boot "$label" "$release" "$root"; echo $? > "$status_dir/$label"; } &
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done
done
wait
failed=0
for l in "${labels[@]}"; do
  [ "$(cat "$status_dir/$l" 2>/dev/null)" = 0 ] || failed=$((failed + 1))
done
rm -rf "$status_dir"
log "$(( ${#kernels[@]} - failed ))/${#kernels[@]} kernels passed in $(( $(date +%s) - t_start ))s"
[ "$failed" -eq 0 ]
