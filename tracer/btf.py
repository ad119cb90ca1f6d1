"""Field offsets of kernel structures from the running kernel's BTF (/sys/kernel/btf/vmlinux).

BCC compiles against the kernel headers it finds, which on this kind of machine (and in the
DaemonSet image) are a distribution's headers, not the running kernel's: `task->group_leader`
compiled from them would read the wrong bytes. The kernel's own BTF describes its real
layout, so the tracer reads the few offsets it needs here and passes them to the compiler as
constants: CO-RE done at load time, by us, since BCC does not relocate field accesses.

Only what the BPF side needs is implemented: struct/union members, followed through
anonymous members and named sub-structures ("f_path.dentry").
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

VMLINUX = "/sys/kernel/btf/vmlinux"
_MAGIC = 0xEB9F

# kind -> size of the data following the 12-byte btf_type: fixed bytes, bytes per vlen item
_TRAILER = {
    1: (4, 0), 2: (0, 0), 3: (12, 0), 4: (0, 12), 5: (0, 12), 6: (0, 8), 7: (0, 0),
    8: (0, 0), 9: (0, 0), 10: (0, 0), 11: (0, 0), 12: (0, 0), 13: (0, 8), 14: (4, 0),
    15: (0, 12), 16: (0, 0), 17: (4, 0), 18: (0, 0), 19: (0, 12),
}
_STRUCT, _UNION = 4, 5
_ENUM, _ENUM64 = 6, 19
_MODIFIERS = {8, 9, 10, 11, 18}  # typedef, volatile, const, restrict, type tag


class BTFError(RuntimeError):
    pass


@dataclass(slots=True)
class _Type:
    kind: int
    name: str
    size_or_type: int
    members: list[tuple[str, int, int]]  # (name, type id, bit offset)


class BTF:
    """The structures of one BTF blob (kernel's by default), by name.

    One pass records every type's kind, referenced type and where its data lies; names and
    members are decoded only for the structures asked about (a kernel has ~130k types: the
    agent's start should not pay for all of them)."""

    def __init__(self, data: bytes) -> None:
        if len(data) < 24:
            raise BTFError("BTF data too short")
        magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
        if magic != _MAGIC:
            raise BTFError("not BTF data (bad magic)")
        type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", data, 8)
        self._data = data
        self._strings = data[hdr_len + str_off: hdr_len + str_off + str_len]
        # per type id: (kind, size_or_type, info, position of its data, name offset)
        self._raw: list[tuple[int, int, int, int, int]] = [(0, 0, 0, 0, 0)]
        self.structs: dict[str, int] = {}
        self._cache: dict[int, _Type] = {}
        unpack = struct.Struct("<III").unpack_from
        pos, end = hdr_len + type_off, hdr_len + type_off + type_len
        raw = self._raw
        while pos < end:
            name_off, info, size_or_type = unpack(data, pos)
            pos += 12
            kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
            trailer = _TRAILER.get(kind)
            if trailer is None:
                raise BTFError(f"unknown BTF kind {kind}")
            raw.append((kind, size_or_type, info, pos, name_off))
            if kind in (_STRUCT, _UNION) and name_off:
                name = self._name(name_off)
                self.structs.setdefault(name, len(raw) - 1)
            pos += trailer[0] + trailer[1] * vlen

    def _name(self, off: int) -> str:
        end = self._strings.find(b"\0", off)
        return self._strings[off:end].decode("ascii", "replace")

    def _type(self, type_id: int) -> _Type | None:
        if not 0 < type_id < len(self._raw):
            return None
        t = self._cache.get(type_id)
        if t is None:
            kind, size_or_type, info, pos, name_off = self._raw[type_id]
            members: list[tuple[str, int, int]] = []
            if kind in (_STRUCT, _UNION):
                kind_flag = info >> 31
                for i in range(info & 0xFFFF):
                    m_name, m_type, m_off = struct.unpack_from("<III", self._data, pos + 12 * i)
                    bit = m_off & 0xFFFFFF if kind_flag else m_off
                    members.append((self._name(m_name), m_type, bit))
            t = _Type(kind, self._name(name_off), size_or_type, members)
            self._cache[type_id] = t
        return t

    @classmethod
    def kernel(cls, path: str = VMLINUX) -> BTF:
        try:
            with open(path, "rb") as f:
                return cls(f.read())
        except OSError as exc:
            raise BTFError(f"no kernel BTF at {path}: {exc.strerror}") from None

    def enum_value(self, enum_name: str, member: str) -> int | None:
        """The value of `member` in `enum enum_name`, or None when either is absent. A
        scan of every type: asked once per start, not kept."""
        for kind, _size, info, pos, name_off in self._raw:
            if kind not in (_ENUM, _ENUM64) or not name_off or self._name(name_off) != enum_name:
                continue
            step = 8 if kind == _ENUM else 12
            for i in range(info & 0xFFFF):
                m_name, lo = struct.unpack_from("<II", self._data, pos + step * i)
                if self._name(m_name) == member:
                    hi = struct.unpack_from("<I", self._data, pos + 8 + step * i)[0] \
                        if kind == _ENUM64 else 0
                    return hi << 32 | lo
        return None

    def _resolve(self, type_id: int) -> _Type | None:
        for _ in range(32):  # modifier chains are short; a bound keeps bad data finite
            t = self._type(type_id)
            if t is None or t.kind not in _MODIFIERS:
                return t
            type_id = t.size_or_type
        return None

    def _find(self, t: _Type, member: str) -> tuple[int, int] | None:
        """(byte offset, type id) of `member` in t, looking into anonymous members."""
        for name, type_id, bit in t.members:
            if name == member:
                return bit // 8, type_id
        for name, type_id, bit in t.members:
            if not name:
                inner = self._resolve(type_id)
                if inner is not None and inner.kind in (_STRUCT, _UNION):
                    found = self._find(inner, member)
                    if found is not None:
                        return bit // 8 + found[0], found[1]
        return None

    def offset(self, struct_name: str, path: str) -> int:
        """Byte offset of `path` ("f_path.dentry") inside `struct struct_name`."""
        if struct_name not in self.structs:
            raise BTFError(f"struct {struct_name} not in BTF")
        t = self._resolve(self.structs[struct_name])
        total = 0
        for part in path.split("."):
            if t is None or t.kind not in (_STRUCT, _UNION):
                raise BTFError(f"{struct_name}.{path}: {part} is not inside a structure")
            found = self._find(t, part)
            if found is None:
                raise BTFError(f"{struct_name} has no member {path}")
            total += found[0]
            t = self._resolve(found[1])
        return total


# What the BPF side reads of a task, and the macro each offset becomes.
TASK_FIELDS = (
    ("IMDS_OFF_TASK_GROUP_LEADER", "task_struct", "group_leader"),
    ("IMDS_OFF_TASK_COMM", "task_struct", "comm"),
    ("IMDS_OFF_TASK_MM", "task_struct", "mm"),
    ("IMDS_OFF_MM_EXE_FILE", "mm_struct", "exe_file"),
    ("IMDS_OFF_FILE_DENTRY", "file", "f_path.dentry"),
    ("IMDS_OFF_FILE_INODE", "file", "f_inode"),
    ("IMDS_OFF_DENTRY_NAME", "dentry", "d_name.name"),
    ("IMDS_OFF_DENTRY_PARENT", "dentry", "d_parent"),
    ("IMDS_OFF_INODE_INO", "inode", "i_ino"),
)


# What the identity record's programs (bpf/identity.h) read, with alternatives where a kernel
# renamed a field (start_boottime was real_start_time before 5.5). All or none: without one
# of them the record is off and the tracer says so.
RECORD_FIELDS = (
    ("IMDS_OFF_TASK_TGID", "task_struct", ("tgid",)),
    ("IMDS_OFF_TASK_PID", "task_struct", ("pid",)),
    ("IMDS_OFF_TASK_REAL_PARENT", "task_struct", ("real_parent",)),
    ("IMDS_OFF_TASK_START", "task_struct", ("start_boottime", "real_start_time")),
    ("IMDS_OFF_TASK_SIGNAL", "task_struct", ("signal",)),
    ("IMDS_OFF_SIGNAL_LIVE", "signal_struct", ("live",)),
    ("IMDS_OFF_MM_ARG_START", "mm_struct", ("arg_start",)),
    ("IMDS_OFF_MM_ARG_END", "mm_struct", ("arg_end",)),
    ("IMDS_OFF_FILE_MNT", "file", ("f_path.mnt",)),
    ("IMDS_OFF_VFSMOUNT_ROOT", "vfsmount", ("mnt_root",)),
    ("IMDS_OFF_MOUNT_MNT", "mount", ("mnt",)),
    ("IMDS_OFF_MOUNT_PARENT", "mount", ("mnt_parent",)),
    ("IMDS_OFF_MOUNT_MOUNTPOINT", "mount", ("mnt_mountpoint",)),
)


def record_offsets(btf: BTF | None = None) -> dict[str, int]:
    """The identity record's offsets (macro name -> value). Raises BTFError naming the
    field when one is missing."""
    b = btf or BTF.kernel()
    out = {}
    for macro, struct_name, paths in RECORD_FIELDS:
        for i, path in enumerate(paths):
            try:
                out[macro] = b.offset(struct_name, path)
                break
            except BTFError:
                if i == len(paths) - 1:
                    raise
    return out


# The identity reads call bpf_probe_read_kernel by its number when the kernel has it
# (bpf/imdswatch.h says why BCC's name for it cannot be trusted).
READ_KERNEL_HELPERS = (
    ("IMDS_HELPER_READ_KERNEL", "BPF_FUNC_probe_read_kernel"),
    ("IMDS_HELPER_READ_KERNEL_STR", "BPF_FUNC_probe_read_kernel_str"),
    ("IMDS_HELPER_READ_USER", "BPF_FUNC_probe_read_user"),
)


def task_offsets(btf: BTF | None = None) -> dict[str, int]:
    """What the identity reads need, as macro name -> value: the field offsets, and the
    kernel's own numbers of the bpf_probe_read_kernel helpers (its `enum bpf_func_id`) when
    it has them (Linux >= 5.5). Raises BTFError when the kernel has no BTF or a field moved
    out of reach (the tracer then runs without kernel-side identity and says so)."""
    b = btf or BTF.kernel()
    out = {macro: b.offset(s, p) for macro, s, p in TASK_FIELDS}
    helpers = {macro: b.enum_value("bpf_func_id", name) for macro, name in READ_KERNEL_HELPERS}
    if None not in helpers.values():
        out.update(helpers)  # type: ignore[arg-type]
    return out
