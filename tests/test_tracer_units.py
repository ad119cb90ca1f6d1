# Metadata addresses in this file are data (event fields, expected matches): nothing here
# connects to them. Real connections happen only inside a test's own network namespace
# (netns, tests/netns_fixtures.py).
"""Tracer pieces that need no kernel: sources, map entries, event decoding, cgroup and
passwd parsing, /proc enrichment (against a /proc-like root and the real /proc), and the
ECS documents read back by the scorer's own reader."""

from __future__ import annotations

import ctypes
import ipaddress
import os
import subprocess
import time

import pytest

from intake.parser import event_from_ecs
from scoring.endpoints import EndpointCatalog
from tracer import maps, sources
from tracer.cgroups import identify
from tracer.clock import MonotonicClock, rfc3339
from tracer.ecs import outcome, to_ecs
from tracer.enrich import Enricher, ProcessInfo
from tracer.layout import CEvent, KernelEvent, decode
from tracer.passwd import PasswdNames

CID = "4f1c1e3a9b2d" + "0" * 52


def test_program_text_inlines_local_headers_only():
    for mode in sources.MODE_FILES:
        text = sources.program_text(mode)
        assert "struct imds_event {" in text  # the shared header became part of the file
        assert '#include "' not in text
        assert "#include <uapi/linux/ptrace.h>" in text
    assert "TRACEPOINT_PROBE(sock, inet_sock_set_state)" in sources.program_text("tracepoint")
    assert "imds_connect_enter" in sources.program_text("kprobe")


def test_bpf_dir_env_override(tmp_path, monkeypatch):
    (tmp_path / "tracepoint.bpf.c").write_text('#include "x.h"\nint y;\n')
    (tmp_path / "x.h").write_text("int x;\n")
    monkeypatch.setenv("IMDSWATCH_BPF_DIR", str(tmp_path))
    assert sources.bpf_dir() == tmp_path
    text = sources.program_text("tracepoint")
    assert "int x;" in text and "int y;" in text
    with pytest.raises(FileNotFoundError, match="IMDSWATCH_BPF_DIR"):
        sources.program_text("kprobe")
    with pytest.raises(ValueError):
        sources.program_text("uprobe")


def test_cflags_choose_buffer():
    assert "-DIMDS_USE_RINGBUF=1" in sources.cflags(ringbuf=True)
    assert "-DIMDS_USE_RINGBUF=1" not in sources.cflags(ringbuf=False)
    with pytest.raises(ValueError):
        sources.cflags(ringbuf=True, ringbuf_pages=3)


def test_map_entries_builtin_catalog():
    entries = maps.entries(EndpointCatalog.from_config())
    imds = entries[ipaddress.ip_network("169.254.169.254/32")]
    assert imds.any_port
    azure = entries[ipaddress.ip_network("168.63.129.16/32")]
    assert not azure.any_port and azure.ports == {80, 32526}
    words = azure.words()
    assert words[80 >> 6] >> (80 & 63) & 1 and not words[53 >> 6] >> (53 & 63) & 1
    assert ipaddress.ip_network("fd00:ec2::254/128") in entries


def test_map_entries_union_ports_of_covering_prefixes():
    # A narrow entry with ports must not hide a broader any-port entry, and two port sets
    # on nested prefixes combine, exactly as EndpointCatalog.match decides.
    cat = EndpointCatalog.from_config(
        add=[{"address": "10.0.0.0/8", "ports": [80]}, {"address": "10.1.2.3", "ports": [8080]},
             {"address": "192.168.0.0/16"}, {"address": "192.168.1.1", "ports": [443]},
             {"address": "::ffff:172.16.0.5", "ports": [81]}],
        builtin=False,
    )
    e = maps.entries(cat)
    assert e[ipaddress.ip_network("10.1.2.3/32")].ports == {80, 8080}
    assert e[ipaddress.ip_network("192.168.1.1/32")].any_port
    # v4-mapped entries live in the IPv4 trie, which is where the kernel looks them up
    assert e[ipaddress.ip_network("172.16.0.5/32")].ports == {81}
    assert _kernel_match(e, "172.16.0.5", 81) and not _kernel_match(e, "172.16.0.5", 80)
    for ip, port in (("10.1.2.3", 80), ("10.1.2.3", 8080), ("10.1.2.3", 22), ("10.9.9.9", 80),
                     ("192.168.1.1", 22)):
        kernel = _kernel_match(e, ip, port)
        assert kernel == (cat.match(ip, port) is not None), (ip, port)


def _kernel_match(entries, ip, port):
    """The kernel's decision: longest prefix, then the port bit."""
    addr = ipaddress.ip_address(ip)
    best = max((n for n in entries if n.version == addr.version and addr in n),
               key=lambda n: n.prefixlen, default=None)
    if best is None:
        return False
    ps = entries[best]
    return ps.any_port or bool(ps.words()[port >> 6] >> (port & 63) & 1)


def _cevent(**kw):
    ev = CEvent()
    ev.ts_ns, ev.cgroup_id, ev.pid, ev.tgid, ev.uid, ev.gid = 10**9, 77, 101, 100, 33, 33
    ev.result, ev.family, ev.dport, ev.probe, ev.comm = -115, 2, 80, 2, b"curl"
    for i, b in enumerate(ipaddress.ip_address("169.254.169.254").packed):
        ev.daddr[i] = b
    for k, v in kw.items():
        setattr(ev, k, v)
    return ev


def test_decode_v4_v6_and_mapped():
    ev = _cevent()
    k = decode(ctypes.addressof(ev), ctypes.sizeof(ev))
    assert (k.dst_ip, k.dst_port, k.comm, k.tgid, k.tid, k.probe, k.result) == (
        "169.254.169.254", 80, "curl", 100, 101, "kprobe", -115)
    ev6 = _cevent(family=10, probe=1, result=1)
    for i, b in enumerate(ipaddress.ip_address("::ffff:169.254.170.2").packed):
        ev6.daddr[i] = b
    k6 = decode(bytes(ev6))
    assert k6.dst_ip == "::ffff:169.254.170.2" and k6.result is None and k6.probe == "tracepoint"


@pytest.mark.parametrize("text,cid,runtime,pod", [
    (f"0::/system.slice/docker-{CID}.scope\n", CID, "docker", None),
    (f"12:pids:/docker/{CID}\n", CID, "docker", None),
    ("0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod"
     "1b2c3d4e_aaaa_bbbb_cccc_0123456789ab.slice/cri-containerd-" + CID + ".scope\n",
     CID, "containerd", "1b2c3d4e-aaaa-bbbb-cccc-0123456789ab"),
    ("0::/kubepods/besteffort/pod1b2c3d4e-aaaa-bbbb-cccc-0123456789ab/" + CID + "\n",
     CID, "containerd", "1b2c3d4e-aaaa-bbbb-cccc-0123456789ab"),
    (f"0::/kubepods.slice/kubepods-pod1b2c3d4e_aaaa_bbbb_cccc_0123456789ab.slice/crio-{CID}"
     ".scope\n", CID, "cri-o", "1b2c3d4e-aaaa-bbbb-cccc-0123456789ab"),
    ("0::/user.slice/user-0.slice/session-1.scope\n", None, None, None),
])
def test_cgroup_identity(text, cid, runtime, pod):
    got = identify(text)
    assert (got.container_id, got.runtime, got.pod_uid) == (cid, runtime, pod)


def test_passwd_names(tmp_path):
    p = tmp_path / "passwd"
    p.write_text("root:x:0:0:root:/root:/bin/bash\nwww-data:x:33:33::/var/www:/usr/sbin/nologin\n")
    names = PasswdNames(str(p), recheck=0)
    assert names.name(33) == "www-data" and names.name(5) is None
    p.write_text("app:x:5:5::/:/bin/sh\n")
    os.utime(p, (time.time() + 5, time.time() + 5))
    assert names.name(5) == "app"
    assert PasswdNames(str(tmp_path / "missing")).name(0) is None


def _fake_proc(root, pid, comm, exe, cmdline, ppid, uid, cgroup):
    d = root / str(pid)
    (d / "task" / str(pid)).mkdir(parents=True)
    (d / "task" / str(pid) / "comm").write_text(comm + "\n")
    (d / "comm").write_text(comm + "\n")
    os.symlink(exe, d / "exe")
    (d / "cmdline").write_bytes(b"\0".join(a.encode() for a in cmdline) + b"\0")
    (d / "status").write_text(f"Name:\t{comm}\nPPid:\t{ppid}\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n"
                              f"Gid:\t{uid}\t{uid}\t{uid}\t{uid}\n")
    (d / "cgroup").write_text(cgroup)


def test_enrich_from_configured_proc_root(tmp_path):
    """A hostPID container reads the host's /proc under another root."""
    root = tmp_path / "proc"
    _fake_proc(root, 4242, "curl", "/usr/bin/curl",
               ["curl", "-H", "X-aws-ec2-metadata-token: abc", "http://169.254.169.254/"],
               4000, 33, f"0::/system.slice/docker-{CID}.scope\n")
    _fake_proc(root, 4000, "sh", "/bin/sh", ["sh"], 1, 33, "0::/\n")
    info = Enricher(str(root)).lookup(4242, 4242, "curl")
    assert not info.exited
    assert info.exe == "/usr/bin/curl" and info.args[0] == "curl"
    assert info.command_line.startswith("curl -H X-aws-ec2-metadata-token")
    assert (info.ppid, info.parent_name, info.parent_exe) == (4000, "sh", "/bin/sh")
    assert info.euid == 33 and info.cgroup.container_id == CID
    # a comm that no longer matches means another program owns the pid now
    assert Enricher(str(root)).lookup(4242, 4242, "wget").exited
    assert Enricher(str(root)).lookup(999, 999, "curl").exited


def test_enrich_real_process_and_exited():
    p = subprocess.Popen(["bash", "-c", "sleep 30; true", "marker-arg"])
    try:
        time.sleep(0.2)
        e = Enricher()
        comm = open(f"/proc/{p.pid}/comm").read().strip()
        info = e.lookup(p.pid, p.pid, comm)
        assert not info.exited
        assert os.path.basename(info.exe) == "bash"
        assert info.command_line.endswith("marker-arg")
        assert info.ppid == os.getpid() and info.euid == os.geteuid()
    finally:
        p.kill()
        p.wait()
    assert Enricher().lookup(p.pid, p.pid, comm).exited


def _kernel_event(**kw):
    base = dict(ts_ns=5, tid=101, tgid=100, uid=33, gid=33, cgroup_id=77, comm="curl",
                family=2, dst_ip="169.254.169.254", dst_port=80, probe="tracepoint",
                result=None)
    base.update(kw)
    return KernelEvent(**base)


def test_ecs_document_reads_back_as_event():
    info = ProcessInfo(exe="/usr/bin/curl", command_line="curl http://169.254.169.254/",
                       args=["curl", "http://169.254.169.254/"], ppid=1, parent_name="bash",
                       parent_exe="/bin/bash", euid=33, egid=33,
                       cgroup=identify(f"0::/system.slice/docker-{CID}.scope"))
    now = time.time_ns()
    doc = to_ecs(_kernel_event(), info, wall_ns=now, host_name="node-1", event_id="e1",
                 user_name="www-data")
    ev = event_from_ecs(doc)
    assert abs(ev.ts - now / 1e9) < 1e-5
    assert (ev.dst_ip, ev.dst_port, ev.name, ev.pid, ev.exe) == (
        "169.254.169.254", 80, "curl", 100, "/usr/bin/curl")
    assert (ev.ppid, ev.parent_name, ev.parent_exe, ev.user, ev.uid) == (
        1, "bash", "/bin/bash", "www-data", "33")
    assert (ev.host, ev.container_id, ev.event_id) == ("node-1", CID, "e1")
    assert doc["imdswatch"]["probe"] == "tracepoint" and "outcome" not in doc["event"]


def test_ecs_exited_process_keeps_kernel_fields():
    doc = to_ecs(_kernel_event(result=-111), ProcessInfo(exited=True), wall_ns=time.time_ns(),
                 host_name=None, event_id="e2", user_name=None)
    ev = event_from_ecs(doc)
    assert (ev.name, ev.pid, ev.uid, ev.exe) == ("curl", 100, "33", None)
    assert doc["imdswatch"]["exited_before_enrichment"] is True
    assert doc["event"]["outcome"] == "failure" and doc["imdswatch"]["connect_result"] == -111


def test_outcome_and_clock():
    assert outcome(0) == outcome(-115) == "success" and outcome(-111) == "failure"
    assert outcome(None) is None
    c = MonotonicClock()
    assert abs(c.wall_ns(time.monotonic_ns()) - time.time_ns()) < 5_000_000
    assert rfc3339(0) == "1970-01-01T00:00:00.000000Z"


def test_rfc3339_matches_datetime():
    from datetime import UTC, datetime

    for ns in (1_714_564_800_123_456_789, 1_714_564_800_999_999_000, 1_714_564_801_000_001_000):
        want = datetime.fromtimestamp(ns // 1000 / 1e6, UTC).isoformat(timespec="microseconds")
        assert rfc3339(ns) == want.replace("+00:00", "Z")


def test_first_byte_prefilter_covers_every_entry():


    nets = list(maps.entries(EndpointCatalog.from_config(
        add=[{"id": "wide", "address": "10.0.0.0/7"}, {"id": "v6", "address": "fd00::/7"},
             {"id": "mapped", "address": "::ffff:192.0.2.1"}])))
    v4 = maps.first_bytes(nets, 4)
    assert {169, 168, 10, 11, 192} <= v4 and 127 not in v4 and 12 not in v4
    v6 = maps.first_bytes(nets, 6)
    assert {0xfc, 0xfd} <= v6 and 0x20 not in v6


def test_btf_offsets_from_the_running_kernel():
    """tracer.btf reads field offsets from the kernel's own BTF, through anonymous members
    (qstr's name sits after an anonymous union) and nested structures."""
    import pytest as _pytest

    from tracer import btf

    with _pytest.raises(btf.BTFError, match="magic"):
        btf.BTF(b"\0" * 64)
    try:
        b = btf.BTF.kernel()
    except btf.BTFError as exc:
        _pytest.skip(f"no kernel BTF here: {exc}")
    off = btf.task_offsets(b)
    assert off["IMDS_OFF_DENTRY_NAME"] == b.offset("dentry", "d_name") + 8  # after hash_len
    assert off["IMDS_OFF_FILE_DENTRY"] == b.offset("file", "f_path") + 8  # after mnt
    assert b.offset("qstr", "hash_len") == 0 and b.offset("qstr", "len") == 4
    with _pytest.raises(btf.BTFError):
        b.offset("task_struct", "no_such_member")
    with _pytest.raises(btf.BTFError):
        b.offset("no_such_struct", "x")


@pytest.mark.parametrize(("mode", "exc", "skips"), [
    # a BPF compile error in bpf/*.c, in any mode: a failure, never a skip
    ("fentry", "probes.ProbeError('fentry: BPF compilation failed: error: use of undeclared "
               "identifier')", False),
    ("tracepoint", "probes.ProbeError('tracepoint: BPF compilation failed: x')", False),
    # the verifier refusing a program: a failure
    ("fentry", "probes.VerifierRefused('fentry: loading kfunc__tcp_v4_connect failed: "
               "invalid mem access')", False),
    ("cgroup", "probes.ProbeError('cgroup: attach failed: ' + probes.EPERM_TEXT)", False),
    ("tracepoint", "probes.ProbeError('tracepoint: attach failed: no such file')", False),
    # what this kernel genuinely refuses
    ("fentry", "probes.ProbeError('fentry: loading kfunc__tcp_v4_connect failed: ' "
               "+ probes.EPERM_TEXT)", True),
    ("fentry", "RuntimeError('not a probe error')", False),
])
def test_only_what_the_kernel_lacks_skips(mode, exc, skips):
    import _pytest.outcomes
    from netns_fixtures import skip_if_kernel_lacks

    from tracer import probes  # noqa: F401 - used by the expressions above

    error = eval(exc)
    if skips:
        with pytest.raises(_pytest.outcomes.Skipped):
            skip_if_kernel_lacks(mode, error)
    else:
        with pytest.raises(type(error)):
            skip_if_kernel_lacks(mode, error)


def test_kprobe_skips_only_where_kprobes_are_compiled_out():
    import _pytest.outcomes
    from netns_fixtures import skip_if_kernel_lacks

    from tracer import kernel, probes

    error = probes.ProbeError("kprobe: attach failed: cannot attach kprobe")
    if kernel.kprobes_available():
        with pytest.raises(probes.ProbeError):
            skip_if_kernel_lacks("kprobe", error)
    else:
        with pytest.raises(_pytest.outcomes.Skipped):
            skip_if_kernel_lacks("kprobe", error)
