# Metadata addresses in this file are data (event fields, expected matches): nothing here
# connects to them. Real connections happen only inside a test's own network namespace
# (netns, tests/netns_fixtures.py).
"""Reading contract §1 ECS documents into Events (scoring.events.event_from_ecs)."""

from datetime import UTC, datetime

import pytest

from intake.parser import MalformedEvent, event_from_ecs
from scoring.events import EVENT_FIELDS, Event

NOON = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC).timestamp()  # 1714564800.0


def doc(**over):
    d = {
        "@timestamp": "2024-05-01T12:00:00Z",
        "destination": {"ip": "169.254.169.254", "port": 80},
        "process": {"name": "curl"},
    }
    d.update(over)
    return d


FULL = {
    "@timestamp": "2024-05-01T12:00:00.250Z",
    "event": {"id": "ev-42", "kind": "event", "category": ["network"]},
    "destination": {"ip": "169.254.169.254", "port": 80},
    "source": {"ip": "10.0.0.5", "port": 41234},
    "process": {
        "name": "curl", "pid": 4242, "executable": "/usr/bin/curl",
        "command_line": "curl -s http://169.254.169.254/latest/meta-data/",
        "parent": {"name": "bash", "pid": 4200, "executable": "/bin/bash"},
    },
    "user": {"name": "www-data", "id": "33"},
    "host": {"name": "node-1", "id": "i-0abc"},
    "container": {"id": "c0ffee", "image": {"name": "nginx:1.25"}},
    "orchestrator": {"namespace": "web", "resource": {"name": "web-7d9f"}},
    "cloud": {"provider": "aws"},
}


def test_full_document_every_field():
    e = event_from_ecs(FULL)
    assert isinstance(e, Event)
    assert e.ts == pytest.approx(NOON + 0.25)
    assert (e.dst_ip, e.dst_port) == ("169.254.169.254", 80)
    assert (e.name, e.pid, e.exe) == ("curl", 4242, "/usr/bin/curl")
    assert e.command_line == "curl -s http://169.254.169.254/latest/meta-data/"
    assert (e.parent_name, e.ppid, e.parent_exe) == ("bash", 4200, "/bin/bash")
    assert (e.user, e.uid) == ("www-data", "33")
    assert e.host == "node-1"
    assert (e.container_id, e.image) == ("c0ffee", "nginx:1.25")
    assert (e.namespace, e.pod) == ("web", "web-7d9f")
    assert e.cloud == "aws"
    assert e.event_id == "ev-42"
    assert e.doc is FULL


PUBLIC_FIELDS = ("ts", "dst_ip", "dst_port", "name", "pid", "exe", "command_line", "ppid",
                 "parent_name", "parent_exe", "user", "uid", "host", "container_id", "image",
                 "namespace", "pod", "cloud", "event_id")


def test_minimal_document_optional_fields_are_none():
    e = event_from_ecs(doc(destination={"ip": "169.254.169.254"}))
    assert e.name == "curl" and e.dst_ip == "169.254.169.254"
    for attr in ("dst_port", "pid", "exe", "command_line", "ppid", "parent_name", "user",
                 "uid", "host", "container_id", "image", "namespace", "pod", "cloud",
                 "event_id"):
        assert getattr(e, attr) is None, attr


def test_host_id_used_when_host_name_absent():
    assert event_from_ecs(doc(host={"id": "i-0abc"})).host == "i-0abc"


# -- @timestamp ----------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "expected"), [
    ("2024-05-01T12:00:00Z", NOON),
    ("2024-05-01T12:00:00.123Z", NOON + 0.123),
    ("2024-05-01T12:00:00.123456Z", NOON + 0.123456),
    ("2024-05-01T14:00:00+02:00", NOON),
    ("2024-05-01T07:30:00-04:30", NOON),
    ("2024-05-01T12:00:00+00:00", NOON),
    ("2024-05-01T12:00:00.123456789Z", NOON + 0.123456),  # nanosecond exports
    (1714564800, NOON),  # epoch seconds
    (1714564800.5, NOON + 0.5),
    (1714564800123, NOON + 0.123),  # epoch milliseconds
    (1714564800123.0, NOON + 0.123),
    ("1714564800", NOON),  # a number written as a string
])
def test_timestamps(value, expected):
    assert event_from_ecs(doc(**{"@timestamp": value})).ts == pytest.approx(expected, abs=1e-6)


def test_lower_case_rfc3339_separators():
    assert event_from_ecs(doc(**{"@timestamp": "2024-05-01t12:00:00z"})).ts == NOON


@pytest.mark.parametrize(("value", "words"), [
    ("2024-05-01T12:00:00", "time zone"),
    ("yesterday", "RFC 3339"),
    ("", "RFC 3339"),
    (True, "@timestamp: expected"),
    (None, "missing"),
    ({"t": 1}, "@timestamp: expected"),
])
def test_bad_timestamps_are_malformed_with_reason(value, words):
    with pytest.raises(MalformedEvent, match=words):
        event_from_ecs(doc(**{"@timestamp": value}))


def test_missing_timestamp():
    d = doc()
    del d["@timestamp"]
    with pytest.raises(MalformedEvent, match="@timestamp"):
        event_from_ecs(d)


# -- required fields -------------------------------------------------------------------------

@pytest.mark.parametrize(("mutate", "field"), [
    (lambda d: d.pop("destination"), "destination.ip"),
    (lambda d: d["destination"].pop("ip"), "destination.ip"),
    (lambda d: d["destination"].update(ip=""), "destination.ip"),
    (lambda d: d.pop("process"), "process.name"),
    (lambda d: d["process"].pop("name"), "process.name"),
    (lambda d: d["process"].update(name=[]), "process.name"),
])
def test_missing_required_field_names_it(mutate, field):
    d = doc()
    mutate(d)
    with pytest.raises(MalformedEvent) as info:
        event_from_ecs(d)
    assert field in str(info.value)
    assert "missing" in str(info.value)


@pytest.mark.parametrize("value", [[1, 2], "text", 3, None])
def test_not_an_object(value):
    with pytest.raises(MalformedEvent, match="not a JSON object"):
        event_from_ecs(value)


def test_malformed_event_is_a_value_error():
    assert issubclass(MalformedEvent, ValueError)


@pytest.mark.parametrize(("mutate", "field"), [
    (lambda d: d["destination"].update(port="http"), "destination.port"),
    (lambda d: d["destination"].update(port=80.5), "destination.port"),
    (lambda d: d["destination"].update(port=True), "destination.port"),
    (lambda d: d["process"].update(pid="-1"), "process.pid"),
    (lambda d: d["process"].update(parent={"pid": "one"}), "process.parent.pid"),
])
def test_non_integer_ints_are_malformed(mutate, field):
    d = doc()
    mutate(d)
    with pytest.raises(MalformedEvent, match=field):
        event_from_ecs(d)


def test_integer_strings_are_integers():
    e = event_from_ecs(doc(destination={"ip": "169.254.169.254", "port": "80"},
                           process={"name": "curl", "pid": "4242",
                                    "parent": {"pid": "1", "name": "systemd"}}))
    assert e.dst_port == 80 and isinstance(e.dst_port, int)
    assert e.pid == 4242 and e.ppid == 1


def test_numeric_ids_become_text():
    e = event_from_ecs(doc(user={"name": "root", "id": 0}, event={"id": 12345}))
    assert e.uid == "0"
    assert e.event_id == "12345"


# -- flattened (dotted-key) documents -------------------------------------------------------

def test_dotted_keys_are_read_like_nested():
    flat = {
        "@timestamp": "2024-05-01T12:00:00Z",
        "destination.ip": "169.254.169.254",
        "destination.port": 80,
        "process.name": "curl",
        "process.executable": "/usr/bin/curl",
        "process.parent.name": "bash",
        "user.name": "www-data",
        "host.name": "node-1",
        "container.image.name": "nginx:1.25",
        "orchestrator.namespace": "web",
        "orchestrator.resource.name": "web-1",
        "event.id": "ev-1",
    }
    e = event_from_ecs(flat)
    assert (e.dst_ip, e.dst_port, e.name, e.exe) == (
        "169.254.169.254", 80, "curl", "/usr/bin/curl")
    assert (e.parent_name, e.user, e.host) == ("bash", "www-data", "node-1")
    assert (e.image, e.namespace, e.pod, e.event_id) == ("nginx:1.25", "web", "web-1", "ev-1")
    assert e.ts == NOON


def test_partly_dotted_document_without_process_object():
    d = {"@timestamp": NOON, "destination": {"ip": "169.254.169.254"},
         "process.name": "curl", "process.parent.name": "sh"}
    e = event_from_ecs(d)
    assert (e.name, e.parent_name) == ("curl", "sh")


def test_mixed_nested_and_dotted_document():
    # Elasticsearch treats {"a.b": x} and {"a": {"b": x}} alike, so _source exports mix them.
    d = {"@timestamp": NOON, "process": {"name": "curl"},
         "process.executable": "/usr/bin/curl", "destination.ip": "169.254.169.254"}
    e = event_from_ecs(d)
    assert e.dst_ip == "169.254.169.254"
    assert e.exe == "/usr/bin/curl"


def test_dotted_missing_required_is_still_malformed():
    with pytest.raises(MalformedEvent, match="process.name"):
        event_from_ecs({"@timestamp": NOON, "destination.ip": "169.254.169.254",
                        "process.executable": "/usr/bin/curl"})


# -- arrays and unknown fields ---------------------------------------------------------------

def test_arrays_take_the_first_value():
    e = event_from_ecs(doc(
        destination={"ip": ["169.254.169.254", "10.0.0.1"], "port": 80},
        process={"name": ["curl", "wget"], "executable": ["/usr/bin/curl"]},
        user={"name": ["www-data"]},
        host={"name": ["node-1", "node-1.internal"]},
    ))
    assert (e.dst_ip, e.name, e.exe, e.user, e.host) == (
        "169.254.169.254", "curl", "/usr/bin/curl", "www-data", "node-1")


def test_empty_optional_array_is_none():
    assert event_from_ecs(doc(user={"name": []})).user is None


def test_unknown_fields_are_ignored():
    plain = event_from_ecs(doc())
    noisy = event_from_ecs(doc(
        agent={"type": "endpoint", "version": "8.13"},
        network={"transport": "tcp", "direction": "egress"},
        process={"name": "curl", "entity_id": "abc", "hash": {"sha256": "00"},
                 "future_field": [1, {"x": None}]},
        labels={"team": "x"},
        **{"some.dotted.unknown": 1},
    ))
    for attr in PUBLIC_FIELDS:
        assert getattr(noisy, attr) == getattr(plain, attr), attr


def test_empty_strings_are_absent():
    e = event_from_ecs(doc(process={"name": "curl", "executable": ""}, user={"name": ""}))
    assert e.exe is None and e.user is None


def _request_doc() -> dict:
    return {
        "@timestamp": "2026-11-30T10:00:00Z",
        "destination": {"ip": "169.254.169.254", "port": 80},
        "process": {"name": "curl", "thread": {"name": "iou-wrk-7"}},
        "event": {"action": "http_request"},
        "http": {"request": {"method": "PUT"}},
        "url": {"path": "/latest/api/token", "query": "a=b"},
        "user_agent": {"original": "curl/7.88.1"},
        "imdswatch": {"request": {"guarded": True}},
    }


def test_request_fields_are_read():
    ev = event_from_ecs(_request_doc())
    assert (ev.action, ev.method, ev.path, ev.query, ev.user_agent, ev.guarded) == (
        "http_request", "PUT", "/latest/api/token", "a=b", "curl/7.88.1", True)
    assert ev.thread_name == "iou-wrk-7"
    assert ev.is_request


def test_connection_event_has_no_request():
    doc = _request_doc()
    for k in ("http", "url", "user_agent", "imdswatch"):
        del doc[k]
    ev = event_from_ecs(doc)
    assert not ev.is_request and ev.guarded is None


def test_guarded_must_be_boolean():
    doc = _request_doc()
    doc["imdswatch"]["request"]["guarded"] = "yes"
    with pytest.raises(MalformedEvent, match="guarded"):
        event_from_ecs(doc)


def test_request_fields_read_alike_from_a_line():
    """One parser: a replayed line and a live document give the same Event."""
    import msgspec

    from intake.ecs_schema import decoder
    from intake.parser import read_doc
    line = msgspec.json.encode(_request_doc())
    ev, _ = read_doc(decoder().decode(line), raw=line)
    live = event_from_ecs(_request_doc())
    for slot in EVENT_FIELDS:
        if not slot.startswith("_"):
            assert getattr(ev, slot) == getattr(live, slot), slot


def _typed_values(names: tuple[str, ...]) -> list:
    """A distinct value per field, of the type the compiled Event accepts for it."""
    ev = Event(0.0, "x", "y")
    out = []
    flags = iter((True, False, True, False))
    for k, name in enumerate(names):
        if name in ("_doc", "_raw"):  # the document: a dict, or the line's bytes
            out.append(None if name == "_doc" else b"{}")
            continue
        for v in (f"v{k}", 1000 + k, 1000.5 + k, b"raw", None):
            try:
                setattr(ev, name, next(flags) if v is None else v)
                break
            except TypeError:
                continue
        out.append(getattr(ev, name))
    return out


def test_event_arguments_follow_the_one_list_of_fields():
    # EVENT_FIELDS is the order of Event's arguments: the reader's hand-over and the
    # parser pass every field by position, so the two must agree.
    names = tuple(n for n in EVENT_FIELDS if n != "_doc")
    values = _typed_values(EVENT_FIELDS)
    ev = Event(*values)
    for name in names:
        assert getattr(ev, name) == values[EVENT_FIELDS.index(name)], name


def test_every_text_field_is_capped():
    from intake.parser import _STRING_SLOTS

    doc = {
        "@timestamp": "2026-11-30T10:00:00Z", "event": {"action": "http_request", "id": "e"},
        "destination": {"ip": "169.254.169.254", "port": 80},
        "process": {"name": "curl", "pid": 7, "executable": "/usr/bin/curl",
                    "command_line": "curl x", "thread": {"name": "t"},
                    "parent": {"pid": 1, "name": "sh", "executable": "/bin/sh"}},
        "user": {"name": "root", "id": "0"}, "host": {"name": "h"},
        "container": {"id": "c", "image": {"name": "i"}},
        "orchestrator": {"namespace": "n", "resource": {"name": "p"}},
        "cloud": {"provider": "aws"}, "http": {"request": {"method": "GET"}},
        "url": {"path": "/", "query": "q"}, "user_agent": {"original": "ua"},
        "imdswatch": {"request": {"guarded": False},
                      "process": {"exe_mismatch": True, "kernel_executable": {"name": "k"},
                                  "proc_executable": "/p"}},
    }
    ev = event_from_ecs(doc)
    text = {n for n in EVENT_FIELDS if not n.startswith("_") and isinstance(getattr(ev, n), str)}
    assert text == set(_STRING_SLOTS)
