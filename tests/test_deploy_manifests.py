"""The Kustomize base, components and overlays are consistent, render to valid Kubernetes
objects (checked offline against the Kubernetes JSON schemas with kubernetes-validate),
and carry what a BPF agent DaemonSet needs."""

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from imdswatch.cli import main

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "kubernetes"
OVERLAYS = ["base", "overlays/production", "overlays/privileged"]
# Versions the manifests must be valid for: an old supported release and the newest
# schemas kubernetes-validate ships.
K8S_VERSIONS = ["1.28.0", None]
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding"}
OPERATOR_KINDS = {"PodMonitor", "PrometheusRule"}


def load_all(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def json_patch(doc: dict, ops: list[dict]) -> None:
    """RFC 6902 add/replace/remove, enough for our patches."""
    for op in ops:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        parent = doc
        for part in parts[:-1]:
            parent = parent[int(part)] if isinstance(parent, list) else parent[part]
        last = parts[-1]
        key = (len(parent) if last == "-" else int(last)) if isinstance(parent, list) else last
        if op["op"] == "remove":
            del parent[key]
        elif op["op"] == "add" and isinstance(parent, list):
            parent.insert(key, copy.deepcopy(op["value"]))
        elif op["op"] in ("add", "replace"):
            if op["op"] == "replace":
                assert key in parent if isinstance(parent, dict) else key < len(parent)
            parent[key] = copy.deepcopy(op["value"])
        else:
            raise AssertionError(f"unsupported patch op {op['op']}")


def render(directory: Path, namespace: str | None = None) -> list[dict]:
    """A structural Kustomize render: resources, components, JSON 6902 patches, namespace,
    images. It checks that every file referenced exists and every patch hits its target."""
    kfile = directory / "kustomization.yaml"
    assert kfile.is_file(), f"{directory} has no kustomization.yaml"
    k = yaml.safe_load(kfile.read_text())
    assert k["kind"] in ("Kustomization", "Component")
    namespace = k.get("namespace", namespace)
    docs: list[dict] = []
    for ref in k.get("resources", []):
        target = (directory / ref).resolve()
        assert target.exists(), f"{kfile}: resource {ref} does not exist"
        docs += render(target, namespace) if target.is_dir() else load_all(target)
    for ref in k.get("components", []):
        comp = (directory / ref).resolve()
        assert (comp / "kustomization.yaml").is_file(), f"{kfile}: component {ref} missing"
        ck = yaml.safe_load((comp / "kustomization.yaml").read_text())
        assert ck["kind"] == "Component"
        for res in ck.get("resources", []):
            docs += load_all(comp / res)
        docs = apply_patches(comp, ck, docs)
    docs = apply_patches(directory, k, docs)
    for doc in docs:
        if namespace and doc["kind"] not in CLUSTER_SCOPED:
            doc["metadata"]["namespace"] = namespace
        for pair in k.get("labels", []):
            doc["metadata"].setdefault("labels", {}).update(pair["pairs"])
    for image in k.get("images", []):
        for doc in docs:
            for c in doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
                if c["image"] == image["name"]:
                    c["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
    return docs


def apply_patches(directory: Path, k: dict, docs: list[dict]) -> list[dict]:
    for patch in k.get("patches", []):
        target = patch["target"]
        ops = yaml.safe_load((directory / patch["path"]).read_text())
        hits = [d for d in docs if d["kind"] == target["kind"]
                and d["metadata"]["name"] == target.get("name", d["metadata"]["name"])]
        assert hits, f"patch {patch['path']} matches no resource"
        for doc in hits:
            json_patch(doc, ops)
    return docs


def by_kind(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, kind
    return found[0]


@pytest.fixture(params=OVERLAYS)
def rendered(request) -> tuple[str, list[dict]]:
    return request.param, render(K8S / request.param)


def test_every_overlay_validates_against_kubernetes_schemas(rendered) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    name, docs = rendered
    for doc in docs:
        if doc["kind"] in OPERATOR_KINDS:
            continue  # CRDs: checked structurally below
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(doc, version or kubernetes_validate.latest_version(),
                                         strict=True)


def test_operator_objects_are_well_formed(rendered) -> None:
    name, docs = rendered
    kinds = {d["kind"] for d in docs}
    if name == "base":
        assert not kinds & OPERATOR_KINDS  # the base applies to clusters without the Operator
        return
    ds = by_kind(docs, "DaemonSet")
    pm = by_kind(docs, "PodMonitor")
    assert pm["apiVersion"] == "monitoring.coreos.com/v1"
    pod_labels = ds["spec"]["template"]["metadata"]["labels"]
    assert pm["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    ports = {p["name"] for c in ds["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
    for ep in pm["spec"]["podMetricsEndpoints"]:
        assert ep["port"] in ports and ep["path"] == "/metrics"
    pr = by_kind(docs, "PrometheusRule")
    assert pr["apiVersion"] == "monitoring.coreos.com/v1"
    for group in pr["spec"]["groups"]:
        assert group["name"] and group["rules"]
        for rule in group["rules"]:
            assert ("alert" in rule) != ("record" in rule) and rule["expr"]
    for doc in docs:
        if doc["kind"] not in CLUSTER_SCOPED:
            assert doc["metadata"]["namespace"] == "imdswatch"


def test_daemonset_has_what_a_bpf_agent_needs(rendered) -> None:
    name, docs = rendered
    ds = by_kind(docs, "DaemonSet")
    spec = ds["spec"]["template"]["spec"]
    assert spec["hostPID"] is True
    assert {"operator": "Exists"} in spec["tolerations"]
    (c,) = spec["containers"]
    assert c["args"][0] == "run"
    assert "--metrics-address=0.0.0.0:9464" in c["args"]
    assert any(a.startswith("--state=/var/lib/imdswatch/") for a in c["args"])
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert c["ports"] == [{"name": "metrics", "containerPort": 9464, "protocol": "TCP"}]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert c["resources"]["requests"]["memory"] and c["resources"]["limits"]["memory"]
    sc = c["securityContext"]
    if name == "overlays/privileged":
        assert sc["privileged"] is True
    else:
        assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert {"BPF", "PERFMON", "SYS_ADMIN", "SYS_PTRACE"} <= set(sc["capabilities"]["add"])
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    for path, read_only in [("/sys/kernel/debug", False), ("/sys/kernel/tracing", False),
                            ("/lib/modules", True), ("/usr/src", True),
                            ("/var/lib/imdswatch", False)]:
        mount = mounts[path]
        assert mount.get("readOnly", False) is read_only, path
        assert volumes[mount["name"]]["hostPath"]["path"] == path
    assert volumes[mounts["/var/lib/imdswatch"]["name"]]["hostPath"]["type"] == "DirectoryOrCreate"
    # the cgroup probe attaches to the host's root cgroup, not the pod's cgroup namespace root
    cg = mounts["/host/sys/fs/cgroup"]
    assert cg["readOnly"] is True
    assert volumes[cg["name"]]["hostPath"]["path"] == "/sys/fs/cgroup"
    # Every volume is mounted and every mount has a volume.
    assert {m["name"] for m in c["volumeMounts"]} == set(volumes)
    assert c["image"] == "imdswatch:0.1.0"


def test_rbac_is_minimal_and_bound_to_the_pods_account(rendered) -> None:
    _, docs = rendered
    role = by_kind(docs, "ClusterRole")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"],
                              "verbs": ["list", "watch"]}]
    binding = by_kind(docs, "ClusterRoleBinding")
    sa = by_kind(docs, "ServiceAccount")
    ds = by_kind(docs, "DaemonSet")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                    "namespace": sa["metadata"]["namespace"]}]
    assert ds["spec"]["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]
    ns = by_kind(docs, "Namespace")
    assert ns["metadata"]["name"] == sa["metadata"]["namespace"]


@pytest.mark.skipif(shutil.which("kubectl") is None,
                    reason="kubectl not installed; the structural render above still ran")
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kubectl_kustomize_agrees(overlay: str) -> None:
    out = subprocess.run(["kubectl", "kustomize", str(K8S / overlay)], check=True,
                         capture_output=True, text=True, timeout=60).stdout
    real = [d for d in yaml.safe_load_all(out) if d]
    ours = render(K8S / overlay)
    key = lambda d: (d["kind"], d["metadata"]["name"], d["metadata"].get("namespace"))  # noqa: E731
    assert sorted(map(key, real)) == sorted(map(key, ours))
    real_ds, our_ds = by_kind(real, "DaemonSet"), by_kind(ours, "DaemonSet")
    assert real_ds["spec"]["template"]["spec"] == our_ds["spec"]["template"]["spec"]


def test_prometheusrule_is_generated_from_the_plain_rules() -> None:
    plain = yaml.safe_load((ROOT / "deploy/prometheus/imdswatch-rules.yaml").read_text())
    pr = load_all(K8S / "components/prometheus-operator/prometheusrule.yaml")[0]
    assert pr["spec"]["groups"] == plain["groups"]
    result = subprocess.run(
        ["python3" if shutil.which("python3") else "python",
         str(ROOT / "deploy/prometheus/render_prometheusrule.py"), "--check"],
        capture_output=True, text=True)
    # The script needs PyYAML; run it with this interpreter to be sure it has it.
    if result.returncode != 0 and "No module named" in result.stderr:
        import sys
        result = subprocess.run([sys.executable, str(ROOT / "deploy/prometheus/"
                                                     "render_prometheusrule.py"), "--check"],
                                capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_container_args_are_accepted_by_the_cli() -> None:
    """The DaemonSet's args and the image's CMD parse as `imdswatch` options (without
    running anything), so a renamed flag cannot ship a crash-looping DaemonSet."""
    ds = by_kind(render(K8S / "base"), "DaemonSet")
    args = ds["spec"]["template"]["spec"]["containers"][0]["args"]
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", dockerfile, re.M).group(1))
    for argv in (args, cmd):
        command = main.get_command(None, argv[0])
        assert command is not None, argv[0]
        command.make_context(argv[0], list(argv[1:]))  # raises on an unknown option
