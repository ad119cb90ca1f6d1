"""`imdswatch doctor`: what this machine offers the tracer, what is missing and the exact
fix for each gap; `preflight` gives `imdswatch run` the same verdicts to fail fast."""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tracer import btf, cgroup_attach, kernel, probes

# Capability bits (linux/capability.h).
CAP_SYS_ADMIN = 21
CAP_PERFMON = 38
CAP_BPF = 39
TRACEPOINT = "sock/inet_sock_set_state"
MIN_TRACEPOINT_KERNEL = (4, 16)  # sock:inet_sock_set_state appeared in 4.16


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    # Probe modes this problem makes impossible; "all" blocks every mode.
    blocks: set[str] = field(default_factory=set)

    @property
    def status(self) -> str:
        if self.ok:
            return " ok "
        return "FAIL" if "all" in self.blocks else "warn"


def deployment() -> str:
    """Where this imdswatch runs, so that every fix names what exists there: "container"
    (the image sets IMDSWATCH_DEPLOYMENT: no checkout, no .venv, capabilities come from the
    pod spec), "checkout" (a source tree run from its own .venv, with scripts/) or
    "installed" (a package on a host)."""
    named = os.environ.get("IMDSWATCH_DEPLOYMENT", "")
    if named in ("container", "checkout", "installed"):
        return named
    root = Path(__file__).resolve().parents[1]
    venv = root / ".venv"
    if (root / "scripts" / "kernel-headers.sh").is_file() and venv.is_dir() and \
            Path(sys.prefix).resolve() == venv.resolve():
        return "checkout"
    return "installed"


def _command() -> str:
    return ".venv/bin/imdswatch" if deployment() == "checkout" else "imdswatch"


# Capabilities are granted to the agent alone: to the container by the pod spec, or to one
# service by systemd. Never by file capabilities on an interpreter, which every local user
# can run (`setcap` on the system Python would make every user root).
_SYSTEMD_CAPS = ("or as a systemd service of its own with "
                 "AmbientCapabilities=CAP_BPF CAP_PERFMON CAP_SYS_ADMIN")


def _privileges_fix() -> str:
    if deployment() == "container":
        return ("run the container as uid 0 with the capabilities BPF, PERFMON and SYS_ADMIN "
                "added (Kubernetes: securityContext runAsUser: 0 and capabilities.add, as the "
                "imdswatch DaemonSet has; podman/docker: --user 0 --cap-add BPF --cap-add "
                "PERFMON --cap-add SYS_ADMIN)")
    return f"run as root (sudo {_command()} run), {_SYSTEMD_CAPS}"


def _cap_eff() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def check_privileges() -> Check:
    caps = _cap_eff()
    has = {n: bool(caps >> b & 1) for n, b in
           (("CAP_BPF", CAP_BPF), ("CAP_PERFMON", CAP_PERFMON), ("CAP_SYS_ADMIN", CAP_SYS_ADMIN))}
    if os.geteuid() == 0 and has["CAP_SYS_ADMIN"]:
        return Check("privileges", True, "running as root with CAP_SYS_ADMIN")
    if has["CAP_SYS_ADMIN"] or (has["CAP_BPF"] and has["CAP_PERFMON"]):
        held = ", ".join(n for n, v in has.items() if v)
        return Check("privileges", True, f"not root, but holds {held}")
    return Check("privileges", False, f"uid {os.geteuid()} without CAP_BPF + CAP_PERFMON",
                 _privileges_fix(), {"all"})


def check_kernel() -> Check:
    rel = kernel.kernel_release()
    ver = kernel.kernel_version(rel)
    if ver < MIN_TRACEPOINT_KERNEL:
        return Check("kernel", False, f"{rel} is older than 4.16",
                     "upgrade to a kernel >= 4.16 (5.8+ for the BPF ring buffer)", {"all"})
    buf = "ring buffer" if kernel.ringbuf_supported(rel) else "perf buffer (kernel < 5.8)"
    return Check("kernel", True, f"{rel}; events go through the {buf}")


def check_bcc() -> Check:
    try:
        bcc = kernel.import_bcc()
    except ImportError as exc:
        return Check("bcc", False, f"python BCC not importable by {sys.executable}",
                     _bcc_fix(str(exc)), {"all"})
    version = getattr(bcc, "__version__", "?")
    return Check("bcc", True, f"BCC {version} importable from {sys.executable}")


def _bcc_fix(error: str) -> str:
    where = deployment()
    if where == "container":
        return ("this image lacks Debian's python3-bpfcc; use the imdswatch image built from "
                "its Dockerfile")
    if where == "checkout":
        return error.split(": ", 1)[-1]
    return ("apt-get install python3-bpfcc (BCC's Python bindings come from the distribution "
            "for its python3; the PyPI package named bcc is another project), then run "
            "imdswatch with that python3")


def _headers_fix(rel: str) -> str:
    where = deployment()
    if where == "container":
        return (f"install linux-headers-{rel} on the node and mount the node's /lib/modules "
                "and /usr/src read-only into the container (the imdswatch DaemonSet does)")
    fix = f"apt-get install linux-headers-{rel} where the distribution ships them; otherwise "
    if where == "checkout":
        return fix + ("bash scripts/kernel-headers.sh (links Debian's newest cloud headers, "
                      "enough for the tracepoint probe)")
    return fix + "modprobe kheaders (kernels built with CONFIG_IKHEADERS carry their own)"


def check_headers() -> Check:
    path = kernel.headers_path()
    if path:
        rel = kernel.kernel_release()
        note = ""
        if kernel.kernel_version(rel) != kernel.kernel_version(os.path.basename(path).replace(
                "linux-headers-", "")) and path.startswith("/usr/src/"):
            note = (" (headers of another kernel version: enough for the tracepoint probe, "
                    "whose layout BCC reads from tracefs, and the cgroup probe, which reads "
                    "the UAPI struct bpf_sock_addr)")
        return Check("kernel headers", True, f"BCC compiles against {path}{note}")
    rel = kernel.kernel_release()
    return Check("kernel headers", False, f"nothing at /lib/modules/{rel}/build",
                 _headers_fix(rel), {"all"})


def _tracefs_mounts() -> list[str]:
    """Mount points of tracefs (or of debugfs, which carries it under tracing/), from the
    mount table: unlike the directories, readable by any user."""
    found = [p for p, t in ((kernel.TRACEFS, "tracefs"), (kernel.DEBUGFS, "debugfs"))
             if kernel.mounted(p, t)]
    return [p if p == kernel.TRACEFS else f"{p}/tracing" for p in found]


def check_tracefs() -> Check:
    path = kernel.tracefs_path()
    if path:
        return Check("tracefs", True, f"mounted at {path}")
    mounts = _tracefs_mounts()
    if mounts:
        # Mounted, but this user may not look inside (tracefs is mode 700): not a mount
        # problem, and mounting again would not help.
        return Check("tracefs", False, f"mounted at {mounts[0]} but not readable by uid "
                     f"{os.geteuid()}", _privileges_fix(), {"tracepoint", "kprobe"})
    if os.geteuid() == 0:
        return Check("tracefs", True, "not mounted; `imdswatch run` mounts it (running as root)")
    fix = ("mount the node's /sys/kernel/tracing and /sys/kernel/debug into the container "
           "(the imdswatch DaemonSet does)" if deployment() == "container" else
           "sudo mount -t tracefs nodev /sys/kernel/tracing && "
           "sudo mount -t debugfs nodev /sys/kernel/debug")
    return Check("tracefs", False, "tracefs/debugfs not mounted", fix, {"tracepoint", "kprobe"})


def check_tracepoint() -> Check:
    path = kernel.tracefs_path()
    if path is None:
        return Check("tracepoint", os.geteuid() == 0,
                     "cannot be checked until tracefs is mounted and readable",
                     "" if os.geteuid() == 0 else "see tracefs above", set())
    if os.path.isdir(f"{path}/events/{TRACEPOINT}"):
        return Check("tracepoint", True, "sock:inet_sock_set_state present")
    return Check("tracepoint", False, "sock:inet_sock_set_state missing",
                 "use a kernel >= 4.16 built with CONFIG_TRACEPOINTS, or --probe kprobe",
                 {"tracepoint"})


def check_kprobes() -> Check:
    if not kernel.kprobes_available():
        return Check("kprobes", False, "kernel built without kprobes (CONFIG_KPROBES off)",
                     "use --probe cgroup or tracepoint (auto does), or a kernel with "
                     "CONFIG_KPROBES=y",
                     {"kprobe"})
    if not kernel.kallsyms_has("tcp_v4_connect"):
        return Check("kprobes", False, "tcp_v4_connect not in /proc/kallsyms",
                     "use --probe tracepoint", {"kprobe"})
    return Check("kprobes", True, "kprobes available; tcp_v4_connect traceable")


def check_btf() -> Check:
    if kernel.btf_available():
        return Check("btf", True, "kernel BTF at /sys/kernel/btf/vmlinux")
    return Check("btf", False, "no kernel BTF (/sys/kernel/btf/vmlinux): fentry impossible",
                 "use a kernel built with CONFIG_DEBUG_INFO_BTF=y (kprobe and tracepoint modes "
                 "do not need it)", {"fentry"})


def check_fentry(try_load: bool) -> Check:
    if not kernel.btf_available():
        return Check("fentry", False, "no kernel BTF (/sys/kernel/btf/vmlinux)",
                     "use a kernel built with CONFIG_DEBUG_INFO_BTF=y, or --probe tracepoint",
                     {"fentry"})
    if not kernel.kallsyms_has("bpf_trampoline_link_prog"):
        return Check("fentry", False, "kernel has no BPF trampolines",
                     "use --probe kprobe or tracepoint", {"fentry"})
    if not try_load:
        return Check("fentry", True, "BTF and trampolines present (load not tried)")
    try:
        b = probes.compile_mode("fentry")
        try:
            probes.load_mode(b, "fentry")
        finally:
            probes.release(b)
    except probes.ProbeError as exc:
        lock = kernel.lockdown()
        why = f"; kernel lockdown is '{lock}'" if lock and lock != "none" else ""
        return Check("fentry", False, f"the kernel refuses fentry programs ({exc}){why}",
                     "a kernel that allows BPF trampolines (CONFIG_BPF_JIT, "
                     "CONFIG_DYNAMIC_FTRACE_WITH_DIRECT_CALLS, no LSM/lockdown veto); until "
                     "then auto falls back to kprobe, cgroup or tracepoint",
                     {"fentry"})
    return Check("fentry", True, "fentry programs load")


def check_cgroup2(root: str | None = None) -> Check:
    try:
        path = cgroup_attach.cgroup2_root(root)
    except cgroup_attach.CgroupError as exc:
        fix = ("mount the node's /sys/fs/cgroup at /host/sys/fs/cgroup (the imdswatch "
               "DaemonSet does)" if deployment() == "container" else
               "mount it (mount -t cgroup2 none /sys/fs/cgroup/unified) or set "
               "agent.cgroup_root")
        return Check("cgroup v2", False, str(exc),
                     f"{fix}; until then auto falls back to the tracepoint", {"cgroup"})
    return Check("cgroup v2", True, f"cgroup2 root at {path}")


def check_cgroup_programs(try_attach: bool, root: str | None = None) -> list[Check]:
    """The cgroup connect hooks and request capture's egress program, on one compile:
    loaded and, as root, attached to the root cgroup and detached for real."""
    if not try_attach:
        return [Check("cgroup hooks", True, "connect4/connect6 hooks (load not tried)")]
    b = None
    try:
        try:
            b = probes.compile_mode("cgroup")
            probes.load_mode(b, "cgroup")
            if os.geteuid() != 0:
                return [Check("cgroup hooks", True, "connect4/connect6 programs load (attach "
                              "not tried: not root)")]
            probes.attach_mode(b, "cgroup", root)
        except (probes.ProbeError, cgroup_attach.CgroupError, OSError) as exc:
            return [Check("cgroup hooks", False,
                          f"the cgroup connect hooks do not attach ({exc})",
                          "a kernel with CONFIG_CGROUP_BPF=y and cgroup v2; until then auto "
                          "falls back to the tracepoint", {"cgroup"})]
        hooks = Check("cgroup hooks", True, "connect4/connect6 programs load, attach to the "
                      "root cgroup and detach")
        return [hooks, _request_capture(b, root)]
    finally:
        if b is not None:
            probes.release(b)


def _request_capture(b: object, root: str | None) -> Check:
    # Attached the way the agent attaches it in cgroup mode; the other modes add only the
    # tracking hooks, which load wherever the connect hooks above do.
    try:
        limited = probes.attach_requests(b, "cgroup", root)
    except probes.ProbeError as exc:
        return Check("request capture", False, f"the egress program does not load or attach "
                     f"({exc}): connections are scored without their HTTP requests",
                     "a kernel with CONFIG_CGROUP_BPF=y and cgroup v2 (4.10 or later); "
                     "detection of callers goes on without it")
    if limited:
        return Check("request capture", True, "HTTP requests are read on connections made to "
                     f"a metadata address ({probes.REQUEST_PROGRAM_TRACKED}); {limited}")
    return Check("request capture", True, "HTTP requests on metadata connections are read "
                 f"({probes.REQUEST_PROGRAM}), NAT'ed connections included")


def check_enforcement(release: str | None = None) -> Check:
    """Whether `run --enforce deny` can work here (nothing loaded: the programs compile at
    start, and the agent stays in audit, saying why, if they do not load)."""
    from tracer.enforcer import EXTRA_FIELDS

    fix = ("--enforce audit works everywhere; deny needs the kernel's BTF and cgroup BPF "
           "links (Linux 5.7 or later)")
    try:
        b = btf.BTF.kernel()
        btf.task_offsets(b)
        for _macro, struct, member in EXTRA_FIELDS:
            b.offset(struct, member)
    except (btf.BTFError, OSError) as exc:
        return Check("enforcement", False, f"--enforce deny unavailable: {exc}", fix)
    if kernel.kernel_version(release) < (5, 7):
        return Check("enforcement", False, "--enforce deny unavailable: no cgroup BPF links "
                     f"before Linux 5.7 ({release or platform.release()})", fix)
    # Socket maps (sk_psock) come with CONFIG_BPF_STREAM_PARSER (NET_SOCK_MSG from 5.13):
    # without them the sock_ops and sk_msg programs that judge requests cannot run.
    requests = ("requests judged in the kernel too (sock_ops, sk_msg)"
                if "sk_psock" in b.structs else
                "requests only reported (would_deny): this kernel has no socket maps "
                "(CONFIG_BPF_STREAM_PARSER)")
    return Check("enforcement", True, "--enforce deny available: the caller's executable "
                 f"(device, inode) from BTF, cgroup BPF links; {requests}")


def checks(try_load: bool = True, cgroup_root: str | None = None) -> list[Check]:
    out = [check_privileges(), check_kernel(), check_bcc(), check_headers(), check_tracefs(),
           check_tracepoint(), check_kprobes(), check_btf()]
    runnable = not any("all" in c.blocks for c in out)
    out.append(check_fentry(try_load and runnable))
    cg = check_cgroup2(cgroup_root)
    out.append(cg)
    if cg.ok:
        out += check_cgroup_programs(try_load and runnable, cgroup_root)
    out.append(check_enforcement())
    return out


def predicted_mode(results: list[Check], requested: str = "auto") -> str | None:
    """The mode `requested` would attach, judged from the checks alone."""
    blocked: set[str] = set().union(*(c.blocks for c in results if not c.ok))
    if "all" in blocked:
        return None
    order = probes.AUTO_ORDER if requested == "auto" else (requested,)
    return next((m for m in order if m not in blocked), None)


def preflight(probe: str, cgroup_root: str | None = None) -> list[str]:
    """Fatal problems for `imdswatch run --probe PROBE`, each with its fix; empty when the
    run may proceed. Fast: compiles nothing."""
    results = checks(try_load=False, cgroup_root=cgroup_root)
    problems = [f"{c.name}: {c.detail}; fix: {c.fix}" for c in results
                if not c.ok and "all" in c.blocks]
    if problems:
        return problems
    if predicted_mode(results, probe) is None:
        relevant = [c for c in results if not c.ok and (probe in c.blocks or probe == "auto")]
        return [f"{c.name}: {c.detail}; fix: {c.fix}" for c in relevant] or [
            f"no probe mode can attach for --probe {probe}"]
    return []


def _auto_choice(cgroup_root: str | None = None) -> tuple[str | None, str, Check | None]:
    """Attach for real, then detach: the only sure answer to what auto picks. Compiled as
    the agent compiles it, with the kernel-side identity where BTF allows; the identity
    record's programs (bpf/identity.h) are attached too, and their check returned."""
    record: Check | None = None
    fix = ("a kernel with BTF (CONFIG_DEBUG_INFO_BTF=y, Linux 5.5 or later): executables, "
           "command lines and parents then come from /proc only, and are missing for "
           "callers that exit at once")
    try:
        offsets: dict[str, int] | None = btf.task_offsets()
    except btf.BTFError as exc:
        offsets = None
        record = Check("identity record", False, f"no kernel-side identity: {exc}", fix)
    if offsets is not None:
        try:
            offsets.update(btf.record_offsets())
        except btf.BTFError as exc:
            record = Check("identity record", False, f"the kernel's BTF lacks a field: {exc}",
                           fix)
    try:
        b, mode = probes.open_mode("auto", cgroup_root=cgroup_root,
                                   ringbuf=kernel.ringbuf_supported(), offsets=offsets)
    except probes.ProbeError as exc:
        return None, str(exc), record
    try:
        if record is None:
            try:
                probes.attach_identity(b)
                record = Check("identity record", True, "exec, fork and exit programs load "
                               "and attach: callers that exit at once keep their executable, "
                               "command line and parent")
            except probes.ProbeError as exc:
                record = Check("identity record", False, str(exc), fix)
    finally:
        probes.release(b)
    return mode, "attached and detached for this check", record


def run_doctor(cgroup_root: str | None = None) -> int:
    """Print every check with its fix and the probe auto would pick. 0 when a probe can
    attach, 1 otherwise. `cgroup_root`: the config's `agent.cgroup_root`, which the agent
    would attach under (what the cgroup v2 check's fix asks to set)."""
    results = checks(try_load=True, cgroup_root=cgroup_root)
    for c in results:
        print(f"[{c.status}] {c.name}: {c.detail}")
        if not c.ok and c.fix:
            print(f"       fix: {c.fix}")
    mode = predicted_mode(results)
    if mode is not None and os.geteuid() == 0:
        mode, how, record = _auto_choice(cgroup_root)
        if record is not None:
            print(f"[{record.status}] {record.name}: {record.detail}")
            if not record.ok:
                print(f"       fix: {record.fix}")
        print(f"probe: auto picks {mode} ({how})" if mode else f"probe: none attaches: {how}")
    elif mode is not None:
        print(f"probe: auto would pick {mode} (from the checks above)")
    else:
        print("probe: none can attach until the failures above are fixed")
    return 0 if mode else 1
