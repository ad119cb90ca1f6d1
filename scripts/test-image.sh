#!/usr/bin/env bash
# `make test-image`: builds deploy/Dockerfile with podman on a debootstrapped Debian base (no
# registry), then runs it exactly as the DaemonSet does (scripts/image_check.py). Set-up is
# scripted: podman, buildah, runc and debootstrap from Debian; the base image cached.
# Environment: IMDSWATCH_CACHE (default /var/cache/imdswatch), IMAGE (default
# localhost/imdswatch:test), PIP_CA (CA bundle pip trusts in the build; default the host's).
set -uo pipefail
cd "$(dirname "$0")/.."
log() { printf '[test-image] %s\n' "$*" >&2; }

CACHE=${IMDSWATCH_CACHE:-/var/cache/imdswatch}
IMAGE=${IMAGE:-localhost/imdswatch:test}
PIP_CA=${PIP_CA:-/etc/ssl/certs/ca-certificates.crt}
[ "$(id -u)" -eq 0 ] || { log "needs root (rootful podman: BPF in the container)"; exit 2; }

t_start=$(date +%s)
missing=()
for p in podman buildah runc debootstrap; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  log "installing ${missing[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null || exit 1
fi

# This machine's limits are above what runc may set for a container by default, and its
# hybrid cgroups need runc rather than crun: both in podman's own config for this run.
mkdir -p "$CACHE/image"
export CONTAINERS_CONF="$CACHE/image/containers.conf"
cat > "$CONTAINERS_CONF" <<'EOF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
EOF

base=$(bash scripts/image-base.sh) || { log "no base image"; exit 1; }
secret=()
[ -s "$PIP_CA" ] && secret=(--secret "id=pip_ca,src=$PIP_CA")
log "building $IMAGE on $base"
t_build=$(date +%s)
if ! podman build --file deploy/Dockerfile --ignorefile deploy/Dockerfile.dockerignore \
    --build-arg "DEBIAN_IMAGE=$base" "${secret[@]}" --tag "$IMAGE" . > "$CACHE/image/build.log" 2>&1; then
  tail -n 40 "$CACHE/image/build.log" >&2
  log "build failed (log: $CACHE/image/build.log)"; exit 1
fi
size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
log "built in $(( $(date +%s) - t_build ))s, $(( size / 1000000 )) MB"
# Dangling layers of earlier builds of the same tag: kept out of the cache's way.
podman image prune --force >/dev/null 2>&1 || true

echo "image $IMAGE, run as deploy/kubernetes/base/daemonset.yaml runs it:"
.venv/bin/python scripts/image_check.py "$IMAGE"
rc=$?
log "$([ $rc -eq 0 ] && echo passed || echo FAILED) in $(( $(date +%s) - t_start ))s"
exit "$rc"
