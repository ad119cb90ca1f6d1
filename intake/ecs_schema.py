"""The typed schema of the ECS fields imdswatch reads: the one place that says which type
each field may have. `scoring.events` applies the remaining rules (time range, ports, what
counts as a call) to a decoded `EcsDoc`, for replayed lines and live documents alike.

msgspec decodes a line straight into these structs: one pass, every field we do not need
skipped without being built, every field we keep type-checked on the way (a process name
that is a number or an object is refused with the field's path). The types are the
canonical ones; the other forms ECS allows (any field as an array, whose first value is the
primary one; an id written as a number; a pid or port as a decimal string; dotted keys)
are brought to them by `scoring.events.normalize` before the same decoding, only for the
documents that need it, so the common case pays for none of it.

The structs hold only strings, numbers and each other, so they cannot form cycles:
`gc=False` keeps the garbage collector from walking the thousands of them a replay holds.
Fields are declared in the order the agent (tracer/ecs.py) and common exports write them:
msgspec looks for the next declared field first, so a document in that order decodes a
few percent faster; any order decodes the same.
"""

from __future__ import annotations

import msgspec
from msgspec import Struct, field

Text = str | None
Ident = str | None
Number = int | None
# event.category and event.type are arrays in ECS; some exporters write one string.
Tags = list[str] | str | None


class _Destination(Struct, gc=False):
    ip: Text = None
    port: Number = None


class _Parent(Struct, gc=False):
    name: Text = None
    pid: Number = None
    executable: Text = None
    entity_id: Text = None


class _Thread(Struct, gc=False):
    name: Text = None


class _Process(Struct, gc=False):
    name: Text = None
    pid: Number = None
    executable: Text = None
    command_line: Text = None
    parent: _Parent | None = None
    # The proctitle (Auditd Manager and Auditbeat): the command line when there is no other.
    title: Text = None
    entity_id: Text = None
    thread: _Thread | None = None


class _Named(Struct, gc=False):
    name: Text = None


class _User(Struct, gc=False):
    name: Text = None
    id: Ident = None


class _Host(Struct, gc=False):
    name: Text = None
    hostname: Text = None
    id: Ident = None


class _Container(Struct, gc=False):
    id: Text = None
    image: _Named | None = None


class _Orchestrator(Struct, gc=False):
    namespace: Text = None
    resource: _Named | None = None


class _Cloud(Struct, gc=False):
    provider: Text = None


class _EventMeta(Struct, gc=False):
    id: Ident = None
    category: Tags = None
    type: Tags = None
    action: Text = None


class _Network(Struct, gc=False):
    direction: Text = None


class _HttpRequest(Struct, gc=False):
    method: Text = None


class _Http(Struct, gc=False):
    request: _HttpRequest | None = None


class _Url(Struct, gc=False):
    path: Text = None
    query: Text = None


class _UserAgent(Struct, gc=False):
    original: Text = None


class _Request(Struct, gc=False):
    guarded: bool | None = None


class _KernelExecutable(Struct, gc=False):
    name: Text = None
    inode: Number = None


class _KernelProcess(Struct, gc=False):
    # What the kernel saw at connect time against what /proc showed later (tracer/ecs.py).
    exe_mismatch: bool | None = None
    kernel_executable: _KernelExecutable | None = None
    proc_executable: Text = None


class _Identity(Struct, gc=False):
    # The caller's fields the agent could not establish (contract section 6).
    missing: Tags = None


class _Imdswatch(Struct, gc=False):
    request: _Request | None = None
    process: _KernelProcess | None = None
    identity: _Identity | None = None


class _Hits(Struct, gc=False):
    hits: list[EcsDoc] | None = None


class EcsDoc(Struct, gc=False):
    timestamp: str | int | float | None = field(default=None, name="@timestamp")
    event: _EventMeta | None = None
    destination: _Destination | None = None
    network: _Network | None = None
    process: _Process | None = None
    user: _User | None = None
    host: _Host | None = None
    cloud: _Cloud | None = None
    container: _Container | None = None
    orchestrator: _Orchestrator | None = None
    http: _Http | None = None
    url: _Url | None = None
    user_agent: _UserAgent | None = None
    imdswatch: _Imdswatch | None = None
    # An Elasticsearch hit (a `_search` response's or elasticdump's line): the document is
    # its `_source`, the hit's `_id` stands in for a missing event.id.
    source: EcsDoc | None = field(default=None, name="_source")
    hit_id: str | None = field(default=None, name="_id")
    # A whole `_search` response page: {"hits": {"hits": [hit, ...]}}.
    hits: _Hits | None = None


# What a line or document that does not fit the schema raises. Invalid UTF-8 surfaces as
# a DecodeError; nesting past the interpreter's guard as a RecursionError (the depth cap
# in `scoring.events` refuses such lines before they get here).
SchemaMismatch = (msgspec.ValidationError, msgspec.DecodeError)


def decoder() -> msgspec.json.Decoder:
    return msgspec.json.Decoder(EcsDoc)


def convert(doc: dict) -> EcsDoc:
    """A decoded JSON object (a live document) into the schema, under the same type rules
    as a line. Raises `msgspec.ValidationError`."""
    return msgspec.convert(doc, EcsDoc)
