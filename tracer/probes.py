"""Compiling an attach mode's BPF program with BCC and attaching it, with the `auto` order
fentry -> kprobe -> cgroup -> tracepoint: cheapest first. fentry, kprobe and cgroup run once
per connect(); the tracepoint fires on every TCP state change of every socket (about ten per
accepted connection, client and server side), so it comes last. Each attach is checked (BCC
raises when the kernel refuses); a mode that fails is detached completely before the next
one is tried. `release(b)` detaches and frees a compiled object: use it, not b.cleanup(),
since the cgroup mode's attachments are not BCC's."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from tracer import cgroup_attach, kernel, sources

log = logging.getLogger("imdswatch.tracer")

MODES = ("fentry", "kprobe", "cgroup", "tracepoint")
AUTO_ORDER = MODES  # cheapest first
CONNECT_FUNCTIONS = ("tcp_v4_connect", "tcp_v6_connect")

# Program names per mode, with their BCC program type names.
PROGRAMS: dict[str, tuple[tuple[str, str], ...]] = {
    "tracepoint": (("tracepoint__sock__inet_sock_set_state", "TRACEPOINT"),),
    "kprobe": (
        ("imds_kprobe_v4", "KPROBE"), ("imds_kprobe_v6", "KPROBE"),
        ("imds_kretprobe_v4", "KPROBE"), ("imds_kretprobe_v6", "KPROBE"),
    ),
    "fentry": (
        ("kfunc__tcp_v4_connect", "TRACING"), ("kfunc__tcp_v6_connect", "TRACING"),
        ("kretfunc__tcp_v4_connect", "TRACING"), ("kretfunc__tcp_v6_connect", "TRACING"),
    ),
    "cgroup": (("imdsw_connect4", "CGROUP_SOCK_ADDR"), ("imdsw_connect6", "CGROUP_SOCK_ADDR")),
}
# cgroup mode: program -> its hook (sock_addr programs are loaded for one attach type).
CGROUP_HOOKS = {
    "imdsw_connect4": cgroup_attach.CGROUP_INET4_CONNECT,
    "imdsw_connect6": cgroup_attach.CGROUP_INET6_CONNECT,
}


class ProbeError(RuntimeError):
    """A mode could not be compiled, loaded or attached; the message says why."""


class VerifierRefused(ProbeError):
    """The kernel refused a program at load for what it does (the verifier: a helper this
    program type may not call, an access it cannot prove safe), not for who loads it
    (EPERM) and not at attach: the same mode may load with less in it."""


def _loader_class() -> type:
    bcc = kernel.import_bcc()

    class Loader(bcc.BPF):  # type: ignore[name-defined,misc]
        """BPF without BCC's name-prefix auto-attach: we attach explicitly so every attach
        is checked and a failing mode can fall back."""

        def _trace_autoload(self) -> None:
            return None

    return Loader


def compile_mode(
    mode: str,
    *,
    ringbuf: bool | None = None,
    ringbuf_pages: int = 256,
    count_entries: int = 16384,
    directory: Path | None = None,
    offsets: dict[str, int] | None = None,
    capture_bytes: int = 1024,
    task_reads: bool = True,
) -> object:
    """Compile `mode` to BPF bytecode (no load, no attach). Returns the BCC object.
    `offsets`: kernel structure offsets (tracer.btf) for the kernel-side identity."""
    # BCC reads a tracepoint's field layout from tracefs while compiling, so tracefs must be
    # mounted before any compile, not only before attaching.
    for note in kernel.ensure_tracefs():
        log.info(note)
    if ringbuf is None:
        ringbuf = kernel.ringbuf_supported()
    text = sources.program_text(mode, directory)
    flags = sources.cflags(ringbuf=ringbuf, ringbuf_pages=ringbuf_pages,
                           count_entries=count_entries, offsets=offsets,
                           capture_bytes=capture_bytes, task_reads=task_reads)
    try:
        return _loader_class()(text=text.encode(), cflags=flags)
    except Exception as exc:  # BCC raises bare Exception
        raise ProbeError(f"{mode}: BPF compilation failed: {exc}") from exc


def load_mode(b: object, mode: str) -> list[str]:
    """Load every program of `mode` through the verifier without attaching."""
    import bcc

    names = []
    for name, ptype in PROGRAMS[mode]:
        try:
            if name in CGROUP_HOOKS:
                b.load_func(name.encode(), bcc.BPF.CGROUP_SOCK_ADDR,
                            attach_type=CGROUP_HOOKS[name])
            else:
                b.load_func(name.encode(), getattr(bcc.BPF, ptype))
        except Exception as exc:
            text = _errtext(exc)
            error = ProbeError if text == EPERM_TEXT else VerifierRefused
            raise error(f"{mode}: loading {name} failed: {text}") from exc
        names.append(name)
    return names


def attach_mode(b: object, mode: str, cgroup_root: str | None = None) -> None:
    """Attach `mode`'s programs; return probes before entry probes, so no entry is ever
    recorded without its return. `cgroup_root`: the cgroup v2 root directory for the cgroup
    mode (found from /proc/self/mounts when None)."""
    try:
        if mode == "cgroup":
            _attach_cgroup(b, cgroup_root)
        elif mode == "tracepoint":
            b.attach_tracepoint(tp=b"sock:inet_sock_set_state",
                                fn_name=b"tracepoint__sock__inet_sock_set_state")
        elif mode == "kprobe":
            for fn, suffix in zip(CONNECT_FUNCTIONS, ("v4", "v6"), strict=True):
                b.attach_kretprobe(event=fn.encode(), fn_name=f"imds_kretprobe_{suffix}".encode())
            for fn, suffix in zip(CONNECT_FUNCTIONS, ("v4", "v6"), strict=True):
                b.attach_kprobe(event=fn.encode(), fn_name=f"imds_kprobe_{suffix}".encode())
        elif mode == "fentry":
            for fn in CONNECT_FUNCTIONS:
                b.attach_kretfunc(fn_name=f"kretfunc__{fn}".encode())
            for fn in CONNECT_FUNCTIONS:
                b.attach_kfunc(fn_name=f"kfunc__{fn}".encode())
        else:
            raise ProbeError(f"unknown probe mode {mode!r}")
    except ProbeError:
        raise
    except Exception as exc:
        raise ProbeError(f"{mode}: attach failed: {_errtext(exc)}{_why(mode)}") from exc


def _attach_cgroup(b: object, cgroup_root: str | None) -> None:
    """Both connect hooks on the root cgroup, as BPF links (detached by the kernel when the
    agent exits, however it exits) or, on kernels without cgroup links, multi-attached."""
    att = getattr(b, "imdsw_cgroup", None)
    if att is None:
        root = cgroup_attach.cgroup2_root(cgroup_root or getattr(b, "imdsw_cgroup_root", None))
        try:
            cgroup_attach.remove_stale(root)
        except (cgroup_attach.CgroupError, OSError) as exc:
            log.info("could not look for stale imdswatch cgroup programs: %s", exc)
        att = cgroup_attach.CgroupAttachment(root)
        b.imdsw_cgroup = att
    fns = load_mode(b, "cgroup")
    try:
        how = {att.attach(b.funcs[name.encode()].fd, CGROUP_HOOKS[name]) for name in fns}
    except cgroup_attach.CgroupError:
        att.detach()
        raise
    log.info("cgroup connect hooks attached to %s (%s)", att.root,
             "BPF links: detached by the kernel when this process exits" if how == {"link"}
             else "BPF_PROG_ATTACH with BPF_F_ALLOW_MULTI: detached on exit")


REQUEST_PROGRAM = "imdsw_egress"
# Where the kernel refuses task helpers in cgroup_skb programs (bpf/requests.h): the egress
# program that follows only tracked connections, and the connect hooks that track them in
# the modes whose own probe knows no socket cookie.
REQUEST_PROGRAM_TRACKED = "imdsw_egress_tracked"
TRACK_HOOKS = {
    "imdsw_track4": cgroup_attach.CGROUP_INET4_CONNECT,
    "imdsw_track6": cgroup_attach.CGROUP_INET6_CONNECT,
}
NAT_UNSEEN = ("connections sent to a metadata address only by NAT are not followed: this "
              "kernel refuses task helpers in cgroup_skb programs")


def attach_requests(b: object, mode: str, cgroup_root: str | None = None,
                    variant: str | None = None) -> str | None:
    """Request capture: the cgroup_skb egress program on the cgroup v2 root (any probe
    mode: it shares the compiled object's maps). `variant` "full" or "tracked" forces
    one; by default the full program is tried first and, if the verifier refuses it, the
    tracked one (remembered for a resume). Returns None, or what is not captured with
    the variant attached. Raises ProbeError saying why not at all."""
    import bcc

    att = getattr(b, "imdsw_requests", None)
    variant = variant or getattr(b, "imdsw_requests_variant", None)
    try:
        if att is None:
            root = cgroup_attach.cgroup2_root(cgroup_root or getattr(b, "imdsw_cgroup_root",
                                                                     None))
            try:
                cgroup_attach.remove_stale(root)
            except (cgroup_attach.CgroupError, OSError) as exc:
                log.info("could not look for stale imdswatch cgroup programs: %s", exc)
            att = cgroup_attach.CgroupAttachment(root)
            b.imdsw_requests = att
        egress = None
        refused = None
        if variant != "tracked":
            try:
                egress = b.load_func(REQUEST_PROGRAM.encode(), bcc.BPF.CGROUP_SKB,
                                     attach_type=cgroup_attach.CGROUP_INET_EGRESS)
                variant = "full"
            except Exception as exc:
                if variant == "full" or _errtext(exc) == EPERM_TEXT:
                    raise
                refused = _errtext(exc)
        if egress is None:
            try:
                egress = b.load_func(REQUEST_PROGRAM_TRACKED.encode(), bcc.BPF.CGROUP_SKB,
                                     attach_type=cgroup_attach.CGROUP_INET_EGRESS)
            except Exception as exc:
                # Both refused: say why for each, not only for the fallback.
                first = f"{REQUEST_PROGRAM}: {refused}; " if refused is not None else ""
                raise ProbeError(f"{first}{REQUEST_PROGRAM_TRACKED}: {_errtext(exc)}") from exc
            variant = "tracked"
            if refused is not None:
                log.info("request capture: the kernel refused %s (%s); following the "
                         "connections the connect hooks track instead", REQUEST_PROGRAM,
                         refused)
        hooks = [(egress.fd, cgroup_attach.CGROUP_INET_EGRESS)]
        if variant == "tracked" and mode != "cgroup":
            hooks += [(b.load_func(name.encode(), bcc.BPF.CGROUP_SOCK_ADDR,
                                   attach_type=hook).fd, hook)
                      for name, hook in TRACK_HOOKS.items()]
        try:
            for fd, hook in hooks:
                att.attach(fd, hook)
        except cgroup_attach.CgroupError:
            att.detach()
            raise
    except Exception as exc:
        raise ProbeError(f"request capture (cgroup_skb egress): {_errtext(exc)}") from exc
    b.imdsw_requests_variant = variant
    return NAT_UNSEEN if variant == "tracked" else None


# The identity record's programs (bpf/identity.h), raw tracepoints beside any mode.
IDENTITY_PROGRAMS = (
    ("raw_tracepoint__sched_process_exit", "sched_process_exit"),
    ("raw_tracepoint__sched_process_fork", "sched_process_fork"),
    ("raw_tracepoint__sched_process_exec", "sched_process_exec"),
)


def attach_identity(b: object) -> None:
    """Attach the record's exit, fork and exec programs (exit first: no record is written
    that its exit could miss). Raises ProbeError saying why not; nothing stays attached."""
    done = []
    try:
        for name, tp in IDENTITY_PROGRAMS:
            b.attach_raw_tracepoint(tp=tp.encode(), fn_name=name.encode())
            done.append(tp)
    except Exception as exc:
        for tp in done:
            b.detach_raw_tracepoint(tp=tp.encode())
        raise ProbeError(f"identity record (raw tracepoints sched_process_exec/fork/exit): "
                         f"{_errtext(exc)}") from exc


def detach_identity(b: object) -> None:
    for _name, tp in IDENTITY_PROGRAMS:
        try:
            b.detach_raw_tracepoint(tp=tp.encode())
        except Exception:  # not attached
            pass


def detach_requests(b: object) -> None:
    att = getattr(b, "imdsw_requests", None)
    if att is not None:
        att.detach()


def release(b: object) -> None:
    """Detach everything and free the compiled object (programs and maps). Safe twice."""
    for attr in ("imdsw_cgroup", "imdsw_requests"):
        att = getattr(b, attr, None)
        if att is None:
            continue
        setattr(b, attr, None)
        try:
            att.close()
        except Exception as exc:  # never let it keep BCC's programs and maps alive
            log.error("closing the cgroup attachment failed: %s", exc)
    b.cleanup()


EPERM_TEXT = "the kernel answered EPERM"


def _errtext(exc: Exception) -> str:
    # BCC reports every EPERM from the kernel as a privilege problem, even for root.
    text = str(exc)
    if "Need super-user privileges" in text:
        return EPERM_TEXT
    return text


def _why(mode: str) -> str:
    """The likely cause of an attach failure, from what the kernel offers."""
    if mode == "kprobe" and not kernel.kprobes_available():
        return " (this kernel has no kprobe support: CONFIG_KPROBES is off)"
    if mode == "cgroup":
        if not cgroup_attach.cgroup2_mounts():
            return " (no cgroup v2 file system mounted)"
        return ""
    if mode == "fentry":
        if not kernel.btf_available():
            return " (no kernel BTF at /sys/kernel/btf/vmlinux)"
        return " (the kernel refused the BPF trampoline program)"
    return ""


def detach_mode(b: object, mode: str) -> None:
    """Detach `mode`'s programs but keep them loaded with their maps (attach_mode again to
    resume): used to measure the probes' cost on the same compiled object."""
    if mode == "cgroup":
        att = getattr(b, "imdsw_cgroup", None)
        if att is not None:
            att.detach()
    elif mode == "tracepoint":
        b.detach_tracepoint(tp=b"sock:inet_sock_set_state")
    elif mode == "kprobe":
        for fn in CONNECT_FUNCTIONS:
            b.detach_kprobe(event=fn.encode())
            b.detach_kretprobe(event=fn.encode())
    elif mode == "fentry":
        for fn in CONNECT_FUNCTIONS:
            b.detach_kfunc(fn_name=f"kfunc__{fn}".encode())
            b.detach_kretfunc(fn_name=f"kretfunc__{fn}".encode())


def _open_one(mode: str, prepare: Callable[[object], None] | None, cgroup_root: str | None,
              compile_args: dict) -> object:
    """Compile `mode`, fill its maps, load every program through the verifier, then attach.
    Loading first tells a program the kernel refuses (VerifierRefused) apart from a hook
    it refuses (ProbeError at attach). Released on any failure."""
    b = None
    try:
        b = compile_mode(mode, **compile_args)
        if prepare is not None:
            prepare(b)
        b.imdsw_cgroup_root = cgroup_root
        load_mode(b, mode)
        attach_mode(b, mode, cgroup_root)  # BCC reuses the programs loaded above
    except ProbeError:
        if b is not None:
            release(b)
        raise
    return b


def open_mode(
    mode: str,
    prepare: Callable[[object], None] | None = None,
    cgroup_root: str | None = None,
    identity_off: Callable[[str], None] | None = None,
    **compile_args: object,
) -> tuple[object, str]:
    """Compile and attach `mode` (or try each in AUTO_ORDER for "auto"). `prepare` runs on
    the compiled object before attaching (to fill the endpoint maps first, so the filter is
    complete from the first event). Returns (bpf, chosen mode).

    With kernel-side identity (`offsets` in compile_args), a mode whose programs the
    verifier refuses is compiled again without it before the next mode is tried: a cgroup
    program that may not read the task (kernels before 5.11ish let only tracing programs
    do that) still sees every connect, which the next mode, the tracepoint, does at ten
    times the cost. `identity_off(reason)` is told when the mode returned runs without
    it. A mode that fails at attach, or is refused with EPERM, is not compiled twice."""
    order = AUTO_ORDER if mode == "auto" else (mode,)
    failures: list[str] = []
    for m in order:
        try:
            try:
                b = _open_one(m, prepare, cgroup_root, compile_args)
            except VerifierRefused as exc:
                if not compile_args.get("offsets"):
                    raise
                log.warning("probe %s: the kernel refused its programs with the kernel-side "
                            "process identity (%s); trying %s without reading the task at "
                            "connect time", m, exc, m)
                b = _open_one(m, prepare, cgroup_root, {**compile_args, "task_reads": False})
                if identity_off is not None:
                    identity_off(f"the {m} programs reading the task were refused: {exc}")
        except ProbeError as exc:
            failures.append(str(exc))
            if mode == "auto":
                log.info("probe %s unavailable: %s", m, exc)
            continue
        if mode == "auto":
            log.info("probe auto chose %s (order %s: cheapest per connect first)", m,
                     " -> ".join(AUTO_ORDER))
        else:
            log.info("probe %s attached", m)
        return b, m
    raise ProbeError("; ".join(failures))
