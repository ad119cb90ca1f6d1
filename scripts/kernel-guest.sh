#!/usr/bin/env bash
# Runs inside one kernel-matrix VM (scripts/test-kernels.sh boots it with this machine's root
# read-only, so the checkout and .venv are the host's): kernel headers linked in, then
# `imdswatch doctor`, then the tracer and live-agent tests. Writes doctor.txt, pytest.log,
# junit.xml and rc files into OUT (the one directory the VM may write on the host).
#   scripts/kernel-guest.sh KERNEL_ROOT OUT [pytest arguments instead of the default tests]
set -uo pipefail
kroot=$1 out=$2
shift 2
cd "$(dirname "$0")/.."
export PYTHONDONTWRITEBYTECODE=1 PATH="$PWD/.venv/bin:$PATH"
# Under emulation a BCC compile takes minutes, not seconds: the agent gets longer to attach.
export IMDSWATCH_TEST_AGENT_START_TIMEOUT=${IMDSWATCH_TEST_AGENT_START_TIMEOUT:-900}
K=$(uname -r)

# The VM's /lib/modules/$K is the unpacked package's, whose build/source links are absolute
# (/usr/src/linux-headers-$K...): the guest's /usr is a writable overlay, so link them there.
for d in "$kroot"/usr/src/linux-headers-*; do ln -sfn "$d" "/usr/src/$(basename "$d")"; done
echo "$K" > "$out/release"

imdswatch doctor > "$out/doctor.txt" 2>&1
echo $? > "$out/doctor.rc"

# The tracer's own tests (whatever test_tracer_*.py exist now: programs, cgroup, flood,
# request capture) and `imdswatch run` end to end in each probe mode. The rest of the suite
# does not depend on the kernel and runs in `make test`. The checkout is read-only here.
tests=("$@")
# The probe modes end to end and the kprobe/fentry tests first: on a slow (emulated) run
# their verdict is in pytest.log early.
[ "${#tests[@]}" -gt 0 ] || mapfile -t tests < <(ls tests/test_agent_modes.py \
  tests/test_tracer_bpf.py; ls tests/test_tracer_*.py | grep -v '/test_tracer_bpf.py$')
python -m pytest -p no:cacheprovider -v -rs --durations=15 --junitxml="$out/junit.xml" \
  -o junit_family=xunit1 "${tests[@]}" > "$out/pytest.log" 2>&1
echo $? > "$out/pytest.rc"
