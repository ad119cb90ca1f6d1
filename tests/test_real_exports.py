# Metadata addresses here are event data only; nothing connects to them, so no netns is needed.
# Metadata addresses in this file are data (event fields, expected matches): nothing here
# connects to them.
"""Real exports replayed as they come: Elastic Defend network and process events,
Auditd Manager / Auditbeat `connected-to` events, Elasticsearch `_search` hits, whole
response pages and JSON arrays.

The fixtures carry the fields the integrations publish for these events (Elastic Defend:
elastic/endpoint-package custom_documentation for Linux "network connection attempt",
"network disconnect", "connection accepted" and "process exec"; Auditd Manager:
elastic/integrations packages/auditd_manager sample event and go-libaudit's
normalizations for connect(), accept() and bind()), with made-up values.
"""

from __future__ import annotations

import os
import subprocess
from collections import Counter
from pathlib import Path

import orjson

from intake.join import ProcessJoin
from intake.reader import read_events
from scoring.endpoints import EndpointCatalog

ROOT = Path(__file__).resolve().parents[1]
IMDSWATCH = ROOT / ".venv" / "bin" / "imdswatch"
CATALOG = EndpointCatalog.from_config()


def _agent() -> dict:
    return {"id": "8b1f6a5e-agent", "type": "endpoint", "version": "8.13.2"}


def _host(hostname: str = "ip-10-0-1-17", with_name: bool = True) -> dict:
    host = {"architecture": "x86_64", "hostname": hostname, "id": "ec2f1d0c9a7b",
            "ip": ["10.0.1.17"], "mac": ["0a-1b-2c-3d-4e-5f"],
            "os": {"Ext": {"variant": "Ubuntu"}, "family": "debian", "full": "Ubuntu 22.04",
                   "kernel": "6.5.0-1014-aws", "name": "Linux", "platform": "ubuntu",
                   "type": "linux", "version": "22.04"}}
    if with_name:
        host["name"] = hostname
    return host


def _meta(dataset: str, action: str, category: str, types: list[str], seq: int,
          outcome: str = "success") -> dict:
    return {
        "agent": _agent(),
        "data_stream": {"dataset": dataset, "namespace": "default", "type": "logs"},
        "ecs": {"version": "8.10.0"},
        "elastic": {"agent": {"id": "8b1f6a5e-agent"}},
        "event": {"action": action, "category": [category], "created": "2024-05-01T12:00:00Z",
                  "dataset": dataset, "id": f"Ndefend{seq:04d}", "kind": "event",
                  "module": "endpoint", "outcome": outcome, "sequence": seq,
                  "type": types},
        "message": "Endpoint event",
        "group": {"Ext": {"real": {"id": 0, "name": "root"}}, "id": 0, "name": "root"},
        "user": {"Ext": {"real": {"id": 33, "name": "www-data"}}, "id": "33",
                 "name": "www-data"},
    }


def defend_exec(ts: str, seq: int, entity: str, name: str, exe: str, cmd: str,
                parent_entity: str, parent_name: str, parent_exe: str, pid: int) -> dict:
    doc = _meta("endpoint.events.process", "exec", "process", ["start"], seq)
    doc.update({
        "@timestamp": ts,
        "host": _host(),
        "cloud": {"account": {"id": "123456789012"}, "provider": "aws", "region": "us-east-1"},
        "container": {"id": "5f0c1e2d3a4b", "image": {"name": "registry.local/shop/web",
                                                       "tag": "2.3.1"},
                      "name": "web"},
        "orchestrator": {"cluster": {"name": "prod"}, "namespace": "shop",
                         "resource": {"name": "web-6d8f7", "type": "pod"}},
        "process": {
            "Ext": {"ancestry": [parent_entity]},
            "args": cmd.split(), "args_count": len(cmd.split()), "command_line": cmd,
            "entity_id": entity, "executable": exe, "name": name, "pid": pid,
            "interactive": False, "working_directory": "/app",
            "entry_leader": {"entity_id": "E-init", "name": "containerd-shim"},
            "session_leader": {"entity_id": parent_entity, "name": parent_name},
            "group_leader": {"entity_id": entity, "name": name},
            "parent": {"entity_id": parent_entity, "name": parent_name,
                       "executable": parent_exe, "pid": pid - 1,
                       "args": [parent_exe], "command_line": parent_exe},
            "hash": {"sha256": "0" * 64},
        },
    })
    return doc


def defend_network(ts: str, seq: int, action: str, types: list[str], entity: str,
                   parent_entity: str, name: str, exe: str, pid: int,
                   dst: str = "169.254.169.254", port: int = 80,
                   host: dict | None = None, direction: str | None = None) -> dict:
    doc = _meta("endpoint.events.network", action, "network", types, seq)
    doc.update({
        "@timestamp": ts,
        "host": host or _host(),
        "destination": {"address": dst, "ip": dst, "port": port},
        "source": {"address": "10.0.1.17", "ip": "10.0.1.17", "port": 41000 + seq},
        "network": {"transport": "tcp", "type": "ipv4"},
        "process": {"Ext": {"ancestry": [parent_entity]}, "entity_id": entity,
                    "executable": exe, "name": name, "pid": pid,
                    "parent": {"entity_id": parent_entity},
                    "entry_leader": {"entity_id": "E-init"},
                    "session_leader": {"entity_id": parent_entity},
                    "group_leader": {"entity_id": entity}, "uptime": 2},
    })
    if direction:
        doc["network"]["direction"] = direction
    if action == "disconnect_received":
        doc["destination"]["bytes"] = 1432
        doc["source"]["bytes"] = 312
    return doc


def defend_export() -> list[dict]:
    """A web shell's python3 (parent gunicorn) fetches credentials twice; each connection
    is reported as attempted, then disconnected; the host also accepted one connection."""
    return [
        defend_exec("2024-05-01T12:00:00.000Z", 1, "E-gunicorn", "gunicorn",
                    "/usr/local/bin/gunicorn", "gunicorn app:app", "E-init",
                    "containerd-shim", "/usr/bin/containerd-shim-runc-v2", 700),
        defend_exec("2024-05-01T12:00:01.000Z", 2, "E-py", "python3", "/usr/bin/python3",
                    "python3 -c import urllib.request", "E-gunicorn", "gunicorn",
                    "/usr/local/bin/gunicorn", 701),
        defend_network("2024-05-01T12:00:01.100Z", 3, "connection_attempted", ["start"],
                       "E-py", "E-gunicorn", "python3", "/usr/bin/python3", 701),
        defend_network("2024-05-01T12:00:01.300Z", 4, "disconnect_received", ["end"],
                       "E-py", "E-gunicorn", "python3", "/usr/bin/python3", 701,
                       direction="egress"),
        defend_network("2024-05-01T12:00:02.100Z", 5, "connection_attempted", ["start"],
                       "E-py", "E-gunicorn", "python3", "/usr/bin/python3", 701,
                       host=_host("ip-10-0-1-17", with_name=False)),
        defend_network("2024-05-01T12:00:02.300Z", 6, "disconnect_received", ["end"],
                       "E-py", "E-gunicorn", "python3", "/usr/bin/python3", 701),
        defend_network("2024-05-01T12:00:03.000Z", 7, "connection_accepted", ["start"],
                       "E-sshd", "E-init", "sshd", "/usr/sbin/sshd", 600),
        # Ordinary traffic elsewhere, as in any whole network export.
        defend_network("2024-05-01T12:00:04.000Z", 8, "connection_attempted", ["start"],
                       "E-py", "E-gunicorn", "python3", "/usr/bin/python3", 701,
                       dst="10.0.5.9", port=5432),
    ]


def auditd_connect(ts: str, seq: int, outcome: str, action: str = "connected-to",
                   syscall: str = "connect") -> dict:
    """An Auditd Manager event for connect() (go-libaudit's normalisation): the parent pid
    only, the proctitle as process.title."""
    return {
        "@timestamp": ts,
        "agent": {"type": "auditbeat", "version": "8.13.2", "name": "node-7"},
        "auditd": {
            "data": {"a0": "3", "a1": "7ffd5c6a1b68", "a2": "10", "arch": "x86_64",
                     "exit": "0" if outcome == "success" else "-111", "syscall": syscall,
                     "socket": {"family": "ipv4", "addr": "169.254.169.254", "port": "80"},
                     "tty": "(none)"},
            "message_type": "syscall", "result": outcome, "sequence": seq,
            "summary": {"actor": {"primary": "unset", "secondary": "root"},
                        "how": "/usr/bin/wget",
                        "object": {"primary": "169.254.169.254", "secondary": "80",
                                   "type": "socket"}},
        },
        "data_stream": {"dataset": "auditd_manager.auditd", "namespace": "default",
                        "type": "logs"},
        "destination": {"ip": "169.254.169.254", "port": 80},
        "ecs": {"version": "8.0.0"},
        "event": {"action": action, "category": ["network"], "kind": "event",
                  "module": "auditd", "outcome": outcome, "sequence": seq,
                  "type": ["connection", "start"] if action == "connected-to"
                  else ["connection", "info"]},
        "host": {"name": "node-7"},
        "network": {"direction": "egress"},
        "process": {"executable": "/usr/bin/wget", "name": "wget", "pid": 5151,
                    "parent": {"pid": 5150},
                    "title": "wget -q -O- http://169.254.169.254/latest/user-data"},
        "service": {"type": "auditd"},
        "tags": ["auditd_manager-auditd"],
        "user": {"id": "0", "name": "root", "group": {"id": "0", "name": "root"}},
    }


def read(lines: list[bytes], join: ProcessJoin | None = None):
    bad: list = []
    skipped: Counter = Counter()
    join = join if join is not None else ProcessJoin()
    out = list(read_events(enumerate(lines, 1), CATALOG.match,
                           lambda n, r, k: bad.append((n, r)), skipped, join))
    return [e for _, e, _ in out], bad, skipped, join


def test_defend_each_connection_is_one_call_with_parent_and_command_line():
    events, bad, skipped, join = read([orjson.dumps(d) for d in defend_export()])
    assert not bad
    assert len(events) == 2  # two attempts; disconnects and the accepted one are not calls
    for e in events:
        assert (e.name, e.exe, e.user) == ("python3", "/usr/bin/python3", "www-data")
        # Joined from the process's exec event, by process.entity_id:
        assert (e.parent_name, e.parent_exe) == ("gunicorn", "/usr/local/bin/gunicorn")
        assert e.command_line == "python3 -c import urllib.request"
        assert (e.image, e.namespace, e.pod) == ("registry.local/shop/web", "shop",
                                                 "web-6d8f7")
        assert e.host == "ip-10-0-1-17"  # host.hostname when host.name is missing (2nd)
    assert skipped["not a connection start (event.action disconnect_received)"] == 2
    assert skipped["not a connection start (event.action connection_accepted)"] == 1
    assert skipped["process event (kept for the entity-id join)"] == 2
    assert skipped["not a metadata endpoint"] == 1
    assert join.filled == 2


def test_join_fills_the_parent_from_the_parents_own_event():
    """No exec event for the caller itself: its parent's event (by
    process.parent.entity_id) still names the parent."""
    export = defend_export()
    del export[1]  # the python3 exec event
    events, _, _, _ = read([orjson.dumps(d) for d in export])
    assert [e.parent_name for e in events] == ["gunicorn", "gunicorn"]
    assert events[0].command_line is None


def test_join_memory_is_bounded():
    join = ProcessJoin(max_entities=3)
    lines = []
    for i in range(10):
        lines.append(orjson.dumps(defend_exec(
            f"2024-05-01T12:00:{i:02d}.000Z", i, f"E-{i}", f"p{i}", f"/bin/p{i}", f"p{i}",
            "E-init", "init", "/sbin/init", 100 + i)))
    lines.append(orjson.dumps(defend_network("2024-05-01T12:01:00.000Z", 99,
                                             "connection_attempted", ["start"], "E-0",
                                             "E-init", "p0", "/bin/p0", 100)))
    lines.append(orjson.dumps(defend_network("2024-05-01T12:01:01.000Z", 100,
                                             "connection_attempted", ["start"], "E-9",
                                             "E-init", "p9", "/bin/p9", 109)))
    events, _, _, join = read(lines, join)
    assert len(join) == 3 and join.evicted == 7
    assert events[0].parent_name is None  # forgotten: never a wrong parent
    assert events[1].parent_name == "init"


def test_join_ignores_entities_older_than_its_window():
    join = ProcessJoin(max_age=3600)
    export = defend_export()
    late = defend_network("2024-05-02T12:00:01.100Z", 50, "connection_attempted", ["start"],
                          "E-py", "E-gunicorn", "python3", "/usr/bin/python3", 701)
    events, _, _, _ = read([orjson.dumps(d) for d in [*export[:2], late]], join)
    assert events[0].parent_name is None


def test_auditd_manager_connects_are_calls_failed_or_not():
    lines = [orjson.dumps(auditd_connect("2024-05-01T12:00:00.000Z", 1, "success")),
             orjson.dumps(auditd_connect("2024-05-01T12:00:01.000Z", 2, "failure")),
             orjson.dumps(auditd_connect("2024-05-01T12:00:02.000Z", 3, "success",
                                         "accepted-connection-from", "accept4")),
             orjson.dumps(auditd_connect("2024-05-01T12:00:03.000Z", 4, "success",
                                         "bound-socket", "bind"))]
    events, bad, skipped, _ = read(lines)
    assert not bad
    assert len(events) == 2
    for e in events:
        assert (e.name, e.exe, e.pid, e.ppid, e.user, e.uid, e.host) == (
            "wget", "/usr/bin/wget", 5151, 5150, "root", "0", "node-7")
        assert e.command_line == "wget -q -O- http://169.254.169.254/latest/user-data"
        assert e.parent_name is None
    assert skipped["not a connection start (event.action accepted-connection-from)"] == 1
    assert skipped["not a connection start (event.action bound-socket)"] == 1


def _hit(doc: dict, i: int) -> dict:
    return {"_index": ".ds-logs-endpoint.events.network-default-2024.05.01-000001",
            "_id": f"hit-{i}", "_score": None, "_source": doc, "sort": [i]}


def _plain(i: int, name: str = "curl") -> dict:
    return {"@timestamp": f"2024-05-01T12:00:{i:02d}.000Z",
            "destination": {"ip": "169.254.169.254", "port": 80},
            "process": {"name": name, "executable": f"/usr/bin/{name}"},
            "host": {"hostname": "node-1"}}


def test_search_hits_pages_and_arrays_are_documents():
    hits = [_hit(_plain(i), i) for i in range(3)]
    page = {"took": 4, "timed_out": False,
            "_shards": {"total": 1, "successful": 1, "skipped": 0, "failed": 0},
            "hits": {"total": {"value": 3, "relation": "eq"}, "max_score": None,
                     "hits": [_hit(_plain(10 + i), 10 + i) for i in range(3)]}}
    flat_hit = _hit({"@timestamp": "2024-05-01T12:00:30.000Z",
                     "destination.ip": "169.254.169.254", "process.name": "wget"}, 30)
    lines = [*(orjson.dumps(h) for h in hits), orjson.dumps(page),
             orjson.dumps([_plain(20), _plain(21)]), orjson.dumps(flat_hit)]
    events, bad, _, _ = read(lines)
    assert not bad
    assert len(events) == 3 + 3 + 2 + 1
    assert [e.event_id for e in events[:3]] == ["hit-0", "hit-1", "hit-2"]  # _id
    assert all(e.host == "node-1" for e in events[:8])
    assert events[-1].name == "wget"
    # Alerts copy the document, which is the hit's _source.
    assert events[0].doc["process"]["name"] == "curl" and "_source" not in events[0].doc


def test_a_bad_hit_in_a_page_is_reported_with_its_index():
    page = {"hits": {"hits": [_hit(_plain(1), 1),
                              _hit({**_plain(2), "@timestamp": "nan"}, 2)]}}
    events, bad, _, _ = read([orjson.dumps(page)])
    assert len(events) == 1
    assert bad == [(1, "hit 1: @timestamp 'nan' is not a finite time")]


def test_replay_of_a_defend_export_counts_every_line(tmp_path):
    path = tmp_path / "defend.ndjson"
    path.write_bytes(b"".join(orjson.dumps(d) + b"\n" for d in defend_export()))
    r = subprocess.run([str(IMDSWATCH), "replay", str(path), "--output", os.devnull],
                       capture_output=True, timeout=60)
    err = r.stderr.decode()
    assert r.returncode == 0, err
    assert "metadata events scored: 2 " in err
    assert "skipped (not a metadata endpoint): 1" in err
    assert "skipped (not a metadata call): 5" in err
    assert "disconnect_received) 2" in err and "connection_accepted) 1" in err
    assert "filled from the export's process events: 2" in err
    assert "malformed lines: 0" in err


def test_a_pretty_printed_search_response_is_read_whole(tmp_path):
    """As Kibana Dev Tools or `curl ...?pretty` show it: one document over many lines."""
    import json

    page = {"took": 3, "hits": {"total": {"value": 2}, "hits": [
        _hit(_plain(1), 1), _hit(_plain(2, "wget"), 2)]}}
    path = tmp_path / "page.json"
    path.write_text(json.dumps(page, indent=2) + "\n")
    r = subprocess.run([str(IMDSWATCH), "replay", str(path), "--output", os.devnull],
                       capture_output=True, timeout=60)
    err = r.stderr.decode()
    assert r.returncode == 0, err
    assert "metadata events scored: 2 " in err and "malformed lines: 0" in err
    array = tmp_path / "array.json"
    array.write_text(json.dumps([_plain(3), _plain(4)], indent=1))
    events, bad, _, _ = read(array.read_bytes().splitlines())
    assert not bad and len(events) == 2
