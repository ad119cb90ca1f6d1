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
) -> dict:
    """`pod` is the (namespace, pod name) of the cgroup's pod UID and `image` the image of
    its container id, when known (tracer.kubernetes.PodDirectory)."""
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
    if ev.exe_name is not None or ev.exe_ino:
        kernel_process["kernel_executable"] = {"name": ev.exe_name or "", "inode": ev.exe_ino}
    if mismatch:
        # What /proc shows is not what connected (it exec'd since, or the binary was
        # replaced): /proc's executable is kept aside, never passed off as the caller's.
        kernel_process["exe_mismatch"] = True
        if info.exe:
            kernel_process["proc_executable"] = info.exe
    elif info.exe:
        process["executable"] = info.exe
    if info.command_line:
        process["command_line"] = info.command_line
        process["args"] = info.args
    if info.ppid:
        parent: dict = {"pid": info.ppid}
        if info.parent_name:
            parent["name"] = info.parent_name
        if info.parent_exe:
            parent["executable"] = info.parent_exe
        process["parent"] = parent
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
    if kernel_process:
        imds["process"] = kernel_process
    if ev.kind == KIND_SYN and ev.flags & F_NAT and ev.sock_ip is not None:
        # Seen only after NAT: where connect() was pointed, before a DNAT rule moved it.
        imds["nat"] = {"original_destination": {"ip": ev.sock_ip, "port": ev.sock_port}}
    if ev.result is not None:
        imds["connect_result"] = ev.result
    if info.exited:
        imds["exited_before_enrichment"] = True
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
    return doc
