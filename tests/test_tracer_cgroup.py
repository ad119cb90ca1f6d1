"""The `cgroup` attach mode against the real kernel: cgroup/connect4 and cgroup/connect6
programs attached to the cgroup v2 root, real clients (curl, wget, python3, bash /dev/tcp)
connecting to a mock IMDS inside a private network namespace (never the real service), one
event per connect, the kernel filter, enrichment, and nothing left attached after close()
or after an agent that died without detaching."""

from __future__ import annotations

import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from netns_fixtures import (
    AgentProcess,
    Collector,
    MetadataNamespace,
    require_bcc,
    started_tracer,
    wait_for,
    warm_state,
)

from intake.parser import event_from_ecs
from scoring.endpoints import EndpointCatalog
from tracer import cgroup_attach, kernel, probes
from tracer.session import Tracer

pytestmark = [pytest.mark.root, pytest.mark.bpf]

IMDS = "169.254.169.254"
ECS = "169.254.170.2"
V6 = "fd00:ec2::254"
WIRESERVER = "168.63.129.16"
DNS_NEIGHBOUR = "169.254.169.253"
ROOT = Path(__file__).resolve().parent.parent
HOOKS = cgroup_attach.OUR_HOOKS  # connect4, connect6, and request capture's egress


def _connect(comm: str, host: str, port: int, kind: str = "SOCK_STREAM",
             family: str | None = None, linger: float = 0.0) -> list[str]:
    """python3 renamed `comm` (PR_SET_NAME), one connect(); prints the errno name."""
    fam = family or ("AF_INET6" if ":" in host else "AF_INET")
    code = (
        "import ctypes,errno,socket,time\n"
        f"ctypes.CDLL(None).prctl(15, {comm.encode()!r}, 0, 0, 0)\n"
        f"s=socket.socket(socket.{fam}, socket.{kind})\n"
        "s.settimeout(2)\n"
        f"try: s.connect(({host!r},{port})); print('ok')\n"
        "except OSError as e: print(errno.errorcode.get(e.errno, e))\n"
        f"time.sleep({linger})\n"
    )
    return ["/usr/bin/python3", "-c", code]


def _comm() -> str:
    return f"imdsw-{secrets.token_hex(4)}"


class _Done:
    def __init__(self, pid: int, returncode: int, stdout: str) -> None:
        self.pid, self.returncode, self.stdout = pid, returncode, stdout


def _run(ns: MetadataNamespace, argv: list[str]) -> _Done:
    """Run to completion in the namespace; the pid tells its events apart from any other
    metadata traffic on the machine (the hooks see every cgroup)."""
    p = ns.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out, _ = p.communicate(timeout=20)
    return _Done(p.pid, p.returncode, out)


def _counts(tracer: Tracer, comm: str) -> int:
    return sum(n for (c, _u, _g), n in tracer.connection_counts().items() if c == comm)


def _our_program_ids(tracer: Tracer) -> set[int]:
    """The tracer's cgroup programs (not the identity record's raw tracepoints)."""
    ids = set()
    for name, fn in tracer._bpf.funcs.items():
        if name.startswith(b"raw_tracepoint__"):
            continue
        for line in Path(f"/proc/self/fdinfo/{fn.fd}").read_text().splitlines():
            if line.startswith("prog_id:"):
                ids.add(int(line.split()[1]))
    return ids


def _attached_ids(root: str) -> set[int]:
    fd = os.open(root, os.O_RDONLY)
    try:
        return {pid for h in HOOKS for pid, _ in cgroup_attach.attached_programs(fd, h)}
    finally:
        os.close(fd)


@pytest.fixture(scope="module")
def ns():
    require_bcc()
    with MetadataNamespace(v4=(IMDS, ECS, WIRESERVER, DNS_NEIGHBOUR), v6=(V6,)) as n:
        yield n


@pytest.fixture(scope="module")
def tracer(ns):
    t = started_tracer("cgroup")
    yield t
    t.close()


@pytest.fixture
def live(tracer):
    tracer.poll(0)
    with Collector(tracer) as c:
        yield c


@pytest.mark.parametrize("ringbuf", [True, False], ids=["ringbuf", "perfbuf"])
def test_programs_load_through_verifier(ringbuf):
    require_bcc()
    if ringbuf and not kernel.ringbuf_supported():
        pytest.skip("kernel < 5.8 has no BPF ring buffer")
    b = probes.compile_mode("cgroup", ringbuf=ringbuf)
    try:
        assert probes.load_mode(b, "cgroup") == ["imdsw_connect4", "imdsw_connect6"]
    finally:
        probes.release(b)


def test_cgroup2_root_from_mounts(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text("tmpfs /sys/fs/cgroup tmpfs ro 0 0\n"
                      "cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n")
    assert cgroup_attach.cgroup2_root(mounts=str(mounts)) == "/sys/fs/cgroup/unified"
    mounts.write_text("cgroup2 /run/x cgroup2 rw 0 0\ncgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n")
    assert cgroup_attach.cgroup2_root(mounts=str(mounts)) == "/sys/fs/cgroup"
    # in the DaemonSet: the host's hierarchy, not the container's cgroup namespace root
    mounts.write_text("cgroup2 /sys/fs/cgroup cgroup2 ro 0 0\n"
                      "cgroup2 /host/sys/fs/cgroup cgroup2 ro 0 0\n")
    assert cgroup_attach.cgroup2_root(mounts=str(mounts)) == "/host/sys/fs/cgroup"
    mounts.write_text("proc /proc proc rw 0 0\n")
    with pytest.raises(cgroup_attach.CgroupError):
        cgroup_attach.cgroup2_root(mounts=str(mounts))
    with pytest.raises(cgroup_attach.CgroupError):
        cgroup_attach.cgroup2_root(str(tmp_path))


def test_clients_each_give_one_event(ns, live):
    clients = {
        "curl": ["curl", "-s", "-o", "/dev/null", f"http://{IMDS}/latest/meta-data/"],
        "wget": ["wget", "-q", "-O", "/dev/null", f"http://{IMDS}/latest/meta-data/"],
        "python3": ["/usr/bin/python3", "-c",
                    f"import socket; socket.create_connection(({IMDS!r}, 80), 2)"],
        "bash": ["bash", "-c", f"exec 3<>/dev/tcp/{IMDS}/80; echo -e 'GET / HTTP/1.0\\n' >&3"],
    }
    procs = {name: _run(ns, argv) for name, argv in clients.items()}
    for name, p in procs.items():
        assert p.returncode == 0, name  # observed, never blocked
        docs = live.wait(pid=p.pid)
        time.sleep(0.05)
        docs = live.matching(pid=p.pid)
        assert len(docs) == 1, (name, docs)
        doc = docs[0]
        ev = event_from_ecs(doc)
        assert ev.name == name and ev.dst_ip == IMDS and ev.dst_port == 80
        assert doc["network"]["transport"] == "tcp" and doc["imdswatch"]["probe"] == "cgroup"
        assert "outcome" not in doc["event"]  # the hook runs before the connect: no result
        assert doc["user"] == {"id": "0", "name": "root"}


def test_ipv6_and_v4_mapped_give_one_event_each(ns, tracer, live):
    v6, mapped = _comm(), _comm()
    p6 = _run(ns, _connect(v6, V6, 80))
    pm = _run(ns, _connect(mapped, f"::ffff:{ECS}", 80))
    assert p6.stdout.strip() == pm.stdout.strip() == "ok"
    (d6,) = live.wait(name=v6)
    assert d6["destination"] == {"ip": V6, "port": 80} and d6["network"]["type"] == "ipv6"
    (dm,) = live.wait(name=mapped)
    assert dm["destination"]["ip"] == f"::ffff:{ECS}"
    time.sleep(0.2)
    # connect6 only: the kernel does not run the connect4 hook for a mapped destination
    assert len(live.matching(name=mapped)) == 1 and len(live.matching(name=v6)) == 1
    assert _counts(tracer, mapped) == 1 and _counts(tracer, v6) == 1


def test_udp_and_non_metadata_connects_are_not_reported(ns, tracer, live):
    comm = _comm()
    for host, port, kind in ((IMDS, 80, "SOCK_DGRAM"), (V6, 80, "SOCK_DGRAM"),
                             ("127.0.0.1", 80, "SOCK_STREAM"), (DNS_NEIGHBOUR, 53, "SOCK_STREAM"),
                             (WIRESERVER, 53, "SOCK_STREAM"), ("::1", 80, "SOCK_STREAM"),
                             (WIRESERVER, 80, "SOCK_STREAM")):
        _run(ns, _connect(comm, host, port, kind))
    (doc,) = live.wait(name=comm)
    # WireServer's port 53 is its DNS: the port filter keeps only port 80
    assert (doc["destination"]["ip"], doc["destination"]["port"]) == (WIRESERVER, 80)
    time.sleep(0.2)
    assert len(live.matching(name=comm)) == 1 and _counts(tracer, comm) == 1


def test_refused_connect_still_refused(ns, live):
    """Allow means allow: a refused connect fails as ECONNREFUSED, not EPERM, and counts."""
    comm = _comm()
    p = _run(ns, _connect(comm, IMDS, 9))
    assert p.stdout.strip() == "ECONNREFUSED"
    (doc,) = live.wait(name=comm)
    assert doc["destination"]["port"] == 9


def test_port_filter_follows_the_catalog(ns, tracer, live):
    custom = EndpointCatalog.from_config(
        add=[{"id": "imds-8080", "address": IMDS, "ports": [8080]}], remove=["imds"])
    comm = _comm()
    tracer.set_catalog(custom)
    try:
        _run(ns, _connect(comm, IMDS, 80))
        _run(ns, _connect(comm, IMDS, 8080))
        (doc,) = live.wait(name=comm)
        assert doc["destination"]["port"] == 8080
    finally:
        tracer.set_catalog(EndpointCatalog.from_config())
    time.sleep(0.2)
    assert len(live.matching(name=comm)) == 1


def test_enrichment_of_a_running_process(ns, live):
    p = ns.popen(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "bash", "-c",
                  f"exec 3<>/dev/tcp/{IMDS}/80; read -r _"], stdin=subprocess.PIPE)
    (doc,) = live.wait_held(p, pid=p.pid)
    proc = doc["process"]
    assert os.path.basename(proc["executable"]) == "bash"
    assert proc["command_line"].startswith("bash -c exec 3<>/dev/tcp/")
    assert proc["parent"]["pid"] == os.getpid()
    assert proc["parent"]["executable"] == os.path.realpath(sys.executable)
    assert doc["user"] == {"id": "65534", "name": "nobody"}
    assert doc["imdswatch"]["cgroup_id"] > 0 and doc["imdswatch"]["kernel_uid"] == 65534


def test_pause_and_resume(ns, tracer, live):
    comm = _comm()
    tracer.pause()
    try:
        _run(ns, _connect(comm, IMDS, 80))
    finally:
        tracer.resume()
    _run(ns, _connect(comm, IMDS, 80))
    assert len(live.wait(name=comm)) == 1
    time.sleep(0.2)
    assert len(live.matching(name=comm)) == 1


def test_close_detaches_from_the_root_cgroup(ns):
    t = Tracer(EndpointCatalog.from_config(), probe="cgroup")
    t.start()
    root = t._bpf.imdsw_cgroup.root
    ours = _our_program_ids(t)
    # connect4, connect6 and the request-capture egress program (the full one, or the
    # tracked one on kernels that refuse task helpers in cgroup_skb).
    assert t.tracker is not None, t.requests_unavailable
    assert len(ours) == 3 and ours <= _attached_ids(root)
    t.close()
    t.close()
    assert not ours & _attached_ids(root)
    # and a fresh attach works after it
    t2 = Tracer(EndpointCatalog.from_config(), probe="cgroup")
    t2.start()
    try:
        with Collector(t2) as c:
            comm = _comm()
            _run(ns, _connect(comm, IMDS, 80))
            assert len(c.wait(name=comm)) == 1
    finally:
        t2.close()


def test_legacy_attach_path_detaches(ns, monkeypatch):
    """Kernels without cgroup BPF links get BPF_PROG_ATTACH + BPF_F_ALLOW_MULTI, detached
    by close()."""
    lib = cgroup_attach._libbpf()
    monkeypatch.setattr(lib, "bpf_link_create", lambda *a: -95)  # EOPNOTSUPP
    t = Tracer(EndpointCatalog.from_config(), probe="cgroup")
    t.start()
    try:
        att = t._bpf.imdsw_cgroup
        assert len(att.legacy) == 2 and not att.links
        root, ours = att.root, _our_program_ids(t)
        assert ours <= _attached_ids(root)
        with Collector(t) as c:
            comm = _comm()
            _run(ns, _connect(comm, IMDS, 80))
            assert len(c.wait(name=comm)) == 1
    finally:
        t.close()
    assert not ours & _attached_ids(root)


_CRASHING_AGENT = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
import bcc
from tracer import cgroup_attach, probes
b = probes.compile_mode("cgroup")
probes.load_mode(b, "cgroup")
fd = os.open(cgroup_attach.cgroup2_root(), os.O_RDONLY)
for name, hook in probes.CGROUP_HOOKS.items():
    bcc.BPF.attach_func(b.funcs[name.encode()], fd, hook, cgroup_attach.BPF_F_ALLOW_MULTI)
ids = []
for fn in b.funcs.values():
    for line in open(f"/proc/self/fdinfo/{fn.fd}"):
        if line.startswith("prog_id:"):
            ids.append(line.split()[1])
print(" ".join(ids), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_stale_programs_of_a_killed_agent_are_removed(ns, caplog):
    """A legacy attach outlives its process: the next start removes it; live ones stay."""
    require_bcc()
    root = cgroup_attach.cgroup2_root()
    r = subprocess.run([sys.executable, "-c", _CRASHING_AGENT, str(ROOT)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr
    stale = {int(x) for x in r.stdout.split()}
    try:
        assert len(stale) == 2 and stale <= _attached_ids(root)  # outlived its process
        live_tracer = Tracer(EndpointCatalog.from_config(), probe="cgroup")
        caplog.set_level(logging.WARNING, logger="imdswatch.tracer")
        live_tracer.start()  # removes the stale pair on its way
        try:
            assert not stale & _attached_ids(root)
            # Removed by this start (logged) - or, when another imdswatch test run on this
            # machine started a tracer in between, by that one: gone either way.
            if "stale imdswatch cgroup program" not in caplog.text:
                logging.getLogger(__name__).warning(
                    "stale programs were removed by a concurrent tracer")
            ours = _our_program_ids(live_tracer)
            assert cgroup_attach.remove_stale(root) == []  # a live one is never removed
            assert ours <= _attached_ids(root)
        finally:
            live_tracer.close()
    finally:
        cgroup_attach.remove_stale(root)
    assert not stale & _attached_ids(root)


def test_agent_auto_picks_cgroup_and_alerts(ns, tmp_path):
    if kernel.kprobes_available():
        pytest.skip("kprobes available here: auto picks an earlier mode")
    state = tmp_path / "state.json"
    warm_state(state)
    agent = AgentProcess(tmp_path, "--probe", "auto", "--state", str(state),
                         "--learning-period", "0s").start()
    try:
        log = agent.log.read_text()
        if "probe auto chose fentry" in log:
            pytest.skip("fentry attaches here: auto picks it before cgroup")
        assert "probe auto chose cgroup" in log
        assert "probe tracepoint" not in log
        assert agent.metric("imdswatch_probe_info", mode="cgroup") == 1
        p = _run(ns, ["curl", "-s", "-o", "/dev/null", f"http://{IMDS}/latest/meta-data/"])
        assert wait_for(lambda: any(a["process"].get("pid") == p.pid
                                    for a in agent.alert_lines()), 5)
        rc, seconds = agent.stop(signal.SIGTERM)
        assert rc == 0 and seconds < 5
        assert "probes detached" in agent.log.read_text()
    finally:
        agent.kill()
