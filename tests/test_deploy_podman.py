"""`make test-image` runs the image with flags derived from the DaemonSet
(scripts/daemonset_podman.py), so the two cannot drift: every security setting, mount,
argument and variable of the manifest reaches podman, and a field the translation does not
know is an error rather than something silently left out of the test."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from daemonset_podman import (  # noqa: E402
    DAEMONSET,
    SERVE_DEPLOYMENT,
    Untranslatable,
    translate,
)

SPEC = yaml.safe_load(DAEMONSET.read_text())
POD = SPEC["spec"]["template"]["spec"]
(CONTAINER,) = POD["containers"]


def test_security_context_reaches_podman():
    run = translate(SPEC).run
    ctx = CONTAINER["securityContext"]
    assert f"--user={ctx['runAsUser']}" in run
    assert ("--read-only" in run) == ctx["readOnlyRootFilesystem"]
    assert ("--privileged" in run) == ctx["privileged"]
    assert ("--security-opt=no-new-privileges" in run) == (not ctx["allowPrivilegeEscalation"])
    dropped = {f.split("=", 1)[1] for f in run if f.startswith("--cap-drop=")}
    added = {f.split("=", 1)[1] for f in run if f.startswith("--cap-add=")}
    assert dropped == {c.lower() for c in ctx["capabilities"]["drop"]}
    assert added == {c.lower() for c in ctx["capabilities"]["add"]}
    assert ("--pid=host" in run) == POD["hostPID"]
    assert "--network=host" not in run  # the pod has its own network namespace


def test_every_mount_args_env_and_limit_reach_podman():
    r = translate(SPEC, state_dir="/tmp/state", node_name="node-a")
    mounts = [f for f in r.run if f.startswith(("--volume=", "--tmpfs="))]
    assert len(mounts) == len(CONTAINER["volumeMounts"])
    for m in CONTAINER["volumeMounts"]:
        (flag,) = [f for f in mounts if f":{m['mountPath']}" in f or f"={m['mountPath']}:" in f]
        assert flag.endswith(":ro") == bool(m.get("readOnly")), flag
    assert "--volume=/tmp/state:/var/lib/imdswatch" in r.run  # the test's own state dir
    assert r.host_dirs == ["/tmp/state"]
    assert r.args == CONTAINER["args"]
    assert "--env=NODE_NAME=node-a" in r.run and "--env=PYTHONUNBUFFERED=1" in r.run
    assert f"--memory={CONTAINER['resources']['limits']['memory'][:-2]}m" in r.run
    assert r.grace == POD["terminationGracePeriodSeconds"]
    assert r.port == CONTAINER["ports"][0]["containerPort"]
    assert r.probes == {"livenessProbe": CONTAINER["livenessProbe"]["httpGet"]["path"],
                        "readinessProbe": CONTAINER["readinessProbe"]["httpGet"]["path"]}


@pytest.mark.parametrize("where, key, value", [
    ("pod", "hostIPC", True),
    ("container", "command", ["sh"]),
    ("security", "seccompProfile", {"type": "Unconfined"}),
    ("mount", "mountPropagation", "Bidirectional"),
    ("env", "valueFrom", {"fieldRef": {"fieldPath": "status.podIP"}}),
])
def test_a_field_the_translation_does_not_know_is_an_error(where, key, value):
    spec = copy.deepcopy(SPEC)
    pod = spec["spec"]["template"]["spec"]
    c = pod["containers"][0]
    target = {"pod": pod, "container": c, "security": c["securityContext"],
              "mount": c["volumeMounts"][0], "env": c["env"][0]}[where]
    target[key] = value
    with pytest.raises(Untranslatable):
        translate(spec)


SERVE = yaml.safe_load(SERVE_DEPLOYMENT.read_text())


def test_the_serve_deployment_translates_too():
    """The fleet scorer's Deployment: pod-level user, group and fsGroup, no capability at
    all, its claim as the test's state directory, the token secret as a read-only mount."""
    pod = SERVE["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    r = translate(SERVE, state_dir="/tmp/serve-state",
                  secret_dirs={"fleet-token": "/tmp/serve-token"})
    ctx = pod["securityContext"]
    assert f"--user={ctx['runAsUser']}:{ctx['runAsGroup']}" in r.run
    assert f"--group-add={ctx['fsGroup']}" in r.run
    assert "--cap-drop=all" in r.run and not any(f.startswith("--cap-add") for f in r.run)
    assert "--read-only" in r.run and "--pid=host" not in r.run
    assert "--volume=/tmp/serve-state:/var/lib/imdswatch-serve" in r.run
    assert "--volume=/tmp/serve-token:/etc/imdswatch/fleet:ro" in r.run
    assert r.args == c["args"] and r.args[0] == "serve"
    assert r.ports == {p["name"]: p["containerPort"] for p in c["ports"]}
    assert r.port == r.ports["metrics"] and r.grace == pod["terminationGracePeriodSeconds"]
    with pytest.raises(Untranslatable, match="secret"):
        translate(SERVE, state_dir="/tmp/serve-state")
    bad = copy.deepcopy(SERVE)
    bad["spec"]["template"]["spec"]["securityContext"]["seccompProfile"] = {"type": "Unconfined"}
    with pytest.raises(Untranslatable, match="seccomp"):
        translate(bad, state_dir="/tmp/s", secret_dirs={"fleet-token": "/tmp/t"})


def test_the_enforcement_patches_translate():
    """components/enforcement and enforcement-deny on the DaemonSet: the policy ConfigMap and
    the break-glass hostPath as directories the image test gives, the node selector a
    cluster-only field, deny's args after audit's (the last --enforce wins)."""
    from test_deploy_manifests import json_patch

    comps = ROOT / "deploy" / "kubernetes" / "components"
    ds = copy.deepcopy(SPEC)
    json_patch(ds, yaml.safe_load((comps / "enforcement" / "daemonset-enforce-patch.yaml")
                                  .read_text()))
    json_patch(ds, yaml.safe_load((comps / "enforcement-deny" / "daemonset-deny-patch.yaml")
                                  .read_text()))
    with pytest.raises(Untranslatable, match="configMap"):
        translate(ds, state_dir="/tmp/s")
    r = translate(ds, state_dir="/tmp/s", secret_dirs={"policy": "/tmp/p"},
                  host_paths={"break-glass": "/tmp/run"})
    assert "--volume=/tmp/p:/etc/imdswatch/policy:ro" in r.run
    assert "--volume=/tmp/run:/run/imdswatch" in r.run
    assert r.args.index("--enforce=deny") > r.args.index("--enforce=audit")
