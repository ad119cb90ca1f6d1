#!/usr/bin/env bash
# Installs what imdswatch needs on a Debian 12 host and builds .venv.
# Idempotent: every step checks before it changes anything.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[setup] %s\n' "$*" >&2; }

APT_PACKAGES=(python3-bpfcc bpfcc-tools prometheus prometheus-alertmanager iproute2 curl wget
  netcat-openbsd python3-venv gzip openssl python3-requests iptables gcc libc6-dev python3-dev
  nats-server)

install_apt() {
  local missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
      log "missing system packages (${missing[*]}); run this script as root to install them"
      return 0
    fi
    log "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

install_apt
if [ "$(id -u)" -eq 0 ]; then
  bash scripts/kernel-headers.sh || log "kernel headers could not be provided; BPF tests will skip (see 'imdswatch doctor')"
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  log "creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[dev]'

# BCC ships for Debian's python3 only (the PyPI 'bcc' is another project): link the
# system package into the venv instead of exposing all of dist-packages.
SITE=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ -d /usr/lib/python3/dist-packages/bcc ] && [ ! -e "$SITE/bcc" ]; then
  ln -s /usr/lib/python3/dist-packages/bcc "$SITE/bcc"
fi
if .venv/bin/python -c 'import bcc' 2>/dev/null; then
  log "bcc importable from .venv"
else
  log "bcc is not importable from .venv; live tracing is unavailable (see 'imdswatch doctor')"
fi
log "ready: .venv/bin/imdswatch"
