"""The DaemonSet's container as `podman run` flags, derived from the manifest itself, so the
image test (`make test-image`) runs the image exactly as Kubernetes would and cannot drift
from it: every field of the pod and container spec is either translated or listed here as
one that has no meaning outside a cluster; any other field is an error that names it. The
fleet scorer's Deployment (`imdswatch serve`) goes through the same translation.

    python scripts/daemonset_podman.py [--state-dir DIR] [--node-name NAME]
prints {"run": [...flags...], "args": [...], "grace": s, "port": n, "probes": {...}} as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DAEMONSET = ROOT / "deploy" / "kubernetes" / "base" / "daemonset.yaml"
SERVE_DEPLOYMENT = ROOT / "deploy" / "kubernetes" / "components" / "fleet" / \
    "serve-deployment.yaml"

# Pod-level fields that only a cluster acts on (scheduling, API identity): nothing to run.
POD_CLUSTER_ONLY = {"serviceAccountName", "tolerations", "priorityClassName", "nodeSelector",
                    "automountServiceAccountToken"}
# Container fields with no effect on how the process runs; the probes and port are returned
# for the test to exercise, and requests only inform the scheduler.
CONTAINER_CLUSTER_ONLY = {"name", "image", "imagePullPolicy"}
FIELD_REFS = {"spec.nodeName"}


class Untranslatable(ValueError):
    """The DaemonSet uses a field this translation does not know."""


@dataclass
class PodmanRun:
    run: list[str] = field(default_factory=list)
    args: list[str] = field(default_factory=list)
    grace: int = 30
    port: int = 0  # the one the probes ask
    ports: dict[str, int] = field(default_factory=dict)  # every container port, by name
    probes: dict[str, str] = field(default_factory=dict)
    host_dirs: list[str] = field(default_factory=list)  # DirectoryOrCreate: made before run


def _unknown(where: str, keys: set[str]) -> None:
    if keys:
        raise Untranslatable(f"{where} uses {', '.join(sorted(keys))}, which "
                             "scripts/daemonset_podman.py does not translate: teach it")


def _memory(quantity: str) -> str:
    units = {"Ki": "k", "Mi": "m", "Gi": "g"}
    for suffix, podman in units.items():
        if quantity.endswith(suffix):
            return quantity[: -len(suffix)] + podman
    if quantity.isdigit():
        return quantity
    raise Untranslatable(f"memory quantity {quantity!r}")


def pod_security(ctx: dict) -> tuple[dict, list[str]]:
    """The pod's securityContext: (what the container's inherits, flags of its own)."""
    _unknown("pod securityContext", set(ctx) - {"runAsUser", "runAsGroup", "runAsNonRoot",
                                                  "fsGroup", "seccompProfile"})
    flags = []
    if "fsGroup" in ctx:
        flags.append(f"--group-add={ctx['fsGroup']}")
    seccomp = ctx.get("seccompProfile", {}).get("type", "RuntimeDefault")
    if seccomp != "RuntimeDefault":  # podman applies its default profile, as the kubelet
        raise Untranslatable(f"seccompProfile {seccomp}")
    inherited = {k: ctx[k] for k in ("runAsUser", "runAsGroup", "runAsNonRoot") if k in ctx}
    return inherited, flags


def security(ctx: dict) -> list[str]:
    known = {"runAsUser", "runAsGroup", "runAsNonRoot", "privileged",
             "allowPrivilegeEscalation", "readOnlyRootFilesystem", "capabilities"}
    _unknown("securityContext", set(ctx) - known)
    out = []
    if "runAsUser" in ctx:
        group = f":{ctx['runAsGroup']}" if "runAsGroup" in ctx else ""
        out.append(f"--user={ctx['runAsUser']}{group}")
    if ctx.get("runAsNonRoot") and ctx.get("runAsUser", 1) == 0:
        raise Untranslatable("runAsNonRoot with runAsUser 0 would not start")
    if ctx.get("privileged"):
        out.append("--privileged")
    if ctx.get("allowPrivilegeEscalation") is False:
        out.append("--security-opt=no-new-privileges")
    if ctx.get("readOnlyRootFilesystem"):
        # Kubernetes adds no tmpfs of its own: only the volumes the spec mounts are writable.
        out += ["--read-only", "--read-only-tmpfs=false"]
    caps = ctx.get("capabilities", {})
    _unknown("capabilities", set(caps) - {"drop", "add"})
    out += [f"--cap-drop={c.lower()}" for c in caps.get("drop", [])]
    out += [f"--cap-add={c.lower()}" for c in caps.get("add", [])]
    return out


def volumes(pod: dict, container: dict, state_dir: str | None,
            secret_dirs: dict[str, str] | None = None,
            host_paths: dict[str, str] | None = None) -> tuple[list[str], list[str]]:
    """(flags, host directories to create) for the container's volume mounts. A
    persistentVolumeClaim is the state directory; a secret or a configMap is the host
    directory the caller filled with its keys (`secret_dirs`: volume name -> directory); a
    hostPath named in `host_paths` is that directory instead of the host's."""
    by_name = {v["name"]: v for v in pod.get("volumes", [])}
    flags: list[str] = []
    create: list[str] = []
    for m in container.get("volumeMounts", []):
        _unknown(f"volumeMount {m['name']}", set(m) - {"name", "mountPath", "readOnly"})
        vol = by_name[m["name"]]
        _unknown(f"volume {m['name']}", set(vol) - {"name", "hostPath", "emptyDir",
                                                     "persistentVolumeClaim", "secret",
                                                     "configMap"})
        ro = ":ro" if m.get("readOnly") else ""
        if "persistentVolumeClaim" in vol:
            if not state_dir:
                raise Untranslatable(f"volume {m['name']}: a claim needs a state directory")
            create.append(state_dir)
            flags.append(f"--volume={state_dir}:{m['mountPath']}{ro}")
        elif "configMap" in vol:
            _unknown(f"configMap {m['name']}", set(vol["configMap"]) - {"name"})
            if not (secret_dirs or {}).get(m["name"]):
                raise Untranslatable(f"volume {m['name']}: no directory for the configMap")
            flags.append(f"--volume={secret_dirs[m['name']]}:{m['mountPath']}:ro")
        elif "secret" in vol:
            _unknown(f"secret {m['name']}", set(vol["secret"]) - {"secretName", "defaultMode"})
            if not (secret_dirs or {}).get(m["name"]):
                raise Untranslatable(f"volume {m['name']}: no directory for the secret")
            flags.append(f"--volume={secret_dirs[m['name']]}:{m['mountPath']}:ro")
        elif "hostPath" in vol:
            hp = vol["hostPath"]
            _unknown(f"hostPath {m['name']}", set(hp) - {"path", "type"})
            path = hp["path"]
            if m["name"] in (host_paths or {}):
                path = host_paths[m["name"]]  # type: ignore[index]
                flags.append(f"--volume={path}:{m['mountPath']}" + (":ro" if m.get("readOnly")
                                                                      else ""))
                continue
            # The model's state is the one host directory the agent writes: a test keeps its
            # own instead of the host's.
            if state_dir and hp.get("type") == "DirectoryOrCreate":
                path = state_dir
            if hp.get("type") == "DirectoryOrCreate":
                create.append(path)
            elif hp.get("type") not in (None, "Directory"):
                raise Untranslatable(f"hostPath type {hp['type']}")
            flags.append(f"--volume={path}:{m['mountPath']}" + (":ro" if m.get("readOnly")
                                                                  else ""))
        else:
            ed = vol["emptyDir"] or {}
            _unknown(f"emptyDir {m['name']}", set(ed) - {"sizeLimit"})
            size = f",size={_memory(ed['sizeLimit'])}" if "sizeLimit" in ed else ""
            flags.append(f"--tmpfs={m['mountPath']}:rw,mode=1777{size}")
    return flags, create


def translate(daemonset: dict, state_dir: str | None = None,
              node_name: str = "imdswatch-test-node",
              secret_dirs: dict[str, str] | None = None,
              host_paths: dict[str, str] | None = None) -> PodmanRun:
    """`daemonset`: the DaemonSet, or any workload with one container in its pod template
    (the serve Deployment)."""
    pod = daemonset["spec"]["template"]["spec"]
    _unknown("pod spec", set(pod) - POD_CLUSTER_ONLY - {
        "hostPID", "hostNetwork", "terminationGracePeriodSeconds", "containers", "volumes",
        "securityContext"})
    (container,) = pod["containers"]
    _unknown("container", set(container) - CONTAINER_CLUSTER_ONLY - {
        "args", "env", "ports", "livenessProbe", "readinessProbe", "resources",
        "securityContext", "volumeMounts"})
    r = PodmanRun(args=list(container.get("args", [])),
                  grace=int(pod.get("terminationGracePeriodSeconds", 30)))
    if pod.get("hostPID"):
        r.run.append("--pid=host")
    if pod.get("hostNetwork"):
        r.run.append("--network=host")
    for e in container.get("env", []):
        if "value" in e:
            r.run.append(f"--env={e['name']}={e['value']}")
        else:
            ref = e["valueFrom"]["fieldRef"]["fieldPath"]
            if ref not in FIELD_REFS:
                raise Untranslatable(f"env {e['name']} from {ref}")
            r.run.append(f"--env={e['name']}={node_name}")
    for port in container.get("ports", []):
        _unknown("port", set(port) - {"name", "containerPort", "protocol"})
        r.ports[port.get("name", str(port["containerPort"]))] = int(port["containerPort"])
    for kind in ("livenessProbe", "readinessProbe"):
        probe = container.get(kind)
        if probe:
            _unknown(kind, set(probe) - {"httpGet", "initialDelaySeconds", "periodSeconds",
                                         "timeoutSeconds", "failureThreshold"})
            r.probes[kind] = probe["httpGet"]["path"]
            asked = probe["httpGet"]["port"]
            r.port = r.ports[asked] if isinstance(asked, str) else int(asked)
    if not r.port:
        (r.port,) = r.ports.values()
    res = container.get("resources", {})
    _unknown("resources", set(res) - {"requests", "limits"})
    limits = res.get("limits", {})
    _unknown("resources.limits", set(limits) - {"memory", "cpu"})
    if "memory" in limits:
        r.run.append(f"--memory={_memory(limits['memory'])}")
    if "cpu" in limits:
        r.run.append(f"--cpus={limits['cpu']}")
    inherited, pod_flags = pod_security(pod.get("securityContext", {}))
    r.run += security({**inherited, **container.get("securityContext", {})}) + pod_flags
    flags, r.host_dirs = volumes(pod, container, state_dir, secret_dirs, host_paths)
    r.run += flags
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--state-dir")
    ap.add_argument("--node-name", default="imdswatch-test-node")
    a = ap.parse_args()
    try:
        r = translate(yaml.safe_load(DAEMONSET.read_text()), a.state_dir, a.node_name)
    except Untranslatable as exc:
        print(f"daemonset_podman: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(r.__dict__))
    return 0


if __name__ == "__main__":
    sys.exit(main())
