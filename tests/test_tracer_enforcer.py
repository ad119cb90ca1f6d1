"""The kernel side of `--enforce deny` (tracer.enforcer, bpf/enforce.bpf.c) on its own, as
the kernel matrix runs it: linked to a cgroup the test creates and fills with its own
clients only, in a process the test SIGKILLs. Default deny refuses curl's connect with
EPERM and reports it with the caller's identity; the allowed executable connects; a
client outside the cgroup is untouched; after SIGKILL nothing is attached and curl
connects (fail open). With a scope, only the in-scope sibling cgroup's curl is refused; a
cgroup denial (a namespace deny rule's entry) refuses its cgroup's curl under default
allow and nobody else's. The cgroup v2 root is refused. Requests are judged one by one on
a restricted caller's socket (sock_ops and sk_msg), on loopback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from netns_fixtures import (  # noqa: F401 - enforce_cgroup: a fixture
    MetadataNamespace,
    enforce_cgroup,
    in_cgroup,
    require_bcc,
    wait_for,
)

from lab.cgroups import remove_cgroups
from tracer import cgroup_attach
from tracer.enforcer import EnforceError, check_cgroup

pytestmark = [pytest.mark.root, pytest.mark.bpf]

IMDS = "169.254.169.254"
URL = f"http://{IMDS}/latest/meta-data/instance-id"
HERE = Path(__file__).resolve().parent


def run(ns: MetadataNamespace, argv: list[str], cgroup: Path | None) -> tuple[int, int, str]:
    p = ns.popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                 preexec_fn=in_cgroup(cgroup) if cgroup is not None else None)
    _, err = p.communicate(timeout=30)
    return p.pid, p.returncode, err


CURL = ["env", "LC_ALL=C", "curl", "-v", "-o", "/dev/null", "--max-time", "5", URL]


def test_the_kernel_denies_in_its_cgroup_only_and_fails_open(enforce_cgroup):  # noqa: F811
    require_bcc()
    wget = os.path.realpath(shutil.which("wget") or "/usr/bin/wget")
    child = subprocess.Popen(
        [sys.executable, str(HERE / "helpers" / "enforcer_child.py"), str(enforce_cgroup),
         wget], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(HERE.parent)})
    try:
        line = child.stdout.readline()
        assert line.strip() == "ready", child.stderr.read()
        with MetadataNamespace(v4=(IMDS,), v6=()) as ns:
            pid, rc, err = run(ns, CURL, enforce_cgroup)
            assert rc == 7 and "Operation not permitted" in err, err
            rec = json.loads(child.stdout.readline())
            assert rec["tgid"] == pid and rec["comm"] == "curl" and rec["exe_name"] == "curl"
            assert rec["dport"] == 80 and rec["daddr"] == [169, 254, 169, 254]
            assert rec["rule"] == 0 and rec["uid"] == 0 and rec["ino"] > 0 and rec["dev"] > 0
            _, rc, err = run(ns, ["wget", "-q", "-O", "/dev/null", URL], enforce_cgroup)
            assert rc == 0, err
            _, rc, err = run(ns, CURL, None)
            assert rc == 0, err
            child.kill()
            child.wait(10)
            _, rc, err = run(ns, CURL, enforce_cgroup)
            assert rc == 0, err
        fd = os.open(enforce_cgroup, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for hook in (cgroup_attach.CGROUP_INET4_CONNECT, cgroup_attach.CGROUP_INET6_CONNECT):
                assert cgroup_attach.attached_program_ids(fd, hook) == []
        finally:
            os.close(fd)
    finally:
        child.kill()
        child.wait(10)


def start_child(cgroup: Path, *opts: str) -> subprocess.Popen:
    wget = os.path.realpath(shutil.which("wget") or "/usr/bin/wget")
    child = subprocess.Popen(
        [sys.executable, str(HERE / "helpers" / "enforcer_child.py"), str(cgroup), wget,
         *opts], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(HERE.parent)})
    line = child.stdout.readline()
    assert line.strip() == "ready", child.stderr.read()
    return child


def test_scope_and_cgroup_denials_by_cgroup_id(enforce_cgroup):  # noqa: F811
    require_bcc()
    inside, outside = enforce_cgroup / "in-scope", enforce_cgroup / "out-of-scope"
    inside.mkdir()
    outside.mkdir()
    child = None
    try:
        with MetadataNamespace(v4=(IMDS,), v6=()) as ns:
            child = start_child(enforce_cgroup, "--scope", str(inside))
            pid, rc, err = run(ns, CURL, inside)
            assert rc == 7 and "Operation not permitted" in err, err
            assert json.loads(child.stdout.readline())["tgid"] == pid
            assert run(ns, CURL, outside)[1] == 0
            assert run(ns, ["wget", "-q", "-O", "/dev/null", URL], inside)[1] == 0
            child.kill()
            child.wait(10)
            child = start_child(enforce_cgroup, "--deny-cgroup", str(outside))
            pid, rc, err = run(ns, CURL, outside)
            assert rc == 7 and "Operation not permitted" in err, err
            rec = json.loads(child.stdout.readline())
            assert rec["tgid"] == pid and rec["rule"] == 7
            assert run(ns, CURL, inside)[1] == 0
    finally:
        if child is not None:
            child.kill()
            child.wait(10)
        remove_cgroups((inside, outside))


def test_the_root_cgroup_is_refused():
    with pytest.raises(EnforceError, match="cgroup v2 root"):
        check_cgroup(cgroup_attach.cgroup2_root())


_CLIENT = """
import socket, sys
s = socket.create_connection(("127.0.0.2", int(sys.argv[1])))
for path in sys.argv[2:]:
    try:
        s.sendall(f"GET {path} HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n".encode())
        print("sent", path, flush=True)
    except PermissionError:
        print("refused", path, flush=True)
s.close()
"""


def test_the_kernel_side_judges_each_message_and_forgets_closed_sockets(enforce_cgroup):  # noqa: F811
    """tracer.enforcer on its own, on loopback (the catalog it is given holds one endpoint,
    127.0.0.2 on a port of the test's own): a Python client allowed plain metadata only
    sends an instance-id request (let through), a credentials request (EACCES, and a
    record with the caller, method and path), then anything (refused: the socket had a
    refusal). Once it closes, its socket's record is gone from the kernel's table. The
    restriction comes with a reload: the first rules restrict nobody and link no sock_ops."""
    import socket
    import threading
    from ipaddress import ip_network

    from policy.kernel_rules import request_patterns
    from policy.request_patterns import class_bit
    from scoring.endpoints import METADATA, Endpoint, EndpointCatalog
    from tracer.enforcer import KIND_REQUEST, KernelEnforcer, KernelRules

    require_bcc()
    srv = socket.socket()
    srv.bind(("127.0.0.2", 0))
    srv.listen(8)
    port = srv.getsockname()[1]

    def serve() -> None:
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            with c:
                while c.recv(65536):
                    pass

    threading.Thread(target=serve, daemon=True).start()
    catalog = EndpointCatalog([Endpoint("test-loopback", "custom", ip_network("127.0.0.2/32"),
                                        frozenset({port}))])
    uid = os.getuid()
    records: list = []
    enf = KernelEnforcer(catalog, str(enforce_cgroup))
    try:
        # A policy that restricts no caller's classes links no sock_ops program (other
        # connections in the cgroup run none of ours); the reload that restricts one does.
        enf.start(KernelRules(allow_uid={uid}, default_deny=True), records.append,
                  request_patterns())
        assert enf.requests_unavailable is None, enf.requests_unavailable
        assert not enf.requests_linked
        enf.set_rules(KernelRules(allow_uid={uid}, default_deny=True,
                                  classes={uid: class_bit(METADATA)}))
        assert enf.requests_linked and enf.requests_unavailable is None
        enf.arm(True)
        p = subprocess.run([sys.executable, "-c", _CLIENT, str(port),
                            "/latest/meta-data/instance-id",
                            "/latest/meta-data/iam/security-credentials/role",
                            "/latest/meta-data/instance-id"],
                           capture_output=True, text=True, timeout=60,
                           preexec_fn=in_cgroup(enforce_cgroup))
        assert p.stdout.split("\n")[:3] == [
            "sent /latest/meta-data/instance-id",
            "refused /latest/meta-data/iam/security-credentials/role",
            "refused /latest/meta-data/instance-id"], (p.stdout, p.stderr)
        assert wait_for(lambda: (enf.poll(100), records)[1], 5), enf.stats()
        first = records[0]
        assert first.kind == KIND_REQUEST and first.method == b"GET"
        assert first.path == b"/latest/meta-data/iam/security-credentials/role"
        assert first.comm.startswith(b"python")
        assert first.uid == uid and first.dport == port
        assert first.classes == class_bit("credentials")
        # The message after a refusal is refused by our program (the socket's record says
        # it refused) or, where the kernel keeps a socket's drop verdict, before it runs.
        stats = enf.stats()
        assert stats["restricted"] == 1 and stats["requests_judged"] in (2, 3), stats
        assert stats["requests_denied"] == stats["requests_judged"] - 1, stats
        table = enf.bpf["enf_restricted"]
        assert wait_for(lambda: len(list(table.keys())) == 0, 5)
    finally:
        enf.close()
        srv.close()
