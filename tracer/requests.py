"""Request capture in userspace: the kernel's records of one metadata connection (its connect
or first SYN, then the first bytes of each segment the caller sent, then its FIN/RST) become
one ECS document per HTTP request, each joined to the process that connected.

Why here and not in BPF: the kernel copies at most IMDS_CAPTURE_BYTES of each segment of a
tracked connection (only metadata connections are tracked), so the cost is bounded there;
reassembling segments, following keep-alive and pipelined requests, Content-Length bodies,
retransmissions and gaps is stateful work that bounded BPF loops would do badly and that a
few hundred lines of Python do exactly, on bounded input: at most MAX_BUFFER bytes held per
connection and MAX_CONNECTIONS connections.

What is emitted (contract section 1):
- every complete request: the connection's document with `event.action: http_request`,
  `http.request.method`, `url.path`, `url.query`, `user_agent.original`,
  `imdswatch.request.guarded` (whether the anti-SSRF header is present, never its value);
- a connection whose first bytes are not HTTP (TLS, anything else): the connection's document
  with `imdswatch.request.unreadable` ("tls", "not_http", "oversized", "chunked", "gap"); its
  capture is stopped in the kernel (`stop(cookie)`);
- a connection that sent no request within IDLE_SECONDS, or closed without one: the plain
  connection document, so nothing that connects goes unreported. A request arriving after
  that is still reported (the connection then counts twice, which is the lesser evil).
"""

from __future__ import annotations

import logging
import marshal
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from tracer import http
from tracer.layout import F_SOCK_MATCH, KIND_CLOSE, KIND_SYN, KernelEvent, Segment

log = logging.getLogger("imdswatch.tracer")

IDLE_SECONDS = 1.0  # a connection silent this long is reported as a connection
JOIN_SECONDS = 1.0  # how long a connect waits for its SYN record (probe modes without cookie)
MAX_BUFFER = http.MAX_HEAD + 1024
MAX_CONNECTIONS = 8192
MAX_REQUESTS_PER_SEGMENT = 64  # pipelining bound: a segment of 1 KiB holds ~20 tiny requests


@dataclass(slots=True)
class _Conn:
    # The connection's document: the dict until it has gone out once, then marshalled
    # (`_doc` reads either). Up to MAX_CONNECTIONS connections are followed, reported ones
    # too (a keep-alive request may still come), and refused connects never close from
    # the caller's side: under a flood of them the table is full, and a marshalled
    # document is several times smaller than its dict.
    doc: dict | bytes
    created: float
    buf: bytearray = field(default_factory=bytearray)  # unparsed bytes from `pos` on
    pos: int | None = None  # stream position (TCP sequence) of the next request / of buf[0]
    synced: bool = True  # False after bytes were lost: wait for a segment starting a request
    requests: int = 0
    reported: bool = False  # a document for this connection has gone out


@dataclass(slots=True)
class RequestStats:
    requests: int = 0
    connections_without_request: int = 0
    unreadable: int = 0
    lost_sync: int = 0  # bytes of a request missing (segment longer than the capture, drops)
    unknown_segments: int = 0  # segments of a connection userspace does not know
    evicted: int = 0


def _seq_delta(a: int, b: int) -> int:
    """a - b in TCP sequence space (32-bit wrap-around)."""
    d = (a - b) & 0xFFFFFFFF
    return d - (1 << 32) if d >= 1 << 31 else d


class RequestTracker:
    """Joins kernel records into connections and emits their documents.

    `emit(doc)` receives each document; `stop(cookie)` asks the kernel to stop copying a
    connection's bytes; `wall(ts_ns)` turns a kernel timestamp into an RFC 3339 string."""

    def __init__(self, emit: Callable[[dict], None], stop: Callable[[int], None],
                 wall: Callable[[int], str], clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self.emit = emit
        self.stop = stop
        self.wall = wall
        self.clock = clock
        # cookie -> connection, least recently active first (evicted first when full)
        self.conns: OrderedDict[int, _Conn] = OrderedDict()
        # cookies of connections not reported yet, oldest first (the idle check's queue)
        self._unreported: OrderedDict[int, float] = OrderedDict()
        # probe modes whose connect event has no cookie: connect docs and SYN records by
        # thread id, waiting for each other (tid -> (time, doc or cookie))
        self._connects: dict[int, tuple[float, dict]] = {}
        self._syns: dict[int, tuple[float, KernelEvent, dict]] = {}
        self.stats = RequestStats()

    # -- kernel records ------------------------------------------------------------------

    def connection(self, ev: KernelEvent, doc: dict) -> None:
        """A connect event (from the connect probe) or a SYN record (from the egress
        program), already enriched into `doc`."""
        now = self.clock()
        if ev.kind == KIND_SYN:
            if ev.flags & F_SOCK_MATCH:
                # The connect probe reports this connection: pair its doc with this cookie.
                waiting = self._connects.pop(ev.tid, None)
                if waiting is not None:
                    self._open(ev.cookie, waiting[1], now)
                else:
                    old = self._syns.pop(ev.tid, None)
                    if old is not None:
                        # The thread's previous SYN never met its connect event (lost):
                        # it stands alone now rather than being replaced (a flood from one
                        # thread would lose all but the last).
                        self._open(old[1].cookie, old[2], old[0])
                    self._syns[ev.tid] = (now, ev, doc)
                    self._bound_waiting()
                return
            self._open(ev.cookie, doc, now)  # seen only after NAT: its own connection
            return
        if ev.cookie:
            self._open(ev.cookie, doc, now)
            return
        syn = self._syns.pop(ev.tid, None)
        if syn is not None:
            self._open(syn[1].cookie, doc, now)
        else:
            old_connect = self._connects.pop(ev.tid, None)
            if old_connect is not None:
                # The thread connects again: its previous connect sent no SYN (it failed
                # before one, e.g. no route), so it is reported now, not replaced.
                self.stats.connections_without_request += 1
                self.emit(old_connect[1])
            self._connects[ev.tid] = (now, doc)
            self._bound_waiting()

    def segment(self, seg: Segment) -> None:
        conn = self.conns.get(seg.cookie)
        if conn is None:
            self.stats.unknown_segments += 1
            return
        if seg.kind == KIND_CLOSE:
            self._close(seg.cookie, conn, seg.ts_ns)
            return
        self.conns.move_to_end(seg.cookie)
        self._add(seg.cookie, conn, seg)

    def tick(self) -> None:
        """Report connections silent for IDLE_SECONDS and unpaired connects (call often)."""
        now = self.clock()
        while self._unreported:
            cookie, created = next(iter(self._unreported.items()))
            if now - created < IDLE_SECONDS:
                break  # oldest first
            del self._unreported[cookie]
            conn = self.conns.get(cookie)
            if conn is not None and not conn.reported:
                # Still followed afterwards (keep-alive) until it closes or is evicted.
                self._report_connection(conn, followed=True)
        for tid, (t, doc) in list(self._connects.items()):
            if now - t >= JOIN_SECONDS:
                # No SYN followed (the connect failed before sending one): a connection.
                del self._connects[tid]
                self.stats.connections_without_request += 1
                self.emit(doc)
        for tid, (t, ev, doc) in list(self._syns.items()):
            if now - t >= JOIN_SECONDS:
                # The connect event never came (dropped): the SYN record stands for it.
                del self._syns[tid]
                self._open(ev.cookie, doc, t)

    def _bound_waiting(self) -> None:
        """Unpaired records are bounded too: beyond MAX_CONNECTIONS the oldest stands alone
        at once (dicts keep insertion order)."""
        while len(self._connects) > MAX_CONNECTIONS:
            tid = next(iter(self._connects))
            self.stats.connections_without_request += 1
            self.emit(self._connects.pop(tid)[1])
        while len(self._syns) > MAX_CONNECTIONS:
            tid = next(iter(self._syns))
            t, ev, doc = self._syns.pop(tid)
            self._open(ev.cookie, doc, t)

    def flush(self) -> None:
        """Report everything still pending (at shutdown)."""
        for cookie, conn in list(self.conns.items()):
            self._close(cookie, conn, None)
        for _t, doc in self._connects.values():
            self.emit(doc)
        for _t, _ev, doc in self._syns.values():
            self.emit(doc)
        self._connects.clear()
        self._syns.clear()

    # -- connections -----------------------------------------------------------------------

    def _open(self, cookie: int, doc: dict, now: float) -> None:
        old = self.conns.pop(cookie, None)
        if old is not None:  # a reused cookie cannot happen; an old record can linger
            self._close(cookie, old, None)
        while len(self.conns) >= MAX_CONNECTIONS:
            # (The kernel's own table is LRU too: no need to tell it.)
            c_old, conn_old = self.conns.popitem(last=False)
            self._unreported.pop(c_old, None)
            self.stats.evicted += 1
            if not conn_old.reported:
                self._report_connection(conn_old)
        self.conns[cookie] = _Conn(doc, now)
        self._unreported[cookie] = now

    def _close(self, cookie: int, conn: _Conn, ts_ns: int | None) -> None:
        self.conns.pop(cookie, None)
        self._unreported.pop(cookie, None)
        if conn.buf and conn.synced:
            kind = http.first_bytes_kind(bytes(conn.buf[:17]))
            req = http.parse_head(bytes(conn.buf[:http.MAX_HEAD]).split(b"\r\n\r\n")[0],
                                  truncated=True) if kind is None else None
            if req is not None:
                self._report_request(conn, req, ts_ns)
            elif not conn.reported:
                self._report_unreadable(conn, kind or "incomplete")
        if not conn.reported:
            self._report_connection(conn)

    def _add(self, cookie: int, conn: _Conn, seg: Segment) -> None:
        data, start = seg.data, seg.seq
        captured_end = (start + len(data)) & 0xFFFFFFFF
        seg_end = (start + seg.length) & 0xFFFFFFFF
        if conn.pos is None:
            # The stream's first segment, or the first after bytes were lost: only a
            # segment that starts a request can be read from.
            if not conn.synced and http.first_bytes_kind(data[:17]) is not None:
                return
            conn.synced = True
            conn.pos = start
        want = (conn.pos + len(conn.buf)) & 0xFFFFFFFF
        d = _seq_delta(start, want)
        if d < 0:  # overlap: a retransmission, or the tail of a body already skipped
            if len(data) <= -d:
                if _seq_delta(seg_end, want) > 0:
                    self._lose(conn)  # what we need next was in the uncaptured part
                return
            data = data[-d:]
        elif d > 0:  # bytes before this segment are missing
            self._lose(conn)
            if http.first_bytes_kind(data[:17]) is not None:
                return
            conn.synced = True
            conn.pos = start
        if not conn.buf and _seq_delta(conn.pos, (captured_end - len(data)) & 0xFFFFFFFF) > 0:
            # a body being skipped ends inside this segment
            skip = _seq_delta(conn.pos, (captured_end - len(data)) & 0xFFFFFFFF)
            if skip >= len(data):
                if len(data) < seg.length and _seq_delta(seg_end, conn.pos) > 0:
                    self._lose(conn)
                return
            data = data[skip:]
        conn.buf += data
        self._parse(cookie, conn, seg.ts_ns)
        if len(seg.data) < seg.length and cookie in self.conns and conn.pos is not None:
            # The segment's tail was not captured: a request that continues into it, or
            # starts in it, cannot be read.
            nxt = (conn.pos + len(conn.buf)) & 0xFFFFFFFF
            if conn.buf or _seq_delta(nxt, seg_end) < 0:
                self._lose(conn)

    def _parse(self, cookie: int, conn: _Conn, ts_ns: int) -> None:
        for _ in range(MAX_REQUESTS_PER_SEGMENT):
            if not conn.buf:
                return
            p = http.parse(bytes(conn.buf))
            if p.status == "need_more":
                if len(conn.buf) > MAX_BUFFER:
                    p = http.Parsed(None, 0, "oversized")
                else:
                    return
            if p.request is not None:
                self._report_request(conn, p.request, ts_ns)
            if p.status != "request":
                # Not HTTP, or nothing more we can follow: stop copying this connection.
                if p.request is None:
                    self._report_unreadable(conn, p.status)
                self._finish(cookie)
                return
            # conn.pos moves to the next request, past any body (which may extend beyond
            # the buffer: _add skips the rest as it comes).
            conn.pos = (conn.pos + p.consumed) & 0xFFFFFFFF
            del conn.buf[:p.consumed]
        if conn.buf:
            self._report_unreadable(conn, "oversized")
            self._finish(cookie)

    def _lose(self, conn: _Conn) -> None:
        """Part of the stream is missing: report what the buffer holds, then resynchronise
        on the next segment that starts with a request."""
        self.stats.lost_sync += 1
        if conn.buf:
            req = http.parse_head(bytes(conn.buf[:http.MAX_HEAD]).split(b"\r\n\r\n")[0],
                                  truncated=True)
            if req is not None:
                self._report_request(conn, req, None)
            elif not conn.reported:
                self._report_unreadable(conn, "gap")
        conn.buf.clear()
        conn.pos = None
        conn.synced = False

    def _finish(self, cookie: int) -> None:
        self.conns.pop(cookie, None)
        self._unreported.pop(cookie, None)
        self.stop(cookie)

    # -- documents ---------------------------------------------------------------------------

    @staticmethod
    def _doc(conn: _Conn) -> dict:
        d = conn.doc
        return marshal.loads(d) if isinstance(d, bytes) else d

    @staticmethod
    def _compact(conn: _Conn) -> None:
        """After its document went out, keep the connection's own copy small (the emitted
        dict belongs to the scorer now; later documents are derived from a fresh copy)."""
        if isinstance(conn.doc, dict):
            try:
                conn.doc = marshal.dumps(conn.doc)
            except ValueError:  # not plain data (never from tracer.ecs): keep the dict
                pass

    def _report_connection(self, conn: _Conn, followed: bool = False) -> None:
        """`followed`: the connection stays in the table, so its copy is kept compact
        (closed and evicted ones are dropped: nothing to keep)."""
        conn.reported = True
        self.stats.connections_without_request += 1
        doc = self._doc(conn)
        if followed:
            self._compact(conn)
        self.emit(doc)

    def _derived(self, conn: _Conn, ts_ns: int | None, action: str | None, n: int
                 ) -> tuple[dict, dict]:
        base = self._doc(conn)
        self._compact(conn)
        doc = dict(base)
        event = dict(base["event"])
        if action is not None:
            event["action"] = action
        if n:
            event["id"] = f"{event['id']}-r{n}"
        doc["event"] = event
        if ts_ns is not None:
            doc["@timestamp"] = self.wall(ts_ns)
        imds = dict(base.get("imdswatch", {}))
        doc["imdswatch"] = imds
        return doc, imds

    def _report_request(self, conn: _Conn, req: http.Request, ts_ns: int | None) -> None:
        conn.requests += 1
        conn.reported = True
        self.stats.requests += 1
        doc, imds = self._derived(conn, ts_ns, "http_request", conn.requests)
        doc["event"]["type"] = ["connection", "start"] if conn.requests == 1 else ["access"]
        doc["http"] = {"request": {"method": req.method}}
        url: dict = {"path": req.path}
        if req.query is not None:
            url["query"] = req.query
        doc["url"] = url
        if req.user_agent is not None:
            doc["user_agent"] = {"original": req.user_agent}
        request: dict = {"guarded": req.guarded, "sequence": conn.requests}
        if req.truncated:
            request["truncated"] = True
        imds["request"] = request
        self.emit(doc)

    def _report_unreadable(self, conn: _Conn, why: str) -> None:
        self.stats.unreadable += 1
        if conn.reported:
            return
        conn.reported = True
        doc, imds = self._derived(conn, None, None, 0)
        imds["request"] = {"unreadable": why}
        self.emit(doc)
