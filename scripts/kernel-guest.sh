#!/usr/bin/env bash
# Runs inside one kernel-matrix VM (scripts/test-kernels.sh boots it with this machine's root
# read-only, so the checkout and .venv are the host's): kernel headers linked in, then
# `imdswatch doctor` and the tests that depend on the kernel. Writes doctor.txt, and per test
# group pytest-<group>.log, junit-<group>.xml and pytest-<group>.rc, into OUT (the one
# directory the VM may write on the host).
#   scripts/kernel-guest.sh KERNEL_ROOT OUT [pytest arguments instead of the default tests]
set -uo pipefail
kroot=$1 out=$2
shift 2
cd "$(dirname "$0")/.."
export PYTHONDONTWRITEBYTECODE=1 PATH="$PWD/.venv/bin:$PATH"
# Under emulation a BCC compile takes tens of seconds, not one: the agent gets longer to attach.
export IMDSWATCH_TEST_AGENT_START_TIMEOUT=${IMDSWATCH_TEST_AGENT_START_TIMEOUT:-600}
# Emulated CPUs: two rounds of each short-lived caller per probe mode, not six.
export IMDSWATCH_TEST_IDENTITY_ROUNDS=${IMDSWATCH_TEST_IDENTITY_ROUNDS:-2}
K=$(uname -r)

# The VM's /lib/modules/$K is the unpacked package's, whose build/source links are absolute
# (/usr/src/linux-headers-$K...): the guest's /usr is a writable overlay, so link them there.
# Linked to a copy in the guest's memory: every BCC compile opens a few thousand header
# files, and over the 9p share each open and read is a round trip to QEMU's one I/O thread,
# which competes with the emulated CPUs for the host's cores. The copy comes from one tar
# file (test-kernels.sh packs it): copying the 16,000 files one by one over 9p takes longer
# than the compiles it saves.
hdr=/run/imdswatch-headers
tarball="$(dirname "$kroot")/headers-$K.tar"
mkdir -p "$hdr"
if [ -s "$tarball" ] && mount -t tmpfs -o size=1g imdswatch-headers "$hdr" \
    && tar -C "$hdr" -xf "$tarball"
then
  src=$hdr
else
  echo "kernel-guest: headers not copied into memory; compiling from the share" >&2
  src=$kroot/usr/src
fi
for d in "$src"/linux-headers-*; do ln -sfn "$d" "/usr/src/$(basename "$d")"; done
echo "$K" > "$out/release"

# group NAME TEST...: one pytest process (the checkout is read-only here: no cache).
group() {
  local name=$1
  shift
  python -m pytest -p no:cacheprovider -v -rs --durations=10 --junitxml="$out/junit-$name.xml" \
    -o junit_family=xunit1 "$@" > "$out/pytest-$name.log" 2>&1
  echo $? > "$out/pytest-$name.rc"
}

if [ "$#" -gt 0 ]; then
  imdswatch doctor > "$out/doctor.txt" 2>&1
  echo $? > "$out/doctor.rc"
  group a "$@"
  exit 0
fi

# What depends on the kernel: `imdswatch run` end to end in each probe mode (attach, the
# connect seen, request capture, kernel identity, alert, metrics, SIGTERM), and the tracer's
# own tests (programs through the verifier in ring- and perf-buffer builds, kprobe/fentry
# attach-and-trace, cgroup links and legacy attach, request capture, buffer overruns,
# identity without CAP_SYSLOG). test_tracer_units.py and test_tracer_http.py never load a
# program: `make test` runs them. A BCC compile is single-threaded and most of each test's
# time, so two groups run at once on the VM's two CPUs; a BPF test copes with another
# tracer running beside it (each filters by its own netns and pids), not with a flood. The groups are
# split so that both end at about the same time (each test's duration is in the kept
# junit-*.xml; MATRIX_KEEP=1): a VM lasts as long as its longer group. A new tracer test
# file goes to group a.
touch "$out/default-tests"  # scripts/matrix_verdict.py then requires every mode end to end
# test_tracer_flood.py runs alone, after both groups: every tracer sees every metadata
# connect on the machine, so its flood also overruns the other group's tracer, whose events
# then go missing (seen as lost or late events in the request and identity tests).
b_files=(tests/test_tracer_bpf.py tests/test_tracer_cgroup.py tests/test_tracer_identity.py)
mapfile -t a_files < <(ls tests/test_tracer_*.py | grep -v -E \
  '/test_tracer_(bpf|cgroup|flood|identity|units|http)\.py$')
# The agent's alert carrying the request is checked in every mode by test_agent_modes.py.
# Left to `make test` on the reference kernel, each a compile (half a minute here) that adds
# nothing kernel-specific: the forced tracked egress program (the Debian kernels' own
# choice, which every request test here runs), request capture turned off, and a refusal
# the test itself fakes.
{
  imdswatch doctor > "$out/doctor.txt" 2>&1
  echo $? > "$out/doctor.rc"
  group a tests/test_agent_modes.py "${a_files[@]}" \
    --deselect tests/test_tracer_requests.py::test_agent_alert_carries_the_request \
    --deselect "tests/test_tracer_requests.py::test_tracked_egress_reads_requests[tracepoint]" \
    --deselect "tests/test_tracer_requests.py::test_tracked_egress_reads_requests[cgroup]" \
    --deselect tests/test_tracer_requests.py::test_request_capture_off_reports_connections \
    --deselect tests/test_tracer_requests.py::test_request_capture_degrades_with_a_log_line
} &
group b "${b_files[@]}" &
wait
group flood tests/test_tracer_flood.py
