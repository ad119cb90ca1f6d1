"""The identity record's userspace side without a kernel: its layout and decoding, the /proc
seed, the cgroup-id resolver, and how an event's identity fields are chosen (the kernel's
record first, /proc for what it lacks, absent fields listed, never guessed)."""

from __future__ import annotations

import ctypes
import os

from hypothesis import given
from hypothesis import strategies as st

from tracer.cgroup_paths import CgroupPaths
from tracer.ecs import to_ecs
from tracer.enrich import ProcessInfo
from tracer.identity_seed import fill, stat_fields
from tracer.layout import (
    EVENT_SIZE,
    F_IDENTITY,
    F_RECORD,
    ID_ARGS,
    ID_ARGS_CUT,
    ID_EXEC,
    ID_PARENT,
    ID_PATH,
    RECORD_SIZE,
    CEvent,
    CIdent,
    KernelEvent,
    KernelIdentity,
    components_from_path,
    decode,
    path_from_components,
)

_component = st.text(st.characters(blacklist_characters="/\0", blacklist_categories=("Cs",)),
                     min_size=1, max_size=12)


@given(st.lists(_component, min_size=1, max_size=8))
def test_path_components_round_trip(parts):
    path = "/" + "/".join(parts)
    assert path_from_components(components_from_path(path)) == path


def test_malformed_components_give_no_path():
    assert path_from_components(b"") is None
    assert path_from_components(b"a\0\0b\0") is None  # an empty component: never guessed
    assert path_from_components(b"curl\0bin\0usr\0") == "/usr/bin/curl"


def _record(flags: int, path: str = "", args: bytes = b"", ppid: int = 0,
            pcomm: bytes = b"") -> bytes:
    ev = CEvent(kind=1, flags=F_RECORD | F_IDENTITY, tgid=42, pid=42, family=2, dport=80,
                probe=1)
    ev.comm = ev.leader_comm = b"curl"
    ev.exe_name = path.rsplit("/", 1)[-1].encode()
    rec = CIdent(start_ns=5_000_000_000, ppid=ppid, flags=flags, parent_comm=pcomm)
    comps = components_from_path(path) if path else b""
    ctypes.memmove(ctypes.addressof(rec) + CIdent.path.offset, comps, len(comps))
    ctypes.memmove(ctypes.addressof(rec) + CIdent.args.offset, args, len(args))
    rec.path_len, rec.args_len = len(comps), len(args)
    out = bytes(ev) + bytes(rec)
    assert len(out) == RECORD_SIZE and EVENT_SIZE == 184
    return out


def test_decode_a_complete_record():
    raw = _record(ID_EXEC | ID_PATH | ID_ARGS | ID_PARENT, "/usr/bin/curl",
                  b"curl\0-s\0http://169.254.169.254/\0", 7, b"sh")
    ident = decode(raw).identity
    assert ident == KernelIdentity("exec", 5_000_000_000, 7, "sh", "/usr/bin/curl",
                                   ["curl", "-s", "http://169.254.169.254/"], False)


def test_a_record_without_its_flags_holds_nothing():
    raw = _record(ID_EXEC, "/usr/bin/curl", b"curl\0", 7, b"sh")
    ident = decode(raw).identity
    assert ident.executable is None and ident.args is None and ident.ppid is None
    no_record = bytearray(raw)
    no_record[4] = F_IDENTITY  # flags without F_RECORD
    assert decode(bytes(no_record)).identity is None


def _doc(ev: KernelEvent, info: ProcessInfo, start: int | None = None) -> dict:
    return to_ecs(ev, info, wall_ns=10**18, host_name="h", event_id="e", user_name=None,
                  start_wall_ns=start)


def test_fields_from_the_record_even_when_proc_is_gone():
    raw = _record(ID_EXEC | ID_PATH | ID_ARGS | ID_ARGS_CUT | ID_PARENT, "/opt/x/curl",
                  b"curl\0-s\0", 7, b"cron")
    d = _doc(decode(raw), ProcessInfo(exited=True), start=10**18)
    p = d["process"]
    assert p["executable"] == "/opt/x/curl" and p["args"] == ["curl", "-s"]
    assert p["command_line"] == "curl -s" and p["parent"] == {"pid": 7, "name": "cron"}
    assert p["start"] == "2001-09-09T01:46:40.000000Z"
    ident = d["imdswatch"]["identity"]
    assert ident["record"] == "exec" and "from_proc" not in ident
    assert ident["missing"] == ["container.id"]  # the cgroup was never read
    assert d["imdswatch"]["process"]["args_truncated"] is True


def test_proc_fills_what_the_record_lacks_and_says_so():
    raw = _record(ID_EXEC | ID_PATH, "/usr/bin/curl")  # no argv, no parent in the record
    info = ProcessInfo(exe="/usr/bin/curl", command_line="curl x", args=["curl", "x"],
                       ppid=9, parent_name="bash")
    d = _doc(decode(raw), info)
    assert d["process"]["command_line"] == "curl x" and d["process"]["parent"]["pid"] == 9
    ident = d["imdswatch"]["identity"]
    assert ident["from_proc"] == ["process.command_line", "process.args",
                                  "process.parent.pid", "process.parent.name"]
    assert ident["missing"] == ["process.start", "container.id"]


def test_a_record_that_disagrees_with_the_connect_is_not_used():
    ev = decode(_record(ID_EXEC | ID_PATH, "/usr/bin/curl"))
    ev.exe_name = "wget"  # the task's executable at connect time says otherwise
    d = _doc(ev, ProcessInfo(exited=True))
    assert "executable" not in d["process"]
    assert "process.executable" in d["imdswatch"]["identity"]["missing"]


def test_stat_fields_survive_any_name():
    assert stat_fields(b"12 (a) b) (c) S 7 12 12 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 1 0 "
                       b"4242 0 0") == (7, 4242)
    assert stat_fields(b"garbage") is None


def test_seed_fills_a_record_from_proc():
    rec = CIdent()
    assert fill(rec, "/proc", os.getpid())
    assert rec.flags & ID_PATH and rec.flags & ID_ARGS and rec.flags & ID_PARENT
    rec.flags |= ID_EXEC  # decoded as any record
    ev = CEvent(flags=F_RECORD)
    ident = decode(bytes(ev) + bytes(rec)).identity
    assert ident.executable == os.path.realpath(f"/proc/{os.getpid()}/exe")
    assert ident.ppid == os.getppid() and ident.start_ns
    assert not fill(CIdent(), "/proc", 0)


def test_cgroup_ids_resolve_to_their_container(tmp_path):
    cid = "ab" * 32
    d = tmp_path / "system.slice" / f"docker-{cid}.scope"
    d.mkdir(parents=True)
    paths = CgroupPaths(str(tmp_path))
    ident = paths.identity(os.stat(d).st_ino)
    assert ident is not None and ident.container_id == cid and ident.runtime == "docker"
    assert paths.path(os.stat(tmp_path).st_ino) == "/"
    assert paths.identity(1) is None  # unknown id: rescans at most once a second
    assert CgroupPaths(None).identity(os.stat(d).st_ino) is None
