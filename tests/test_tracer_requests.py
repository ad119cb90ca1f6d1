"""Request capture and kernel-side identity against the real kernel: the cgroup_skb egress
program on the cgroup v2 root, real clients (curl, wget, python urllib and http.client, raw
sockets, an io_uring connect compiled here with cc) talking to the mock IMDS inside a private
network namespace (never the real service), a DNAT rule inside that namespace, processes that
rename themselves or exec another binary after connecting."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from netns_fixtures import (
    EVENT_TIMEOUT,
    HERE,
    Collector,
    MetadataNamespace,
    require_bcc,
    started_tracer,
)

from intake.parser import event_from_ecs
from tracer import kernel

pytestmark = [pytest.mark.root, pytest.mark.bpf]

IMDS = "169.254.169.254"
AWS_ECS = "169.254.170.2"
TOKEN = "AQAEAtesttoken=="  # what the mock IMDS hands out for the token PUT


@pytest.fixture(scope="module")
def ns():
    require_bcc()
    with MetadataNamespace(v4=(IMDS, AWS_ECS), v6=()) as n:
        yield n


def require_capture(t) -> None:
    """Request capture attached on `t`. Every kernel with cgroup v2 runs one of the two egress
    programs (the tracked one where cgroup_skb may not call task helpers), so a tracer
    without it is a failure, never a skip."""
    if t.tracker is None:
        t.close()
        pytest.fail(f"request capture did not attach: {t.requests_unavailable}")


@pytest.fixture(scope="module")
def tracer(ns):
    t = started_tracer("cgroup")
    require_capture(t)
    yield t
    t.close()


@pytest.fixture
def live(tracer):
    tracer.poll(0)
    with Collector(tracer) as c:
        yield c


def _run(ns: MetadataNamespace, argv: list[str], **kw: object) -> int:
    p = ns.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, (argv, out, err)
    return p.pid


def _docs(live: Collector, pid: int, n: int = 1, timeout: float = EVENT_TIMEOUT) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        docs = live.matching(pid=pid)
        if len(docs) >= n:
            time.sleep(0.1)  # nothing more should follow
            return live.matching(pid=pid)
        time.sleep(0.05)
    docs = live.matching(pid=pid)
    # Shown with the failure: were the events lost in the kernel, or never matched?
    logging.getLogger(__name__).warning(
        "%d of %d events of pid %d after %.0f s; kernel counters %s; pids seen %s", len(docs),
        n, pid, timeout, live.tracer.kernel_stats(),
        sorted({(d["process"]["pid"], d["process"]["name"]) for d in live.matching()})[-8:])
    return docs


def _requests(docs: list[dict]) -> list[dict]:
    return [d for d in docs if d["event"]["action"] == "http_request"]


def _py(code: str) -> list[str]:
    return ["/usr/bin/python3", "-c", code]


def _raw_client(*chunks: bytes, gap: float = 0.05, name: str | None = None,
                hold: bool = False) -> list[str]:
    """python3 sending `chunks` as separate writes (TCP_NODELAY: separate segments). With
    `hold`, it then stays until its stdin closes (see `_held`)."""
    rename = "" if name is None else f"ctypes.CDLL(None).prctl(15, {name.encode()!r}, 0, 0, 0)\n"
    return _py(
        "import ctypes, socket, sys, time\n" + rename +
        f"s = socket.create_connection(({IMDS!r}, 80), 3)\n"
        "s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)\n"
        f"for c in {list(chunks)!r}:\n"
        f"    s.sendall(c); time.sleep({gap})\n"
        "s.settimeout(1)\n"
        "try:\n    s.recv(65536)\nexcept OSError:\n    pass\n"
        + ("sys.stdin.read()\n" if hold else "time.sleep(0.3)\n")
    )


def _held(ns: MetadataNamespace, live: Collector, argv: list[str]) -> dict:
    """The one event of a client that lives until the test has it: enrichment from /proc is
    then asserted without racing the client's exit (which a loaded machine loses)."""
    p = ns.popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        docs = _docs(live, p.pid)
    finally:
        out, err = p.communicate(b"", timeout=30)
    assert p.returncode == 0, (argv, out, err)
    (d,) = docs
    return d


def _no_secret(docs: list[dict], secret: str) -> None:
    for d in docs:
        shown = {k: v for k, v in d.items() if k != "process"}  # argv is the process's own
        assert secret not in repr(shown), d


# -- clients ---------------------------------------------------------------------------------

def test_curl_imdsv1_get(ns, live):
    pid = _run(ns, ["curl", "-s", "-o", "/dev/null",
                    f"http://{IMDS}/latest/meta-data/iam/security-credentials/test-role"])
    docs = _docs(live, pid)
    (req,) = docs  # the request stands for its connect: one event
    assert req["event"]["action"] == "http_request"
    assert req["http"]["request"]["method"] == "GET"
    assert req["url"]["path"] == "/latest/meta-data/iam/security-credentials/test-role"
    assert "query" not in req["url"]
    assert req["user_agent"]["original"].startswith("curl/")
    assert req["imdswatch"]["request"]["guarded"] is False
    assert req["process"]["name"] == "curl" and req["destination"]["ip"] == IMDS
    ev = event_from_ecs(req)  # the same reader as replay
    assert ev.is_request and ev.method == "GET" and ev.guarded is False
    assert ev.user_agent.startswith("curl/") and ev.path.endswith("/test-role")


def test_imdsv2_token_flow_on_one_connection(ns, live):
    """An SDK's flow: PUT the token, then GET with it, on one kept-alive connection."""
    code = (
        "import http.client\n"
        f"c = http.client.HTTPConnection({IMDS!r}, 80, timeout=3)\n"
        "c.request('PUT', '/latest/api/token', headers={'User-Agent': 'aws-sdk-go/1.44',"
        " 'X-aws-ec2-metadata-token-ttl-seconds': '21600'})\n"
        "tok = c.getresponse().read().decode()\n"
        "c.request('GET', '/latest/meta-data/iam/security-credentials/test-role',"
        " headers={'User-Agent': 'aws-sdk-go/1.44', 'X-aws-ec2-metadata-token': tok})\n"
        "c.getresponse().read()\n"
        "c.request('GET', '/latest/meta-data/instance-id',"
        " headers={'User-Agent': 'aws-sdk-go/1.44'})\n"
        "c.getresponse().read()\n"
        "assert c.sock is not None\n"
    )
    pid = _run(ns, _py(code))
    docs = _docs(live, pid, 3)
    reqs = _requests(docs)
    assert [(r["http"]["request"]["method"], r["url"]["path"], r["imdswatch"]["request"]["guarded"])
            for r in reqs] == [
        ("PUT", "/latest/api/token", True),
        ("GET", "/latest/meta-data/iam/security-credentials/test-role", True),
        ("GET", "/latest/meta-data/instance-id", False),
    ]
    assert len(docs) == 3  # no separate connection event
    # one connection: the same connection id, requests numbered in order
    ids = [r["event"]["id"] for r in reqs]
    assert len({i.rsplit("-r", 1)[0] for i in ids}) == 1
    assert [r["imdswatch"]["request"]["sequence"] for r in reqs] == [1, 2, 3]
    assert all(r["user_agent"]["original"] == "aws-sdk-go/1.44" for r in reqs)
    _no_secret(docs, TOKEN)


def test_curl_token_flow_with_next(ns, live):
    pid = _run(ns, ["curl", "-s", "-o", "/dev/null", "-X", "PUT", "-H",
                    "X-aws-ec2-metadata-token-ttl-seconds: 60", f"http://{IMDS}/latest/api/token",
                    "--next", "-s", "-o", "/dev/null", "-H", f"X-aws-ec2-metadata-token: {TOKEN}",
                    f"http://{IMDS}/latest/meta-data/instance-id"])
    reqs = _requests(_docs(live, pid, 2))
    assert [(r["http"]["request"]["method"], r["imdswatch"]["request"]["guarded"])
            for r in reqs] == [("PUT", True), ("GET", True)]
    assert len({r["event"]["id"].rsplit("-r", 1)[0] for r in reqs}) == 1  # reused connection
    _no_secret(reqs, TOKEN)


def test_gcp_and_azure_guard_headers(ns, live):
    gcp = _run(ns, ["curl", "-s", "-o", "/dev/null", "-H", "Metadata-Flavor: Google",
                    f"http://{IMDS}/computeMetadata/v1/instance/service-accounts/default/token"])
    gcp_bare = _run(ns, ["curl", "-s", "-o", "/dev/null",
                         f"http://{IMDS}/computeMetadata/v1/instance/service-accounts/default/token"])
    azure = _run(ns, ["curl", "-s", "-o", "/dev/null", "-H", "Metadata: true",
                      f"http://{IMDS}/metadata/identity/oauth2/token?api-version=2018-02-01"
                      "&resource=https://management.azure.com/"])
    # an AWS path with only a GCP header is not guarded for AWS
    mixed = _run(ns, ["curl", "-s", "-o", "/dev/null", "-H", "Metadata-Flavor: Google",
                      f"http://{IMDS}/latest/meta-data/"])
    (g,) = _docs(live, gcp)
    assert g["url"]["path"].startswith("/computeMetadata/v1/")
    assert g["imdswatch"]["request"]["guarded"] is True
    (gb,) = _docs(live, gcp_bare)
    assert gb["imdswatch"]["request"]["guarded"] is False
    (a,) = _docs(live, azure)
    assert a["url"] == {"path": "/metadata/identity/oauth2/token",
                        "query": "api-version=2018-02-01&resource=https://management.azure.com/"}
    assert a["imdswatch"]["request"]["guarded"] is True
    (m,) = _docs(live, mixed)
    assert m["imdswatch"]["request"]["guarded"] is False


def test_wget_and_python_urllib(ns, live):
    wget = _run(ns, ["wget", "-q", "-O", "/dev/null", f"http://{IMDS}/latest/user-data"])
    urllib = _run(ns, _py("import urllib.request\n"
                          f"urllib.request.urlopen('http://{IMDS}/latest/meta-data/instance-id',"
                          " timeout=3).read()"))
    (w,) = _docs(live, wget)
    assert w["url"]["path"] == "/latest/user-data"
    assert w["user_agent"]["original"].startswith("Wget/")
    assert w["process"]["name"] == "wget"
    (u,) = _docs(live, urllib)
    assert u["user_agent"]["original"].startswith("Python-urllib/")
    assert u["url"]["path"] == "/latest/meta-data/instance-id"


def test_ecs_credentials_authorization(ns, live):
    pid = _run(ns, ["curl", "-s", "-o", "/dev/null", "-H", "Authorization: secret-auth",
                    f"http://{AWS_ECS}/v2/credentials/test-id"])
    (d,) = _docs(live, pid)
    assert d["destination"]["ip"] == AWS_ECS and d["imdswatch"]["request"]["guarded"] is True
    _no_secret([d], "secret-auth")


# -- segments ----------------------------------------------------------------------------------

def test_request_split_over_two_writes(ns, tracer, live):
    before = tracer.kernel_stats()["segments"]
    pid = _run(ns, _raw_client(b"GET /latest/meta-data/instance-id HT",
                               b"TP/1.1\r\nHost: x\r\nUser-Agent: split-client/1\r\n\r\n"))
    (d,) = _docs(live, pid)
    assert d["url"]["path"] == "/latest/meta-data/instance-id"
    assert d["user_agent"]["original"] == "split-client/1"
    assert tracer.kernel_stats()["segments"] - before >= 2  # it really came in two segments


def test_header_split_mid_line_and_request_after(ns, live):
    pid = _run(ns, _raw_client(b"GET /latest/meta-data/ HTTP/1.1\r\nHost: x\r\nX-aws-ec2-meta",
                               b"data-token: " + TOKEN.encode() + b"\r\nUser-Agent: u\r\n\r\n",
                               b"GET /latest/user-data HTTP/1.1\r\nHost: x\r\n\r\n"))
    docs = _docs(live, pid, 2)
    assert [(r["url"]["path"], r["imdswatch"]["request"]["guarded"]) for r in _requests(docs)] == [
        ("/latest/meta-data/", True), ("/latest/user-data", False)], [d["event"] for d in docs]


def test_pipelined_requests_in_one_segment(ns, live):
    batch = b"".join(
        f"GET /latest/meta-data/{p} HTTP/1.1\r\nHost: x\r\nUser-Agent: pipe\r\n\r\n".encode()
        for p in ("instance-id", "ami-id", "iam/security-credentials/"))
    put = (b"PUT /latest/api/token HTTP/1.1\r\nContent-Length: 5\r\n"
           b"X-aws-ec2-metadata-token-ttl-seconds: 1\r\n\r\nhello")
    pid = _run(ns, _raw_client(batch + put + b"GET /latest/user-data HTTP/1.1\r\n\r\n"))
    reqs = _requests(_docs(live, pid, 5))
    assert [r["url"]["path"] for r in reqs] == [
        "/latest/meta-data/instance-id", "/latest/meta-data/ami-id",
        "/latest/meta-data/iam/security-credentials/", "/latest/api/token", "/latest/user-data"]
    assert [r["http"]["request"]["method"] for r in reqs] == ["GET"] * 3 + ["PUT", "GET"]


def test_body_spanning_segments_is_skipped(ns, live):
    body = b"x" * 3000  # longer than one captured segment
    pid = _run(ns, _raw_client(
        b"POST /latest/api/token HTTP/1.1\r\nContent-Length: 3000\r\n\r\n" + body[:100],
        body[100:], b"GET /latest/meta-data/ HTTP/1.1\r\nUser-Agent: after-body\r\n\r\n"))
    reqs = _requests(_docs(live, pid, 2))
    assert [(r["http"]["request"]["method"], r["url"]["path"]) for r in reqs] == [
        ("POST", "/latest/api/token"), ("GET", "/latest/meta-data/")]


def test_tls_first_bytes_reported_as_connection(ns, tracer, live):
    hello = bytes.fromhex("160301002001000003") + os.urandom(24)
    pid = _run(ns, _raw_client(hello, b"GET /after-tls HTTP/1.1\r\n\r\n"))
    (d,) = _docs(live, pid)
    assert d["event"]["action"] == "connection_attempted"
    assert d["imdswatch"]["request"] == {"unreadable": "tls"}
    assert "url" not in d and "http" not in d
    assert event_from_ecs(d).is_request is False


def test_garbage_first_bytes_reported_as_connection(ns, live):
    pid = _run(ns, _raw_client(b"\x00\x01\x02garbage\r\n\r\n"))
    (d,) = _docs(live, pid)
    assert d["event"]["action"] == "connection_attempted"
    assert d["imdswatch"]["request"] == {"unreadable": "not_http"}


def test_silent_connection_reported_once(ns, live):
    pid = _run(ns, ["bash", "-c", f"exec 3<>/dev/tcp/{IMDS}/80; sleep 1.5; true"])
    docs = _docs(live, pid, 1, timeout=3)
    time.sleep(0.3)
    docs = live.matching(pid=pid)
    assert len(docs) == 1 and docs[0]["event"]["action"] == "connection_attempted"
    assert "request" not in docs[0]["imdswatch"]


def test_connect_then_close_reported_at_close(ns, live):
    """Reported at the FIN, not after the idle time (timed from the caller's exit: its
    interpreter's start-up is no part of it)."""
    pid = _run(ns, _py(f"import socket\ns=socket.create_connection(({IMDS!r},80),3)\ns.close()"))
    t0 = time.monotonic()
    (d,) = _docs(live, pid, 1, timeout=3)
    assert d["event"]["action"] == "connection_attempted"
    assert time.monotonic() - t0 < 3


# -- NAT -------------------------------------------------------------------------------------

def test_dnat_to_metadata_address_is_reported(ns, live):
    """A pod with NET_ADMIN points an innocent-looking address at the metadata service: the
    connect hook sees 10.x, the egress program sees the packet after netfilter's DNAT."""
    ns.run(["ip", "addr", "add", "10.99.0.1/32", "dev", "lo"])
    rule = ["OUTPUT", "-d", "10.99.0.1", "-p", "tcp", "--dport", "8080",
            "-j", "DNAT", "--to-destination", f"{IMDS}:80"]
    r = ns.run(["iptables", "-t", "nat", "-A", *rule])
    if r.returncode != 0:
        pytest.fail(f"iptables DNAT in the test namespace failed: {r.stderr}")
    try:
        pid = _run(ns, ["curl", "-s", "-o", "/dev/null",
                        "http://10.99.0.1:8080/latest/meta-data/iam/security-credentials/"])
        docs = _docs(live, pid, timeout=5.0 if live.tracer.requests_limited is None else 1.5)
    finally:
        ns.run(["iptables", "-t", "nat", "-D", *rule])
    if live.tracer.requests_limited is not None:
        # A kernel that refuses task helpers in cgroup_skb (Debian's 5.10, 6.1, 6.12): the
        # tracked egress program follows only connections made to a metadata address. The
        # limit is the documented one, said by the tracer (and the agent's metric).
        assert "NAT" in live.tracer.requests_limited and kernel.kernel_version() < (6, 18)
        assert docs == []
        return
    (d,) = docs
    assert d["destination"] == {"ip": IMDS, "port": 80}
    assert d["imdswatch"]["nat"] == {"original_destination": {"ip": "10.99.0.1", "port": 8080}}
    assert d["imdswatch"]["probe"] == "cgroup_skb"
    assert d["process"]["name"] == "curl" and d["process"]["executable"].endswith("/curl")
    assert d["url"]["path"] == "/latest/meta-data/iam/security-credentials/"
    assert event_from_ecs(d).dst_ip == IMDS


def test_dnat_away_from_metadata_still_read(ns, live):
    """A node proxy (kiam style) DNATs metadata traffic elsewhere: the socket still names the
    metadata address, and its requests are read."""
    rule = ["OUTPUT", "-d", IMDS, "-p", "tcp", "--dport", "80",
            "-j", "DNAT", "--to-destination", "127.0.0.1:80"]
    r = ns.run(["iptables", "-t", "nat", "-A", *rule])
    assert r.returncode == 0, r.stderr
    try:
        pid = _run(ns, ["curl", "-s", "-o", "/dev/null", f"http://{IMDS}/latest/meta-data/"])
        (d,) = _docs(live, pid)
    finally:
        ns.run(["iptables", "-t", "nat", "-D", *rule])
    assert d["destination"]["ip"] == IMDS and d["url"]["path"] == "/latest/meta-data/"


# -- identity ----------------------------------------------------------------------------------

def test_process_renamed_to_empty_name(ns, live):
    d = _held(ns, live, _raw_client(b"GET /latest/meta-data/ HTTP/1.1\r\n\r\n", name="",
                                    hold=True))
    assert d["process"]["name"] == ""
    assert d["process"]["executable"].endswith("python3") or "python" in \
        d["process"]["executable"]
    assert "exited_before_enrichment" not in d["imdswatch"]


def test_name_ending_in_newline_is_enriched(ns, live):
    d = _held(ns, live, _raw_client(b"GET /latest/meta-data/ HTTP/1.1\r\n\r\n", name="evil\n",
                                    hold=True))
    assert d["process"]["name"] == "evil\n"
    assert "python" in d["process"]["executable"]
    assert "exited_before_enrichment" not in d["imdswatch"]


def test_thread_name_kept_beside_the_process_name(ns, live):
    code = (
        "import ctypes, socket, threading, time\n"
        "def work():\n"
        "    ctypes.CDLL(None).prctl(15, b'worker-thread', 0, 0, 0)\n"
        f"    s = socket.create_connection(({IMDS!r}, 80), 3)\n"
        "    s.sendall(b'GET /latest/meta-data/ HTTP/1.1\\r\\n\\r\\n'); s.recv(100)\n"
        "    time.sleep(0.3)\n"
        "t = threading.Thread(target=work); t.start(); t.join()\n"
    )
    pid = _run(ns, _py(code))
    (d,) = _docs(live, pid)
    assert d["process"]["name"] == "python3"
    assert d["process"]["thread"]["name"] == "worker-thread"
    assert d["process"]["thread"]["id"] != pid
    assert event_from_ecs(d).thread_name == "worker-thread"


def test_exec_of_known_agent_after_connect_is_a_mismatch(ns, tracer, tmp_path):
    """/tmp/.../amazon-ssm-agent connects, then execs another amazon-ssm-agent before /proc
    is read: /proc shows the second binary, the kernel saw the first."""
    fake = tmp_path / "fake" / "amazon-ssm-agent"
    real = tmp_path / "real" / "amazon-ssm-agent"
    for p in (fake, real):
        p.parent.mkdir()
        shutil.copy("/usr/bin/bash", p)
    assert os.stat(fake).st_ino != os.stat(real).st_ino
    tracer.poll(0)
    p = ns.popen([str(fake), "-c", f"exec 3<>/dev/tcp/{IMDS}/80; "
                  f"printf 'GET /latest/meta-data/ HTTP/1.1\\r\\n\\r\\n' >&3; "
                  f"exec {real} -c 'read -r _'"], stdin=subprocess.PIPE)
    docs: list[dict] = []
    try:  # the second binary lives until the test has the event
        # Nobody reads the buffer until the exec has happened.
        deadline = time.monotonic() + EVENT_TIMEOUT
        while (time.monotonic() < deadline
               and os.path.realpath(f"/proc/{p.pid}/exe") != str(real)):
            time.sleep(0.02)
        deadline = time.monotonic() + EVENT_TIMEOUT
        while (time.monotonic() < deadline
               and not [d for d in docs if d["process"]["pid"] == p.pid]):
            docs += tracer.poll(100)
    finally:
        p.communicate(b"", timeout=10)
    (d,) = [d for d in docs if d["process"]["pid"] == p.pid]
    kernel = d["imdswatch"]["process"]
    assert kernel["exe_mismatch"] is True
    assert kernel["kernel_executable"] == {"name": "amazon-ssm-agent",
                                           "inode": os.stat(fake).st_ino}
    assert kernel["proc_executable"] == str(real)
    # /proc's answer is not passed off as the caller's: the executable is the kernel's
    # record of what connected.
    assert d["process"]["executable"] == str(fake.resolve())
    assert d["process"]["name"] == "amazon-ssm-agen"


def test_same_binary_is_no_mismatch(ns, live):
    pid = _run(ns, ["curl", "-s", "-o", "/dev/null", f"http://{IMDS}/slow"])
    (d,) = _docs(live, pid)
    k = d["imdswatch"]["process"]
    assert "exe_mismatch" not in k
    assert k["kernel_executable"] == {"name": "curl",
                                      "inode": os.stat(d["process"]["executable"]).st_ino}


def test_io_uring_connect(ns, live, tmp_path):
    cc = shutil.which("cc")
    if cc is None:
        pytest.fail("no C compiler (cc) to build the io_uring helper")
    exe = tmp_path / "imdsw-uring"
    subprocess.run([cc, "-O2", "-o", str(exe), str(HERE / "helpers" / "uring_connect.c")],
                   check=True, capture_output=True, timeout=60)
    request = "GET /latest/meta-data/ HTTP/1.1\r\nUser-Agent: uring\r\n\r\n"
    p = ns.popen([str(exe), IMDS, "80", request],
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = p.communicate(timeout=20)
    assert p.returncode == 0 and out.strip() == "0", (out, err)
    (d,) = _docs(live, p.pid)
    assert d["process"]["name"] == "imdsw-uring"  # the process, not the io-wq worker
    assert d["process"]["thread"]["name"].startswith("iou-wrk-")
    assert d["url"]["path"] == "/latest/meta-data/"
    assert d["user_agent"]["original"] == "uring"


# -- other probe modes -----------------------------------------------------------------------

def test_tracepoint_mode_joins_requests_by_thread(ns):
    t = started_tracer("tracepoint")
    require_capture(t)
    try:
        with Collector(t) as c:
            pid = _run(ns, ["curl", "-s", "-o", "/dev/null", f"http://{IMDS}/latest/meta-data/"])
            silent = _run(ns, ["bash", "-c", f"exec 3<>/dev/tcp/{IMDS}/80; true"])
            (d,) = _docs(c, pid)
            (s,) = _docs(c, silent, timeout=4)
        assert d["imdswatch"]["probe"] == "tracepoint"
        assert d["event"]["action"] == "http_request" and d["url"]["path"] == "/latest/meta-data/"
        assert s["event"]["action"] == "connection_attempted"
    finally:
        t.close()


@pytest.mark.parametrize("ringbuf", [True, False], ids=["ringbuf", "perfbuf"])
def test_request_programs_load_through_verifier(ringbuf):
    """The tracked egress program and the tracking connect hooks load on every kernel, in
    ring- and perf-buffer builds; the full egress program at least on the reference one."""
    import bcc

    from tracer import cgroup_attach, probes

    require_bcc()
    if ringbuf and not kernel.ringbuf_supported():
        pytest.skip("kernel < 5.8 has no BPF ring buffer")
    b = probes.compile_mode("tracepoint", ringbuf=ringbuf)
    try:
        b.load_func(probes.REQUEST_PROGRAM_TRACKED.encode(), bcc.BPF.CGROUP_SKB,
                    attach_type=cgroup_attach.CGROUP_INET_EGRESS)
        for name, hook in probes.TRACK_HOOKS.items():
            b.load_func(name.encode(), bcc.BPF.CGROUP_SOCK_ADDR, attach_type=hook)
        if kernel.kernel_version() >= (6, 18):
            b.load_func(probes.REQUEST_PROGRAM.encode(), bcc.BPF.CGROUP_SKB,
                        attach_type=cgroup_attach.CGROUP_INET_EGRESS)
    finally:
        probes.release(b)


def _tracked_tracer(probe: str):  # noqa: ANN202 - tracer.Tracer
    """A tracer forced onto the tracked egress program: what kernels that refuse task
    helpers in cgroup_skb (Debian's 5.10, 6.1, 6.12) get by themselves."""
    from scoring.endpoints import EndpointCatalog
    from tracer.session import Tracer

    t = Tracer(EndpointCatalog.from_config(), probe=probe, request_variant="tracked")
    t.start()
    require_capture(t)
    return t


@pytest.mark.parametrize("probe", ["tracepoint", "cgroup"])
def test_tracked_egress_reads_requests(ns, probe):
    """The tracked egress program: the token flow on one connection is read, joined to
    curl (by thread through the tracking connect hooks in tracepoint mode, by cookie in
    cgroup mode); the tracer says what it cannot follow (NAT'ed connections); closing
    detaches every program, the tracking hooks too."""
    t = _tracked_tracer(probe)
    root = t._bpf.imdsw_requests.root
    ours = _attached(t)
    try:
        assert t.requests_limited is not None and "NAT" in t.requests_limited
        names = {name for _pid, name in ours}
        expected = {"imdsw_egress_tr"} | ({"imdsw_track4", "imdsw_track6"}
                                          if probe != "cgroup" else set())
        assert expected <= names, names
        with Collector(t) as c:
            pid = _run(ns, ["curl", "-s", "-o", "/dev/null",
                            "-X", "PUT", "-H", "X-aws-ec2-metadata-token-ttl-seconds: 60",
                            f"http://{IMDS}/latest/api/token",
                            "--next", "-s", "-o", "/dev/null",
                            "-H", f"X-aws-ec2-metadata-token: {TOKEN}",
                            f"http://{IMDS}/latest/meta-data/iam/security-credentials/"])
            reqs = _requests(_docs(c, pid, n=2))
        assert [(r["http"]["request"]["method"], r["url"]["path"]) for r in reqs] == [
            ("PUT", "/latest/api/token"),
            ("GET", "/latest/meta-data/iam/security-credentials/")]
        assert {r["process"]["name"] for r in reqs} == {"curl"}
        assert {r["imdswatch"]["probe"] for r in reqs} == {probe}
        assert reqs[1]["imdswatch"]["request"]["guarded"] is True
        _no_secret(reqs, TOKEN)
    finally:
        t.close()
    # Closing detaches all of them, the tracking hooks too.
    assert not {pid for pid, _ in ours} & {pid for pid, _ in _attached_at(root)}


def _attached_at(root: str) -> list[tuple[int, str]]:
    from tracer import cgroup_attach

    fd = os.open(root, os.O_RDONLY)
    try:
        return [p for hook in cgroup_attach.OUR_HOOKS
                for p in cgroup_attach.attached_programs(fd, hook)]
    finally:
        os.close(fd)


def _attached(t) -> list[tuple[int, str]]:
    """The imdswatch programs of `t` attached to its cgroup root (id, name)."""
    ours = set()
    for fn in t._bpf.funcs.values():
        for line in Path(f"/proc/self/fdinfo/{fn.fd}").read_text().splitlines():
            if line.startswith("prog_id:"):
                ours.add(int(line.split()[1]))
    return [(pid, name) for pid, name in _attached_at(t._bpf.imdsw_requests.root)
            if pid in ours]


def test_request_capture_off_reports_connections(ns):
    from scoring.endpoints import EndpointCatalog
    from tracer.session import Tracer

    t = Tracer(EndpointCatalog.from_config(), probe="cgroup", requests=False)
    t.start()
    try:
        assert t.tracker is None
        with Collector(t) as c:
            pid = _run(ns, ["curl", "-s", "-o", "/dev/null", f"http://{IMDS}/latest/meta-data/"])
            (d,) = _docs(c, pid)
        assert d["event"]["action"] == "connection_attempted" and "url" not in d
    finally:
        t.close()


def test_egress_detached_on_close(ns):
    from tracer import cgroup_attach

    t = started_tracer("cgroup")
    require_capture(t)
    att = t._bpf.imdsw_requests
    root = att.root
    fd = os.open(root, os.O_RDONLY)
    try:
        ids = {pid for pid, name in cgroup_attach.attached_programs(
            fd, cgroup_attach.CGROUP_INET_EGRESS) if name.startswith("imdsw_egress")}
        ours = set()
        for fn in t._bpf.funcs.values():
            for line in Path(f"/proc/self/fdinfo/{fn.fd}").read_text().splitlines():
                if line.startswith("prog_id:"):
                    ours.add(int(line.split()[1]))
        assert ours & ids
        t.close()
        left = {pid for pid, _ in cgroup_attach.attached_programs(
            fd, cgroup_attach.CGROUP_INET_EGRESS)}
        assert not ours & left
    finally:
        os.close(fd)


def test_request_capture_degrades_with_a_log_line(ns, monkeypatch, caplog):
    """Where the kernel refuses the egress program, connections are still reported, the
    reason is logged and the agent's metric says request capture is off."""
    import logging

    from prometheus_client import CollectorRegistry

    from exporters.metrics import MetricsExporter
    from scoring.endpoints import EndpointCatalog
    from tracer import probes
    from tracer.session import Tracer

    def refuse(*_a: object, **_k: object) -> None:
        raise probes.ProbeError("request capture (cgroup_skb egress): test refusal")

    monkeypatch.setattr(probes, "attach_requests", refuse)
    caplog.set_level(logging.WARNING, logger="imdswatch.tracer")
    t = Tracer(EndpointCatalog.from_config(), probe="cgroup")
    t.start()
    try:
        assert t.tracker is None and "test refusal" in t.requests_unavailable
        assert "request capture unavailable" in caplog.text
        with Collector(t) as c:
            pid = _run(ns, ["curl", "-s", "-o", "/dev/null", f"http://{IMDS}/latest/meta-data/"])
            (d,) = _docs(c, pid)
        assert d["event"]["action"] == "connection_attempted"
    finally:
        t.close()
    m = MetricsExporter(CollectorRegistry(), host="n")
    m.set_request_capture(t.tracker is not None, 0)
    assert m.registry.get_sample_value("imdswatch_request_capture_enabled") == 0
    m.set_request_capture(True, 5)
    assert m.registry.get_sample_value("imdswatch_request_capture_enabled") == 1
    assert m.registry.get_sample_value("imdswatch_kernel_segments_dropped_total") == 5


def test_python_requests_session_keep_alive(ns, live):
    """python-requests (Debian's python3-requests) with a Session: the IMDSv2 flow on one
    pooled connection, as botocore-style clients do."""
    code = (
        "import requests\n"
        "s = requests.Session()\n"
        f"tok = s.put('http://{IMDS}/latest/api/token', timeout=3,"
        " headers={'X-aws-ec2-metadata-token-ttl-seconds': '60'}).text\n"
        f"s.get('http://{IMDS}/latest/meta-data/iam/security-credentials/test-role',"
        " headers={'X-aws-ec2-metadata-token': tok}, timeout=3).raise_for_status()\n"
    )
    pid = _run(ns, _py(code))
    reqs = _requests(_docs(live, pid, 2))
    assert [(r["http"]["request"]["method"], r["imdswatch"]["request"]["guarded"])
            for r in reqs] == [("PUT", True), ("GET", True)]
    assert all(r["user_agent"]["original"].startswith("python-requests/") for r in reqs)
    assert len({r["event"]["id"].rsplit("-r", 1)[0] for r in reqs}) == 1
    _no_secret(reqs, TOKEN)


def test_agent_alert_carries_the_request(ns, tmp_path):
    """End to end: the live agent scores the request events like replayed ones, and the
    alert names the request (method, path, guarded) and the process that sent it."""
    from netns_fixtures import AgentProcess, wait_for, warm_state

    state = tmp_path / "state.json"
    warm_state(state)
    agent = AgentProcess(tmp_path, "--probe", "cgroup", "--state", str(state),
                         "--learning-period", "0s").start()
    try:
        assert agent.metric("imdswatch_request_capture_enabled") == 1
        pid = _run(ns, ["curl", "-s", "-o", "/dev/null",
                        f"http://{IMDS}/latest/meta-data/iam/security-credentials/test-role"])

        def ours() -> list[dict]:
            return [a for a in agent.alert_lines() if a["process"].get("pid") == pid]

        assert wait_for(lambda: ours(), 10), agent.log.read_text()[-2000:]
        alert = ours()[0]
        assert alert["http"]["request"]["method"] == "GET"
        assert alert["url"]["path"].startswith("/latest/meta-data/iam/security-credentials/")
        assert alert["imdswatch"]["request"]["guarded"] is False
        assert alert["process"]["name"] == "curl"
    finally:
        agent.kill()
