"""A typed schema of the ECS fields imdswatch reads, for msgspec's schema-driven decoder.

Decoding straight into these structs parses each line once, skips every field we do not
need without building it, and type-checks what we keep, which makes replay cost close to
the bare parse. Anything the schema cannot take (flattened dotted keys, a port sent as a
string, a naive timestamp) falls back to the generic path in `scoring.events`, which
either reads it or explains why not, so the two paths accept exactly the same input.

The structs hold only strings, numbers and each other, so they cannot form cycles:
`gc=False` keeps the garbage collector from walking the reorder buffer's thousands of
them on every collection.
"""

from __future__ import annotations

from datetime import datetime

import msgspec
from msgspec import Struct, field


class _Destination(Struct, gc=False):
    ip: str | None = None
    port: int | None = None


class _Parent(Struct, gc=False):
    name: str | None = None
    pid: int | None = None
    executable: str | None = None


class _Process(Struct, gc=False):
    name: str | None = None
    thread: msgspec.Raw = msgspec.Raw(b"")
    pid: int | None = None
    executable: str | None = None
    command_line: str | None = None
    parent: _Parent | None = None


class _Named(Struct, gc=False):
    name: str | None = None


class _User(Struct, gc=False):
    name: str | None = None
    id: str | int | None = None


class _Host(Struct, gc=False):
    name: str | None = None
    id: str | None = None


class _Container(Struct, gc=False):
    id: str | None = None
    image: _Named | None = None


class _Orchestrator(Struct, gc=False):
    namespace: str | None = None
    resource: _Named | None = None


class _Cloud(Struct, gc=False):
    provider: str | None = None


class _EventMeta(Struct, gc=False):
    id: str | None = None
    action: str | None = None


class EcsDoc(Struct, gc=False):
    timestamp: datetime | float | None = field(default=None, name="@timestamp")
    destination: _Destination | None = None
    process: _Process | None = None
    user: _User | None = None
    host: _Host | None = None
    container: _Container | None = None
    orchestrator: _Orchestrator | None = None
    cloud: _Cloud | None = None
    event: _EventMeta | None = None
    # Request fields (contract section 1) are rare in exports and read by the generic
    # path: their presence alone sends a document there.
    http: msgspec.Raw = msgspec.Raw(b"")
    url: msgspec.Raw = msgspec.Raw(b"")
    user_agent: msgspec.Raw = msgspec.Raw(b"")
    imdswatch: msgspec.Raw = msgspec.Raw(b"")


# Invalid UTF-8 is a UnicodeDecodeError here; the generic path reports it as bad JSON.
SchemaMismatch = (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError)


def decoder() -> msgspec.json.Decoder:
    return msgspec.json.Decoder(EcsDoc)
