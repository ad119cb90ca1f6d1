"""The event record the model scores: one call to (possibly) a metadata endpoint.

Events are made by the one reader of ECS documents (`intake.parser.read_doc`) from live
documents and replayed lines alike. The original document rides along (the dict, or the
raw line decoded on demand) so alerts can copy its fields.
"""

from __future__ import annotations

from typing import Any

import msgspec

# Every attribute of an Event, in the order of its arguments: the one list of them. The
# lists of the reader's hand-over are derived from it, and tests check the few places that
# spell the fields out for speed (the constructor, the hand-over's unpacking) against it.
EVENT_FIELDS = (
    "ts", "dst_ip", "name", "dst_port", "pid", "exe", "command_line", "ppid",
    "parent_name", "parent_exe", "user", "uid", "host", "container_id", "image",
    "namespace", "pod", "cloud", "event_id", "action", "method", "path", "query",
    "user_agent", "guarded", "thread_name", "exe_mismatch", "kernel_exe", "proc_exe",
    "container_unknown", "_doc", "_raw",
)


class Event:
    """One connection attempt to (possibly) a metadata endpoint, at event time `ts`."""

    __slots__ = EVENT_FIELDS

    def __init__(
        self,
        ts: float,
        dst_ip: str,
        name: str,
        # Positional too: `read_doc` passes every field by position, which costs a
        # quarter of matching 25 keywords on every replayed event.
        dst_port: int | None = None,
        pid: int | None = None,
        exe: str | None = None,
        command_line: str | None = None,
        ppid: int | None = None,
        parent_name: str | None = None,
        parent_exe: str | None = None,
        user: str | None = None,
        uid: str | None = None,
        host: str | None = None,
        container_id: str | None = None,
        image: str | None = None,
        namespace: str | None = None,
        pod: str | None = None,
        cloud: str | None = None,
        event_id: str | None = None,
        action: str | None = None,
        method: str | None = None,
        path: str | None = None,
        query: str | None = None,
        user_agent: str | None = None,
        guarded: bool | None = None,
        thread_name: str | None = None,
        exe_mismatch: bool | None = None,
        kernel_exe: str | None = None,
        proc_exe: str | None = None,
        container_unknown: bool | None = None,
        doc: dict | None = None,
        raw: bytes | None = None,
    ) -> None:
        self.ts = ts
        self.dst_ip = dst_ip
        self.dst_port = dst_port
        self.name = name
        self.pid = pid
        self.exe = exe
        self.command_line = command_line
        self.ppid = ppid
        self.parent_name = parent_name
        self.parent_exe = parent_exe
        self.user = user
        self.uid = uid
        self.host = host
        self.container_id = container_id
        self.image = image
        self.namespace = namespace
        self.pod = pod
        self.cloud = cloud
        self.event_id = event_id
        # The HTTP request on the connection (contract section 1); all None for a
        # connection whose request was not seen.
        self.action = action
        self.method = method
        self.path = path
        self.query = query
        self.user_agent = user_agent
        self.guarded = guarded
        # The calling thread's own name when it differs from the process's (io_uring
        # workers, JVM threads); `name` is always the thread-group leader's.
        self.thread_name = thread_name
        # The executable the kernel saw at connect time against /proc's, read later
        # (imdswatch.process.*): True when they differ (a copy that exec'd another binary
        # before /proc was read), False when the kernel's was checked and matched, None
        # when unknown (no kernel capture, replayed exports). `kernel_exe` (the kernel's
        # file name) and `proc_exe` (/proc's path) are kept for a mismatch only.
        self.exe_mismatch = exe_mismatch
        self.kernel_exe = kernel_exe
        self.proc_exe = proc_exe
        # True when the agent could not tell whether the caller runs in a container
        # (`container.id` in `imdswatch.identity.missing`, no image or pod either): the
        # container is unknown, not "the host".
        self.container_unknown = container_unknown
        # The raw line until `doc` decodes it, then the marker that `_doc` is safe.
        self._doc: Any = doc
        self._raw: Any = raw

    @property
    def doc(self) -> dict | None:
        """The ECS document the event came from, made safe to serialise (`safe_doc`).
        Replay keeps only the raw line and decodes it here, when an alert needs its
        fields: most events never do."""
        doc = self._doc
        if self._raw is _SAFE:
            return doc
        if doc is None:
            if self._raw is None:
                return None
            # msgspec, not orjson: it reads integers beyond 64 bits, as the line's decoder did.
            doc = msgspec.json.decode(self._raw)
            source = doc.get("_source") if isinstance(doc, dict) else None
            doc = source if isinstance(source, dict) else doc  # an Elasticsearch hit
        self._doc = doc = safe_doc(doc)
        self._raw = _SAFE
        return doc

    @property
    def is_request(self) -> bool:
        """True when the event carries an HTTP request (method or path seen)."""
        return self.method is not None or self.path is not None

    def signature(self) -> tuple:
        """Everything the detectors look at, apart from time: events with equal
        signatures are the same entity to the model."""
        # A user without a name is its uid (the detectors judge `uid:N`): two such users
        # must not share an entity.
        user = self.user if self.user is not None else (self.uid and f"uid:{self.uid}")
        sig: tuple = (self.name, self.exe, user, self.parent_name, self.image,
                      self.namespace, self.host)
        if self.exe_mismatch is not None:  # judged by the exe_mismatch detector
            sig = (*sig, self.exe_mismatch, self.kernel_exe, self.proc_exe)
        if self.container_unknown:
            sig = (*sig, "container unknown")
        if self.method is None and self.path is None:
            return sig
        # A request is judged on what it asks too (scoring.detectors): two requests of
        # one caller that ask different things are different entities.
        return (*sig, self.method, self.path, self.query, self.guarded, self.user_agent)

    def __repr__(self) -> str:
        return (
            f"Event(ts={self.ts}, name={self.name!r}, exe={self.exe!r}, user={self.user!r}, "
            f"dst={self.dst_ip}:{self.dst_port}, host={self.host!r})"
        )


# Nesting kept in a document that leaves in an alert; deeper values are replaced. The
# parser itself refuses lines nested past the interpreter's recursion guard (~1000).
MAX_DOC_DEPTH = 32
_INT64 = (-(2**63), 2**64 - 1)
_SAFE: Any = object()  # in `_raw`: the doc has been made safe


def safe_doc(doc: Any) -> Any:
    """`doc` itself when every value can be written back as JSON by the alert writer, else a
    copy where containers nested deeper than MAX_DOC_DEPTH are the string "[nested too
    deeply]" and integers beyond 64 bits are strings."""
    stack = [(doc, 0)]
    while stack:
        v, depth = stack.pop()
        if v.__class__ is dict:
            if depth >= MAX_DOC_DEPTH:
                return _pruned(doc, 0)
            stack.extend((x, depth + 1) for x in v.values())
        elif v.__class__ is list:
            if depth >= MAX_DOC_DEPTH:
                return _pruned(doc, 0)
            stack.extend((x, depth + 1) for x in v)
        elif v.__class__ is int and not _INT64[0] <= v <= _INT64[1]:
            return _pruned(doc, 0)
    return doc


def _pruned(v: Any, depth: int) -> Any:
    if v.__class__ is dict or v.__class__ is list:
        if depth >= MAX_DOC_DEPTH:
            return "[nested too deeply]"
        if v.__class__ is dict:
            return {k: _pruned(x, depth + 1) for k, x in v.items()}
        return [_pruned(x, depth + 1) for x in v]
    if v.__class__ is int and not _INT64[0] <= v <= _INT64[1]:
        return str(v)
    return v


