"""Caller identity from the kernel's per-process record (bpf/identity.h), for the callers that
exit before /proc can be read: a copy of curl at a fixed path that exits at once, the same copy
at the end of a shell pipeline, a shell that execs another binary right after connecting, a
forked child that connects without exec'ing, and a script (its interpreter and the script both
named). On a machine kept busy (two bounded busy loops), every event of theirs carries the
executable's path, the parent's name and the command line, taken from the kernel (not from
/proc), in every probe mode this kernel offers; a mode it refuses is skipped with the tracer's
own reason (the kernel matrix, whose kernels offer all four, fails on such a skip). Real BPF,
real processes, connections only inside a private namespace served by the mock."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
import uuid

import pytest
from netns_fixtures import Collector, MetadataNamespace, require_bcc, started_tracer

from tracer import probes

pytestmark = [pytest.mark.root, pytest.mark.bpf]

IMDS = "169.254.169.254"
URL = f"http://{IMDS}/latest/meta-data/"
# Per caller kind; the kernel matrix's emulated VMs run fewer (scripts/kernel-guest.sh).
ROUNDS = int(os.environ.get("IMDSWATCH_TEST_IDENTITY_ROUNDS", "6"))
LOAD_SECONDS = 120  # the busy loops' own bound, whatever happens to the test
# Bounds, not targets: under the matrix's emulated CPUs with both kept busy, one python
# start takes tens of seconds.
RUN_TIMEOUT = 180


@pytest.fixture(scope="module")
def ns():
    require_bcc()
    if shutil.which("curl") is None:
        pytest.skip("needs curl")
    with MetadataNamespace(v4=(IMDS,), v6=()) as n:
        yield n


@pytest.fixture(scope="module")
def callers(tmp_path_factory):
    """Binaries under names no other process has (comm is 15 bytes: the tag keeps them
    apart from another test's): a curl copy, a bash copy, a python symlink."""
    d = tmp_path_factory.mktemp("identity-bin")
    tag = uuid.uuid4().hex[:6]
    curl = d / f"idc-{tag}"
    bash = d / f"idb-{tag}"
    py = d / f"idp-{tag}"
    shutil.copy(shutil.which("curl"), curl)
    shutil.copy("/bin/bash", bash)
    py.symlink_to(os.path.realpath(sys.executable))
    # A script: the kernel runs its interpreter and names both in argv.
    script = d / f"ids-{tag}"
    script.write_text(f"#!{os.path.realpath(sys.executable)}\n"
                      "import socket\n"
                      "s = socket.socket()\n"
                      "s.settimeout(2)\n"
                      f"s.connect(({IMDS!r}, 80))\n")
    script.chmod(0o755)
    return {"curl": str(curl.resolve()), "bash": str(bash.resolve()), "py": str(py),
            "py_exe": os.path.realpath(sys.executable), "script": str(script.resolve())}


@contextlib.contextmanager
def cpu_load():
    """Two bounded busy loops (this machine has two cores), stopped on leaving. Started once
    the tracer is attached: the load is on the callers and the event path, not on the
    compile (which under the matrix's emulated CPUs it would slow several times over)."""
    procs = [subprocess.Popen([sys.executable, "-c",
                               f"import time\nend = time.monotonic() + {LOAD_SECONDS}\n"
                               "while time.monotonic() < end: pass\n"])
             for _ in range(2)]
    try:
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait(5)


def _run_callers(ns: MetadataNamespace, c: dict) -> None:
    curl = [c["curl"], "-s", "-o", "/dev/null", "-m", "3", URL]
    t = RUN_TIMEOUT
    for _ in range(ROUNDS):
        # a copy of curl at a fixed path, exiting at once
        ns.run(curl, timeout=t)
        # the same copy at the end of a pipeline: its parent is the shell
        ns.run(["/bin/sh", "-c", f"echo x | {' '.join(curl)} | cat"], timeout=t)
        # connect, then exec another binary at once: the event is bash's, not sleep's
        ns.run([c["bash"], "-c", f"exec 3<>/dev/tcp/{IMDS}/80; exec /bin/true"], timeout=t)
        # a forked child connects without exec'ing and exits at once
        ns.run([c["py"], "-c",
                "import os, socket\n"
                "if os.fork() == 0:\n"
                "    s = socket.socket()\n"
                "    s.settimeout(2)\n"
                f"    s.connect(({IMDS!r}, 80))\n"
                "    os._exit(0)\n"
                "os.wait()\n"], timeout=t)
        # an interpreted program: its identity is the interpreter and the script
        ns.run([c["script"]], timeout=t)


@pytest.mark.parametrize("mode", probes.MODES)
def test_short_lived_callers_carry_kernel_identity(mode, ns, callers):
    t = started_tracer(mode)
    try:
        assert t.record_unavailable is None, t.record_unavailable
        names = {os.path.basename(callers[k])[:15]: k
                 for k in ("curl", "bash", "py", "script")}
        with Collector(t) as col, cpu_load():
            _run_callers(ns, callers)
            want = 5 * ROUNDS
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                mine = [d for d in col.docs if d["process"]["name"] in names]
                if len(mine) >= want:
                    break
                time.sleep(0.1)
        mine = [d for d in col.docs if d["process"]["name"] in names]
        counters = t.kernel_stats()  # on a shortfall: dropped in the kernel, or not matched?
    finally:
        t.close()
    assert len(mine) == want, ([d["process"] for d in mine], counters)
    by_kind: dict[str, list[dict]] = {}
    for d in mine:
        by_kind.setdefault(names[d["process"]["name"]], []).append(d)
    assert {k: len(v) for k, v in by_kind.items()} == {"curl": 2 * ROUNDS, "bash": ROUNDS,
                                                       "py": ROUNDS, "script": ROUNDS}
    for d in mine:
        p, ident = d["process"], d["imdswatch"].get("identity", {})
        kind = names[p["name"]]
        # From the kernel's record, whatever /proc still showed when the event was read.
        assert ident.get("record") in ("exec", "fork"), d
        assert not {"process.executable", "process.command_line", "process.parent.name",
                    "process.parent.pid"} & set(ident.get("from_proc", [])), d
        assert not {"process.executable", "process.command_line", "process.parent.name",
                    "process.start"} & set(ident.get("missing", [])), d
        assert p["parent"]["pid"] > 1 and p["parent"]["name"], d
        assert p["start"].endswith("Z"), d
        if kind == "curl":
            assert p["executable"] == callers["curl"], d
            assert p["args"] == [callers["curl"], "-s", "-o", "/dev/null", "-m", "3", URL], d
            assert p["command_line"] == " ".join(p["args"])
            assert p["parent"]["name"] in ("sh", "python", "pytest") or \
                p["parent"]["name"].startswith("python"), d
        elif kind == "script":
            # /usr/bin/python3 running this script is not python3 running another one
            assert p["executable"] == callers["py_exe"], d
            assert p["args"] == [callers["py_exe"], callers["script"]], d
        elif kind == "bash":
            assert p["executable"] == callers["bash"], d
            assert f"/dev/tcp/{IMDS}/80" in p["command_line"], d
        else:
            # The child of a fork runs its parent's program: the python the symlink names,
            # with the parent's argv, and the parent (the same program) as its parent.
            assert ident["record"] == "fork", d
            assert p["executable"] == callers["py_exe"], d
            assert p["args"][0] == callers["py"] and p["args"][1] == "-c", d
            assert p["parent"]["name"] == p["name"], d
    piped = [d for d in by_kind["curl"] if d["process"]["parent"]["name"] == "sh"]
    assert len(piped) == ROUNDS, [d["process"]["parent"] for d in by_kind["curl"]]
