# Metadata addresses here are event data only; nothing connects to them, so no netns is needed.
"""Request capture's userspace half without a kernel: the HTTP head reader and the tracker
that reassembles segments (split, pipelined, retransmitted, truncated, wrapped sequence
numbers), property-tested against the requests that were sent."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tracer import http
from tracer.layout import KIND_CLOSE, KIND_CONNECT, KIND_DATA, KernelEvent, Segment
from tracer.requests import IDLE_SECONDS, RequestTracker

COOKIE = 77


def _tracker():
    out: list[dict] = []
    stopped: list[int] = []
    now = [0.0]
    t = RequestTracker(out.append, stopped.append, lambda ns: f"t{ns}", clock=lambda: now[0])
    ev = KernelEvent(ts_ns=1, tid=5, tgid=5, uid=0, gid=0, cgroup_id=1, comm="c", family=2,
                     dst_ip="169.254.169.254", dst_port=80, probe="cgroup", result=None,
                     kind=KIND_CONNECT, cookie=COOKIE)
    doc = {"event": {"id": "x", "action": "connection_attempted"}, "imdswatch": {},
           "process": {"name": "c"}}
    t.connection(ev, doc)
    return t, out, stopped, now


def _feed(t, stream: bytes, cuts: list[int], seq0: int, cap: int = 1024) -> None:
    pos = 0
    for cut in sorted(set(cuts)) + [len(stream)]:
        if cut <= pos:
            continue
        chunk = stream[pos:cut]
        t.segment(Segment(KIND_DATA, COOKIE, 1, (seq0 + pos) & 0xFFFFFFFF, len(chunk),
                          chunk[:cap]))
        pos = cut


def _req(i: int) -> bytes:
    body = b"b" * (i % 3) * 7
    return (f"GET /latest/meta-data/item{i}?n={i} HTTP/1.1\r\nHost: h\r\n"
            f"User-Agent: agent/{i}\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


def test_parse_head_fields_and_guards():
    p = http.parse(b"GET http://169.254.169.254/latest/api/token?x=1 HTTP/1.1\r\n"
                   b"X-aws-ec2-metadata-token-ttl-seconds: 5\r\n\r\n")
    assert p.status == "request" and p.request.path == "/latest/api/token"
    assert p.request.query == "x=1" and p.request.guarded
    assert not http.parse(b"GET /computeMetadata/v1/ HTTP/1.1\r\nMetadata-Flavor: x\r\n\r\n"
                          ).request.guarded
    assert http.parse(b"GET /metadata/instance HTTP/1.1\r\nmetadata: TRUE\r\n\r\n").request.guarded
    assert http.parse(b"\x16\x03\x01").status == "tls"
    assert http.parse(b"\x00abc").status == "not_http"
    assert http.parse(b"get / HTTP/1.1\r\n\r\n").status == "not_http"
    assert http.parse(b"GET /x HTTP/1.1\r\n").status == "need_more"
    assert http.parse(b"GET /x HTTP/1.1\r\n" + b"A: b\r\n" * 5000).status == "oversized"
    assert http.parse(b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n").status == \
        "chunked"


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 6), cuts=st.lists(st.integers(0, 2000), max_size=8),
       seq0=st.integers(0, 0xFFFFFFFF), dup=st.booleans())
def test_any_segmentation_gives_the_requests_sent(n, cuts, seq0, dup):
    stream = b"".join(_req(i) for i in range(n))
    t, out, _stopped, _now = _tracker()
    _feed(t, stream, [c % (len(stream) + 1) for c in cuts], seq0)
    if dup:  # a retransmission of everything changes nothing
        _feed(t, stream, [], seq0)
    assert [d["url"]["path"] for d in out] == [f"/latest/meta-data/item{i}" for i in range(n)]
    assert [d["url"]["query"] for d in out] == [f"n={i}" for i in range(n)]
    assert [d["imdswatch"]["request"]["sequence"] for d in out] == list(range(1, n + 1))
    assert all(d["event"]["action"] == "http_request" for d in out)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 6), cuts=st.lists(st.integers(0, 2000), max_size=8),
       cap=st.integers(1, 200), junk=st.binary(max_size=64))
def test_truncated_capture_never_invents_requests(n, cuts, cap, junk):
    stream = b"".join(_req(i) for i in range(n)) + junk
    t, out, _stopped, now = _tracker()
    _feed(t, stream, [c % (len(stream) + 1) for c in cuts], 1000, cap=cap)
    t.segment(Segment(KIND_CLOSE, COOKIE, 2, 0, 0, b""))
    now[0] += IDLE_SECONDS + 1
    t.tick()
    paths = {f"/latest/meta-data/item{i}" for i in range(n)}
    assert out  # the connection is always reported, as a request or a connection
    for d in out:
        if d["event"]["action"] == "http_request":
            # a request read from partial bytes may have a cut path, never a foreign one
            assert any(p.startswith(d["url"]["path"]) for p in paths), d["url"]
    assert not t.conns and len(t.conns) == 0


def test_not_http_stops_capture_and_reports_once():
    t, out, stopped, now = _tracker()
    t.segment(Segment(KIND_DATA, COOKIE, 1, 10, 5, b"\x16\x03\x01\x00\x10"))
    t.segment(Segment(KIND_DATA, COOKIE, 1, 15, 5, b"GET /"))
    now[0] += 5
    t.tick()
    assert stopped == [COOKIE]
    assert len(out) == 1 and out[0]["imdswatch"]["request"] == {"unreadable": "tls"}


def test_idle_connection_reported_then_later_request_too():
    t, out, _stopped, now = _tracker()
    now[0] += IDLE_SECONDS + 0.1
    t.tick()
    assert len(out) == 1 and "url" not in out[0]
    t.segment(Segment(KIND_DATA, COOKIE, 1, 1, 20, b"GET /x HTTP/1.1\r\n\r\n"))
    assert len(out) == 2 and out[1]["url"]["path"] == "/x"


def test_reported_connection_keeps_a_compact_copy_and_later_requests_see_it_all():
    """Once a connection's document has gone out, the tracker keeps it marshalled (a flood
    of refused connects held ~45 MB of dicts otherwise); every later document is derived
    from it with all the original fields, and none changes one already emitted."""
    t, out, _stopped, now = _tracker()
    now[0] += IDLE_SECONDS + 0.1
    t.tick()
    first = out[0]
    snapshot = repr(first)
    assert isinstance(t.conns[COOKIE].doc, bytes)
    assert len(t.conns[COOKIE].doc) < 200
    t.segment(Segment(KIND_DATA, COOKIE, 1, 1, 40,
                      b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n"))
    assert [d["url"]["path"] for d in out[1:]] == ["/a", "/b"]
    for d in out[1:]:
        assert d["process"] == {"name": "c"} and d["event"]["action"] == "http_request"
    assert [d["event"]["id"] for d in out[1:]] == ["x-r1", "x-r2"]
    assert repr(first) == snapshot and "url" not in first


def test_connection_table_is_bounded(monkeypatch):
    import tracer.requests as r

    monkeypatch.setattr(r, "MAX_CONNECTIONS", 10)
    t, out, _stopped, _now = _tracker()
    base = KernelEvent(ts_ns=1, tid=5, tgid=5, uid=0, gid=0, cgroup_id=1, comm="c", family=2,
                       dst_ip="169.254.169.254", dst_port=80, probe="cgroup", result=None,
                       kind=KIND_CONNECT)
    for cookie in range(1000, 1100):
        base.cookie = cookie
        t.connection(base, {"event": {"id": str(cookie), "action": "connection_attempted"}})
    assert len(t.conns) == 10 and t.stats.evicted == 91
    assert len(out) == 91  # evicted before their request: reported as connections
