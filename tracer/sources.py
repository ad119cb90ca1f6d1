"""Finding the BPF C sources and turning one attach mode's file into BCC program text."""

from __future__ import annotations

import os
import re
from pathlib import Path

# One source file per attach mode; each includes the shared headers.
MODE_FILES = {
    "tracepoint": "tracepoint.bpf.c",
    "kprobe": "kprobe.bpf.c",
    "fentry": "fentry.bpf.c",
    "cgroup": "cgroup.bpf.c",
}

_LOCAL_INCLUDE = re.compile(r'^\s*#include\s+"([^"]+)"\s*$')


def bpf_dir() -> Path:
    """$IMDSWATCH_BPF_DIR, else the repository's bpf/ next to this package."""
    env = os.environ.get("IMDSWATCH_BPF_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "bpf"


def _expand(path: Path, seen: set[Path]) -> list[str]:
    path = path.resolve()
    if path in seen:  # include guards would make a second copy empty anyway
        return []
    seen.add(path)
    out: list[str] = [f'#line 1 "{path.name}"']
    for n, line in enumerate(path.read_text().splitlines(), 1):
        m = _LOCAL_INCLUDE.match(line)
        if m:
            out.extend(_expand(path.parent / m.group(1), seen))
            out.append(f'#line {n + 1} "{path.name}"')
        else:
            out.append(line)
    return out


def program_text(mode: str, directory: Path | None = None) -> str:
    """The source of `mode` with its local ("...") includes inlined.

    BCC rewrites map method calls (map.lookup(), events.ringbuf_reserve()) only in the main
    file it compiles, so the shared headers must become part of that file rather than be
    included from disk. System includes (<...>) are left to BCC's compiler.
    """
    if mode not in MODE_FILES:
        raise ValueError(f"unknown probe mode {mode!r}; expected one of {', '.join(MODE_FILES)}")
    return file_text(MODE_FILES[mode], directory)


# The enforcement programs (`run --enforce deny`): not a probe mode, compiled on their own.
ENFORCE_FILE = "enforce.bpf.c"


def file_text(name: str, directory: Path | None = None) -> str:
    """The source file `name` of the BPF directory with its local includes inlined."""
    d = directory or bpf_dir()
    path = d / name
    if not path.is_file():
        raise FileNotFoundError(
            f"BPF source {path} not found; set IMDSWATCH_BPF_DIR to the directory holding "
            f"{name}"
        )
    return "\n".join(_expand(path, set())) + "\n"


def cflags(*, ringbuf: bool, ringbuf_pages: int = 256, count_entries: int = 16384,
           offsets: dict[str, int] | None = None, capture_bytes: int = 1024,
           task_reads: bool = True) -> list[str]:
    """Compiler flags that size the maps and pick the output buffer. `offsets`: kernel
    structure offsets from BTF (tracer.btf.task_offsets), which turn on the kernel-side
    process identity (leader name, executable at connect time, and the identity record
    programs of bpf/identity.h when the record's offsets are among them). `task_reads`
    False keeps the connect programs from reading the task (kernels that refuse it in
    cgroup programs); the record, looked up by tgid, stays."""
    if ringbuf_pages & (ringbuf_pages - 1):
        raise ValueError("ringbuf_pages must be a power of two")
    flags = [
        f"-DIMDS_RINGBUF_PAGES={ringbuf_pages}",
        f"-DIMDS_COUNT_ENTRIES={count_entries}",
        # The kernel headers BCC compiles against warn about attributes clang ignores here.
        "-Wno-ignored-attributes",
        "-Wno-duplicate-decl-specifier",
    ]
    if ringbuf:
        flags.append("-DIMDS_USE_RINGBUF=1")
    if not 64 <= capture_bytes <= 4096:
        raise ValueError("capture_bytes must be between 64 and 4096")
    flags.append(f"-DIMDS_CAPTURE_BYTES={capture_bytes}")
    if not task_reads:
        flags.append("-DIMDS_NO_TASK_READS=1")
    for name, value in sorted((offsets or {}).items()):
        flags.append(f"-D{name}={int(value)}")
    return flags
