"""A traced connection as the contract's ECS document (contract §1), the same shape the
replay reads, so `scoring.events.event_from_ecs` treats live and replayed events alike.
Extra fields are optional additions: `event.outcome`, `network.*`, `process.thread.id`,
`process.args`, `group.id`, `container.runtime`, `orchestrator.resource.id` (pod UID) and
the `imdswatch.*` object (probe, cgroup id, kernel uid, connect result, enrichment flag).
Where the Kubernetes API resolved the pod UID, the contract's `orchestrator.namespace` and
`orchestrator.resource.name` are filled, and `container.image.name` from the pod's status."""

from __future__ import annotations

import errno
import os

from tracer.clock import rfc3339
from tracer.enrich import ProcessInfo
from tracer.layout import AF_INET, F_NAT, KIND_SYN, KernelEvent


def outcome(result: int | None) -> str | None:
    """connect() returning 0 or -EINPROGRESS (non-blocking) started the handshake."""
    if result is None:
        return None
    return "success" if result in (0, -errno.EINPROGRESS) else "failure"


EXE_NAME_MAX = 47  # IMDS_EXE_LEN - 1: longer names arrive cut


def exe_mismatch(ev: KernelEvent, info: ProcessInfo) -> bool:
    """True when /proc's executable is not the one the kernel saw at connect time: another
    file name, or the same name on another inode (a copy in /tmp exec'ing the real agent)."""
    if info.exited or not info.exe or ev.exe_name is None:
        return False
    base = os.path.basename(info.exe)
    kernel = ev.exe_name
    if len(kernel.encode()) >= EXE_NAME_MAX:  # cut by the kernel record's size
        if not base.encode().startswith(kernel.encode()):
            return True
    elif base != kernel:
        return True
    return bool(ev.exe_ino and info.exe_ino and ev.exe_ino != info.exe_ino)


# Contract section 6: the caller-identity fields every live event carries when known;
# `imdswatch.identity.missing` lists those absent (never guessed).
IDENTITY_FIELDS = ("process.executable", "process.command_line", "process.args",
                   "process.parent.pid", "process.parent.name", "process.start", "user.id",
                   "group.id", "container.id")


def _record_exe(ev: KernelEvent) -> str | None:
    """The identity record's executable, unless the executable the connect hook read from
    the task disagrees with it (a record that is not this process's: never passed on)."""
    rec = ev.identity
    if rec is None or rec.executable is None:
        return None
    if ev.exe_name is not None:
        leaf = rec.executable.rsplit("/", 1)[-1].encode()
        kernel = ev.exe_name.encode()
        if not (leaf == kernel or (len(kernel) >= EXE_NAME_MAX and leaf.startswith(kernel))):
            return None
    return rec.executable


def to_ecs(
    ev: KernelEvent,
    info: ProcessInfo,
    *,
    wall_ns: int,
    host_name: str | None,
    event_id: str,
    user_name: str | None,
    pod: tuple[str, str] | None = None,
    image: str | None = None,
    start_wall_ns: int | None = None,
) -> dict:
    """`pod` is the (namespace, pod name) of the cgroup's pod UID and `image` the image of
    its container id, when known (tracer.kubernetes.PodDirectory). `start_wall_ns`: the
    process's start as wall-clock ns (from the kernel's record, else /proc), when known.

    Identity per field: the kernel's record (bpf/identity.h, copied into the event at the
    connect) first, /proc (read after the event arrived) for what the record lacks; the
    fields taken from /proc are listed in `imdswatch.identity.from_proc`."""
    uid = info.euid if info.euid is not None else ev.uid
    gid = info.egid if info.egid is not None else ev.gid
    # The process is named by its thread-group leader; the calling thread's own name
    # (io_uring's iou-wrk-N, a JVM thread) is kept beside it when different.
    name = ev.process_name if ev.process_name is not None else ev.comm
    thread: dict = {"id": ev.tid}
    if ev.comm != name:
        thread["name"] = ev.comm
    process: dict = {"name": name, "pid": ev.tgid, "thread": thread}
    kernel_process: dict = {}
    mismatch = exe_mismatch(ev, info)
    rec = ev.identity
    from_proc: list[str] = []
    if ev.exe_name is not None or ev.exe_ino:
        kernel_process["kernel_executable"] = {"name": ev.exe_name or "", "inode": ev.exe_ino}
    if mismatch:
        # What /proc shows is not what connected (it exec'd since, or the binary was
        # replaced): /proc's executable is kept aside, never passed off as the caller's.
        kernel_process["exe_mismatch"] = True
        if info.exe:
            kernel_process["proc_executable"] = info.exe
    executable = _record_exe(ev)
    if executable is None and not mismatch and info.exe:
        executable = info.exe
        from_proc.append("process.executable")
    if executable:
        process["executable"] = executable
    if rec is not None and rec.args:
        process["command_line"] = " ".join(rec.args)
        process["args"] = rec.args
        if rec.args_cut:
            kernel_process["args_truncated"] = True
    elif info.command_line:
        process["command_line"] = info.command_line
        process["args"] = info.args
        from_proc += ["process.command_line", "process.args"]
    ppid, parent_name = (rec.ppid, rec.parent_name) if rec is not None else (None, None)
    if ppid is None and info.ppid:
        ppid, parent_name = info.ppid, info.parent_name
        from_proc += ["process.parent.pid", "process.parent.name"]
    if ppid:
        parent: dict = {"pid": ppid}
        if parent_name:
            parent["name"] = parent_name
        if info.parent_exe and info.ppid == ppid:
            parent["executable"] = info.parent_exe
        process["parent"] = parent
    if start_wall_ns is not None:
        process["start"] = rfc3339(start_wall_ns)
        if rec is None or rec.start_ns is None:
            from_proc.append("process.start")
    user: dict = {"id": str(uid)}
    if user_name:
        user["name"] = user_name
    event: dict = {
        "id": event_id,
        "kind": "event",
        "category": ["network"],
        "type": ["connection", "start"],
        "action": "connection_attempted",
        "module": "imdswatch",
        "dataset": "imdswatch.connect",
    }
    result = outcome(ev.result)
    if result:
        event["outcome"] = result
    imds: dict = {"probe": ev.probe, "cgroup_id": ev.cgroup_id, "kernel_uid": ev.uid}
    if ev.cookie:  # the cgroup mode: the agent tells by it a connect the enforcer refused
        imds["socket_cookie"] = ev.cookie
    if kernel_process:
        imds["process"] = kernel_process
    if ev.kind == KIND_SYN and ev.flags & F_NAT and ev.sock_ip is not None:
        # Seen only after NAT: where connect() was pointed, before a DNAT rule moved it.
        imds["nat"] = {"original_destination": {"ip": ev.sock_ip, "port": ev.sock_port}}
    if ev.result is not None:
        imds["connect_result"] = ev.result
    if info.exited:
        imds["exited_before_enrichment"] = True
    identity: dict = {}
    if rec is not None:
        identity["record"] = rec.source
    if from_proc:
        identity["from_proc"] = from_proc
    doc: dict = {
        "@timestamp": rfc3339(wall_ns),
        "event": event,
        "destination": {"ip": ev.dst_ip, "port": ev.dst_port},
        "network": {"transport": "tcp", "type": "ipv4" if ev.family == AF_INET else "ipv6"},
        "process": process,
        "user": user,
        "group": {"id": str(gid)},
        "imdswatch": imds,
    }
    if host_name:
        doc["host"] = {"name": host_name}
    cg = info.cgroup
    if cg is not None and cg.container_id:
        container: dict = {"id": cg.container_id, "runtime": cg.runtime}
        if image:
            container["image"] = {"name": image}
        doc["container"] = container
    if cg is not None and cg.pod_uid:
        resource: dict = {"type": "pod", "id": cg.pod_uid}
        orchestrator: dict = {"type": "kubernetes", "resource": resource}
        if pod is not None:
            orchestrator["namespace"], resource["name"] = pod
        doc["orchestrator"] = orchestrator
    # container.id is missing only when the cgroup could not be read at all: a process
    # outside any container has none to miss.
    missing = [f for f in IDENTITY_FIELDS if f not in ("container.id", "user.id", "group.id")
               and _absent(doc, f)]
    if cg is None:
        missing.append("container.id")
    if missing:
        identity["missing"] = missing
    if identity:
        imds["identity"] = identity
    return doc


def _absent(doc: dict, dotted: str) -> bool:
    node: object = doc
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return True
        node = node[part]
    return node in (None, "", [])
