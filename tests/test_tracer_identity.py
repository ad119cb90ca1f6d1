"""Kernel-side process identity (leader name, executable read from the task) where the
DaemonSet runs the agent: as root without CAP_SYSLOG. There /proc/kallsyms shows zero
addresses, BCC concludes the kernel has no bpf_probe_read_kernel and renames the identity
reads to the old bpf_probe_read, which the verifier refuses in a cgroup program. The
programs call the helper by the number the kernel's BTF gives (bpf/imdswatch.h), so the
identity stays on; where that is not possible (simulated here by withholding the numbers,
as on a kernel without them), the refused mode is retried without the identity before auto
moves on to a costlier mode, and the tracer says identity is off. Real kernel, real verifier,
a real connect from a private namespace; each run in a child process whose capabilities
lack CAP_SYSLOG."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from netns_fixtures import MetadataNamespace, require_bcc

pytestmark = [pytest.mark.root, pytest.mark.bpf]

ROOT = Path(__file__).resolve().parent.parent
IMDS = "169.254.169.254"

# The child: a Tracer in PROBE mode, every compile recorded (mode, with identity or not),
# one connect made in the namespace and its event looked for.
_CHILD = """
import json, subprocess, sys, time
sys.path[:0] = [sys.argv[1]]
from scoring.endpoints import EndpointCatalog
from tracer.session import Tracer
from tracer import btf, probes

probe, numbers, connect = sys.argv[2], sys.argv[3] == "numbers", json.loads(sys.argv[4])
hidden = all(line.split()[0].strip("0") == "" for line in open("/proc/kallsyms")
             if line.split()[2:3] == ["bpf_probe_read_kernel"])
if not numbers:
    btf.READ_KERNEL_HELPERS = ()  # a kernel whose BTF does not name the helper
compiles = []
compile_mode = probes.compile_mode
def recorded(mode, **kw):
    compiles.append([mode, bool(kw.get("offsets")) and kw.get("task_reads", True)])
    return compile_mode(mode, **kw)
probes.compile_mode = recorded
t = Tracer(EndpointCatalog.from_config(), probe=probe, requests=False)
t.start()
try:
    pid = subprocess.Popen(connect, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pid.wait(20)
    docs, end = [], time.monotonic() + 10
    while not docs and time.monotonic() < end:
        docs = [d for d in t.poll(100) if d["process"]["pid"] == pid.pid]
finally:
    t.close()
print(json.dumps({"hidden": hidden, "mode": t.probe, "compiles": compiles,
                  "identity_off": t.identity_unavailable, "docs": docs}))
"""


@pytest.fixture(scope="module")
def ns():
    require_bcc()
    if shutil.which("setpriv") is None:
        pytest.skip("needs util-linux's setpriv to drop CAP_SYSLOG")
    with MetadataNamespace(v4=(IMDS,), v6=()) as n:
        yield n


def _run(ns: MetadataNamespace, probe: str, numbers: bool) -> dict:
    connect = ns.argv(["/usr/bin/python3", "-c",
                       "import socket\ns=socket.socket()\ns.settimeout(2)\n"
                       f"try: s.connect(({IMDS!r}, 80))\nexcept OSError: pass\n"])
    # Root without CAP_SYSLOG in any set, as the DaemonSet's capability list leaves it.
    r = subprocess.run(["setpriv", "--inh-caps=-syslog", "--bounding-set=-syslog", "--",
                        sys.executable, "-c", _CHILD, str(ROOT), probe,
                        "numbers" if numbers else "names", json.dumps(connect)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    if not out["hidden"]:
        pytest.skip("/proc/kallsyms shows addresses without CAP_SYSLOG here "
                    "(perf_event_paranoid <= 1): BCC's renaming cannot be provoked")
    return out


def _seen_with_identity(out: dict) -> bool:
    (doc,) = out["docs"]
    return "kernel_executable" in doc.get("imdswatch", {}).get("process", {})


@pytest.fixture(scope="module")
def cgroup_may_read_the_task(ns) -> bool:
    """Whether this kernel lets a cgroup program read the task at all, asked as root with
    every capability (older kernels allow bpf_get_current_task to tracing programs only)."""
    from tracer import btf, probes

    b = probes.compile_mode("cgroup", offsets=btf.task_offsets())
    try:
        probes.load_mode(b, "cgroup")
        return True
    except probes.VerifierRefused:
        return False
    finally:
        probes.release(b)


def test_cgroup_keeps_identity_without_cap_syslog(ns, cgroup_may_read_the_task):
    """The helper called by its number: without CAP_SYSLOG the cgroup programs load with the
    identity reads exactly as they do with every capability."""
    out = _run(ns, "cgroup", numbers=True)
    if not cgroup_may_read_the_task:  # the kernel's own limit, not BCC's renaming
        assert out["compiles"] == [["cgroup", True], ["cgroup", False]], out
        assert out["identity_off"] and not _seen_with_identity(out)
        return
    assert out["compiles"] == [["cgroup", True]], out
    assert out["identity_off"] is None
    assert _seen_with_identity(out), out["docs"]


def test_refused_mode_is_retried_without_identity(ns):
    """Withhold the helper numbers: BCC's renamed read is refused by the verifier; the
    same mode is compiled once more without the identity, attaches, sees the connect, and
    the tracer says why identity is off."""
    out = _run(ns, "cgroup", numbers=False)
    assert out["compiles"] == [["cgroup", True], ["cgroup", False]], out
    assert out["mode"] == "cgroup"
    assert "cgroup programs reading the task were refused" in out["identity_off"], out
    assert not _seen_with_identity(out), out["docs"]


def test_auto_compiles_twice_only_the_mode_the_verifier_refused(ns):
    """auto with the numbers withheld: modes that fail at attach (no kprobes) or are refused
    for privilege (EPERM for fentry) are compiled once; tracing programs may call the renamed
    helper, so only the cgroup mode ever needs the retry, and auto never goes past cgroup
    to the tracepoint because of the identity."""
    out = _run(ns, "auto", numbers=False)
    modes = [m for m, _ in out["compiles"]]
    # Here and on the matrix's kernels a mode before the tracepoint attaches.
    assert out["mode"] != "tracepoint", out
    twice = {m for m in modes if modes.count(m) > 1}
    assert twice <= {"cgroup"}, out
    if out["mode"] == "cgroup":
        assert out["compiles"][-2:] == [["cgroup", True], ["cgroup", False]], out
        assert out["identity_off"]
    else:  # fentry or kprobe attached, with the identity on
        assert out["compiles"][-1] == [out["mode"], True] and out["identity_off"] is None, out
    assert len(out["docs"]) == 1
