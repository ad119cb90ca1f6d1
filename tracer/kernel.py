"""Facts about the running kernel and the BPF toolchain, and the one setup step the tracer
performs itself: mounting tracefs/debugfs, which BCC needs to attach tracepoints and kprobes."""

from __future__ import annotations

import ctypes
import os
import platform
from pathlib import Path

TRACEFS = "/sys/kernel/tracing"
DEBUGFS = "/sys/kernel/debug"
RINGBUF_MIN_KERNEL = (5, 8)


def kernel_release() -> str:
    return platform.release()


def kernel_version(release: str | None = None) -> tuple[int, int]:
    parts = (release or kernel_release()).split("-", 1)[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return (0, 0)


def ringbuf_supported(release: str | None = None) -> bool:
    """BPF_MAP_TYPE_RINGBUF arrived in 5.8; older kernels get the perf buffer."""
    return kernel_version(release) >= RINGBUF_MIN_KERNEL


def mounted(path: str, fstype: str) -> bool:
    try:
        with open("/proc/self/mounts") as f:
            return any(
                line.split()[1] == path and line.split()[2] == fstype for line in f if line.strip()
            )
    except OSError:
        return False


def _mount(source: str, target: str, fstype: str) -> str | None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_void_p]
    if libc.mount(source.encode(), target.encode(), fstype.encode(), 0, None) != 0:
        return os.strerror(ctypes.get_errno())
    return None


def ensure_tracefs() -> list[str]:
    """Mount debugfs and tracefs when running as root and they are missing. Returns what was
    done or what failed, one line each, for the log."""
    notes: list[str] = []
    if os.geteuid() != 0:
        return notes
    for target, fstype in ((DEBUGFS, "debugfs"), (TRACEFS, "tracefs")):
        if mounted(target, fstype) or not os.path.isdir(target):
            continue
        err = _mount(fstype, target, fstype)
        notes.append(f"mounted {fstype} at {target}" if err is None
                     else f"could not mount {fstype} at {target}: {err}")
    return notes


def tracefs_path() -> str | None:
    for p in (TRACEFS, f"{DEBUGFS}/tracing"):
        if os.path.exists(f"{p}/events"):
            return p
    return None


def btf_available() -> bool:
    return os.path.exists("/sys/kernel/btf/vmlinux")


def headers_path(release: str | None = None) -> str | None:
    """Where BCC will find kernel headers, or None."""
    r = release or kernel_release()
    build = Path(f"/lib/modules/{r}/build")
    if (build / "include").is_dir():
        return str(build.resolve())
    if os.path.exists("/sys/kernel/kheaders.tar.xz"):
        return "/sys/kernel/kheaders.tar.xz"
    return None


def kprobes_available() -> bool:
    """CONFIG_KPROBES builds the kprobe PMU and tracefs's kprobe_events."""
    if os.path.exists("/sys/bus/event_source/devices/kprobe"):
        return True
    tf = tracefs_path()
    return tf is not None and os.path.exists(f"{tf}/kprobe_events")


def kallsyms_has(symbol: str) -> bool:
    try:
        with open("/proc/kallsyms") as f:
            return any(line.rstrip("\n").split(" ")[2:3] == [symbol] for line in f)
    except OSError:
        return False


def lockdown() -> str | None:
    try:
        text = Path("/sys/kernel/security/lockdown").read_text()
    except OSError:
        return None
    for word in text.split():
        if word.startswith("["):
            return word.strip("[]")
    return None


def import_bcc() -> object:
    """The BCC module, or ImportError saying how to get it."""
    try:
        import bcc
    except ImportError as exc:
        raise ImportError(
            "python BCC is not importable (" + str(exc) + "): install the system package with "
            "`apt-get install python3-bpfcc` and run `make setup` to link it into .venv "
            "(never `pip install bcc`, an unrelated project)"
        ) from None
    return bcc
