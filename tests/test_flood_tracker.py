# Metadata addresses here are event data only; nothing connects to them, so no netns is needed.
"""One thread's connect flood through request capture's joining of connect events and SYN
records (probe modes whose connect event carries no socket cookie pair them by thread id):
every connect is reported once, none silently replaced by the thread's next one. The live
agent under a name flood: tests/test_flood_agent.py."""

from __future__ import annotations

from tracer.layout import F_SOCK_MATCH, KIND_CONNECT, KIND_SYN, KernelEvent
from tracer.requests import IDLE_SECONDS, JOIN_SECONDS, RequestTracker

N = 1000
TID = 7


def _tracker() -> tuple[RequestTracker, list[dict], list[float]]:
    out: list[dict] = []
    now = [0.0]
    t = RequestTracker(out.append, lambda cookie: None, lambda ns: f"t{ns}",
                       clock=lambda: now[0])
    return t, out, now


def _event(i: int, kind: int, cookie: int = 0, flags: int = 0) -> KernelEvent:
    return KernelEvent(ts_ns=i, tid=TID, tgid=TID, uid=0, gid=0, cgroup_id=1, comm=f"n{i}",
                       family=2, dst_ip="169.254.169.254", dst_port=80, probe="kprobe",
                       result=None, kind=kind, flags=flags, cookie=cookie)


def _doc(i: int) -> dict:
    return {"event": {"id": f"e{i}", "action": "connection_attempted"}, "imdswatch": {},
            "process": {"name": f"n{i}"}}


def _ids(out: list[dict]) -> list[str]:
    return [d["event"]["id"] for d in out]


def test_connects_that_never_send_a_syn_are_each_reported():
    # A connect that fails before its SYN (no route to the address) leaves its document
    # waiting for a SYN record that never comes; the thread's next connect must not
    # replace it.
    t, out, now = _tracker()
    for i in range(N):
        t.connection(_event(i, KIND_CONNECT), _doc(i))
    now[0] += JOIN_SECONDS + IDLE_SECONDS + 0.1
    t.tick()
    t.flush()
    assert sorted(_ids(out)) == sorted(f"e{i}" for i in range(N))


def test_syn_records_without_their_connect_events_are_each_followed():
    # The connect events were lost (ring buffer full): each SYN record stands for its
    # connection, none replaced by the thread's next one.
    t, out, now = _tracker()
    for i in range(N):
        t.connection(_event(i, KIND_SYN, cookie=1000 + i, flags=F_SOCK_MATCH), _doc(i))
    now[0] += JOIN_SECONDS + IDLE_SECONDS + 0.1
    t.tick()
    t.flush()
    assert sorted(_ids(out)) == sorted(f"e{i}" for i in range(N))


def test_paired_flood_reports_each_connect_once():
    t, out, now = _tracker()
    for i in range(N):
        t.connection(_event(i, KIND_CONNECT), _doc(i))
        t.connection(_event(i, KIND_SYN, cookie=1000 + i, flags=F_SOCK_MATCH), _doc(i))
    now[0] += JOIN_SECONDS + IDLE_SECONDS + 0.1
    t.tick()
    t.flush()
    assert sorted(_ids(out)) == sorted(f"e{i}" for i in range(N))
