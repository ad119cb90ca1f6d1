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
OVERLAYS = ["base", "overlays/production", "overlays/privileged", "overlays/per-node",
            "overlays/fleet-bus", "overlays/enforcement", "overlays/enforcement-deny"]
FLEET_OVERLAYS = ["overlays/production", "overlays/privileged"]
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
    docs += generated_secrets(directory, k)
    for ref in k.get("components", []):
        comp = (directory / ref).resolve()
        assert (comp / "kustomization.yaml").is_file(), f"{kfile}: component {ref} missing"
        ck = yaml.safe_load((comp / "kustomization.yaml").read_text())
        assert ck["kind"] == "Component"
        for res in ck.get("resources", []):
            docs += load_all(comp / res)
        docs += generated_secrets(comp, ck)
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


def generated_secrets(directory: Path, k: dict) -> list[dict]:
    """secretGenerator entries as the Secrets Kustomize makes (the files they read are
    the user's own, e.g. the fleet token, and are not in the repository), and
    configMapGenerator entries as ConfigMaps (their files are)."""
    out = []
    for gen in k.get("secretGenerator", []):
        assert gen.get("options", {}).get("disableNameSuffixHash") is True, gen["name"]
        data = {f.split("=", 1)[0]: "" for f in gen.get("files", [])}
        out.append({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                    "metadata": {"name": gen["name"]}, "data": data})
    for gen in k.get("configMapGenerator", []):
        assert gen.get("options", {}).get("disableNameSuffixHash") is True, gen["name"]
        data = {}
        for f in gen.get("files", []):
            key, _, path = f.rpartition("=") if "=" in f else (f, "", f)
            data[key] = (directory / path).read_text()
        out.append({"apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": gen["name"]}, "data": data})
    return out


def apply_patches(directory: Path, k: dict, docs: list[dict]) -> list[dict]:
    for patch in k.get("patches", []):
        if "target" not in patch:
            # A strategic-merge patch; the only kind used here deletes its resource.
            (doc,) = load_all(directory / patch["path"])
            assert doc.get("$patch") == "delete", patch["path"]
            key = (doc["kind"], doc["metadata"]["name"])
            kept = [d for d in docs if (d["kind"], d["metadata"]["name"]) != key]
            assert len(kept) == len(docs) - 1, f"patch {patch['path']} matches no resource"
            docs = kept
            continue
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
    pm = next(d for d in docs if d["kind"] == "PodMonitor" and d["metadata"]["name"] == "imdswatch")
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
def test_kubectl_kustomize_agrees(overlay: str, tmp_path: Path) -> None:
    # On a copy holding the token file a user creates before applying fleet mode.
    tree = tmp_path / "kubernetes"
    shutil.copytree(K8S, tree)
    (tree / "components" / "fleet" / "fleet-token").write_text("test-token\n")
    (tree / "components" / "fleet-bus" / "nats-creds").write_text("imdswatch-serve:pw\n")
    out = subprocess.run(["kubectl", "kustomize", str(tree / overlay)], check=True,
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


def _named(docs: list[dict], kind: str, name: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


@pytest.mark.parametrize("overlay", FLEET_OVERLAYS)
def test_fleet_mode_serve_and_agents(overlay: str) -> None:
    docs = render(K8S / overlay)
    dep = _named(docs, "Deployment", "imdswatch-serve")
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"] == {"type": "Recreate"}
    pod = dep["spec"]["template"]
    spec = pod["spec"]
    (c,) = spec["containers"]
    assert c["args"][0] == "serve" and c["image"] == "imdswatch:0.1.0"
    args = dict(a.split("=", 1) for a in c["args"][1:])
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    # State and log on the PersistentVolumeClaim; the token from the Secret.
    pvc = _named(docs, "PersistentVolumeClaim", "imdswatch-serve-state")
    assert volumes["state"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert args["--state"].startswith(mounts["state"]["mountPath"] + "/")
    secret = _named(docs, "Secret", "imdswatch-fleet-token")
    assert volumes["fleet-token"]["secret"]["secretName"] == secret["metadata"]["name"]
    assert args["--token-file"] == mounts["fleet-token"]["mountPath"] + "/token"
    assert "token" in secret["data"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    # The Service reaches the ingest port of serve's pods, and only serve's.
    svc = _named(docs, "Service", "imdswatch-serve")
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert svc["spec"]["ports"][0]["targetPort"] == "ingest" and ports["ingest"] == 9465
    ds = by_kind(docs, "DaemonSet")
    agent_labels = ds["spec"]["template"]["metadata"]["labels"]
    assert not ds["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    # Only agents reach ingest; only the monitoring namespace reaches metrics.
    np = _named(docs, "NetworkPolicy", "imdswatch-serve")
    assert np["spec"]["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    rules = {r["ports"][0]["port"]: r["from"] for r in np["spec"]["ingress"]}
    assert rules["ingest"] == [{"podSelector": {"matchLabels": {
        k: v for k, v in agent_labels.items() if k == "app.kubernetes.io/name"}}}]
    assert "namespaceSelector" in rules["metrics"][0]
    # The agents run in fleet mode with a spool on the node and the same Secret.
    a = ds["spec"]["template"]["spec"]
    (ac,) = a["containers"]
    aargs = dict(x.split("=", 1) for x in ac["args"][1:])
    host = svc["metadata"]["name"] + "." + svc["metadata"]["namespace"] + ".svc"
    assert aargs["--fleet"] == f"http://{host}:{svc['spec']['ports'][0]['port']}"
    spool_mount = next(m for m in ac["volumeMounts"]
                       if aargs["--spool"].startswith(m["mountPath"] + "/"))
    assert {v["name"]: v for v in a["volumes"]}[spool_mount["name"]]["hostPath"]
    amounts = {m["name"]: m for m in ac["volumeMounts"]}
    avols = {v["name"]: v for v in a["volumes"]}
    assert avols["fleet-token"]["secret"]["secretName"] == secret["metadata"]["name"]
    assert aargs["--fleet-token-file"] == amounts["fleet-token"]["mountPath"] + "/token"
    # Both command lines parse.
    for argv in (c["args"], ac["args"]):
        main.get_command(None, argv[0]).make_context(argv[0], list(argv[1:]))
    # Prometheus Operator: serve's PodMonitor selects serve's pod and its metrics port.
    pm = _named(docs, "PodMonitor", "imdswatch-serve")
    assert pm["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert pm["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"


def test_per_node_overlay_has_no_fleet() -> None:
    docs = render(K8S / "overlays/per-node")
    assert not [d for d in docs if d["kind"] in ("Deployment", "Secret", "NetworkPolicy")]
    args = by_kind(docs, "DaemonSet")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert not any(a.startswith(("--fleet", "--spool")) for a in args)


def test_fleet_bus_overlay_runs_three_replicas_on_the_bus() -> None:
    """Three serve replicas rolled one at a time, a PodDisruptionBudget over them, no claim
    (state on an emptyDir), the NATS credentials from a Secret file, each replica named
    after its pod; the command line parses."""
    docs = render(K8S / "overlays/fleet-bus")
    assert not [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    dep = _named(docs, "Deployment", "imdswatch-serve")
    assert dep["spec"]["replicas"] == 3
    assert dep["spec"]["strategy"]["type"] == "RollingUpdate"
    pod = dep["spec"]["template"]
    spec = pod["spec"]
    (c,) = spec["containers"]
    args = dict(a.split("=", 1) for a in c["args"][1:])
    assert args["--bus"].startswith("nats://") and args["--bus-replicas"] == "3"
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert "emptyDir" in volumes["state"]
    assert args["--state"].startswith(mounts["state"]["mountPath"] + "/")
    creds = _named(docs, "Secret", "imdswatch-nats-creds")
    assert volumes["nats-creds"]["secret"]["secretName"] == creds["metadata"]["name"]
    assert args["--bus-creds"] == mounts["nats-creds"]["mountPath"] + "/creds"
    assert mounts["nats-creds"]["readOnly"] is True
    env = {e["name"]: e for e in c["env"]}
    assert args["--replica-id"] == "$(POD_NAME)"
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    pdb = _named(docs, "PodDisruptionBudget", "imdswatch-serve")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    svc = _named(docs, "Service", "imdswatch-serve")
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    pm = _named(docs, "PodMonitor", "imdswatch-serve")  # every replica's metrics
    assert pm["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    main.get_command(None, "serve").make_context("serve", list(c["args"][1:]))


NATS = K8S / "nats"


def test_nats_example_is_a_three_node_jetstream_cluster_with_auth(tmp_path) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    docs = render(NATS)
    for doc in docs:
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(doc, version or kubernetes_validate.latest_version(),
                                         strict=True)
    sts = _named(docs, "StatefulSet", "nats")
    assert sts["spec"]["replicas"] == 3
    headless = _named(docs, "Service", "nats-headless")
    assert sts["spec"]["serviceName"] == headless["metadata"]["name"]
    assert headless["spec"]["clusterIP"] == "None"
    conf = _named(docs, "ConfigMap", "nats-config")["data"]
    routes = re.findall(r"nats://(nats-\d)\.nats-headless\.nats\.svc:6222",
                        conf["nats-server.conf"])
    assert routes == ["nats-0", "nats-1", "nats-2"]
    assert "include ./auth.conf" in conf["nats-server.conf"]
    # No anonymous user: no no_auth_user, and every user has a password from the Secret.
    assert "no_auth_user" not in conf["auth.conf"]
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in c["env"]}
    for var in re.findall(r"password: \$(\w+)", conf["auth.conf"]):
        assert env[var]["valueFrom"]["secretKeyRef"]["name"] == "nats-users"
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    # The configuration is one Debian's nats-server accepts.
    nats_server = shutil.which("nats-server") or "/usr/sbin/nats-server"
    for name, text in conf.items():
        (tmp_path / name).write_text(text)
    check = subprocess.run([nats_server, "-c", str(tmp_path / "nats-server.conf"), "-t"],
                           capture_output=True, text=True, timeout=30,
                           env={"POD_NAME": "nats-0", "SERVE_PASSWORD": "a" * 24,
                                "ALERTS_PASSWORD": "b" * 24, "PATH": "/usr/bin:/bin"})
    assert check.returncode == 0, check.stdout + check.stderr


def test_enforcement_overlay_audits_with_the_configmaps_policy() -> None:
    """The agents' enforcement args parse, the mounted policy is the ConfigMap's, and that
    policy reads as a policy."""
    from policy.toml_file import parse_policy

    docs = render(K8S / "overlays/enforcement")
    ds = by_kind(docs, "DaemonSet")
    spec = ds["spec"]["template"]["spec"]
    args = spec["containers"][0]["args"]
    assert "--enforce=audit" in args and "--policy=/etc/imdswatch/policy/policy.toml" in args
    main.get_command(None, args[0]).make_context(args[0], list(args[1:]))
    cm = _named(docs, "ConfigMap", "imdswatch-policy")
    assert parse_policy(cm["data"]["policy.toml"], "configmap").rules[0].name == "no-user-data"
    mounts = {m["mountPath"]: m["name"] for m in spec["containers"][0]["volumeMounts"]}
    assert mounts["/etc/imdswatch/policy"] == "policy" and mounts["/run/imdswatch"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["policy"]["configMap"]["name"] == "imdswatch-policy"
    assert volumes["break-glass"]["hostPath"]["path"] == "/run/imdswatch"



def test_enforcement_deny_overlay_denies_pods_on_labelled_nodes_only() -> None:
    """Deny replaces audit (the last --enforce wins, as the CLI parses it), in the pods'
    cgroup, for pods only, on nodes labelled imdswatch.io/enforce=deny."""
    docs = render(K8S / "overlays/enforcement-deny")
    spec = by_kind(docs, "DaemonSet")["spec"]["template"]["spec"]
    args = spec["containers"][0]["args"]
    ctx = main.get_command(None, args[0]).make_context(args[0], list(args[1:]))
    assert ctx.params["enforce_mode"] == "deny" and ctx.params["enforce_scope"] == "pods"
    assert ctx.params["enforce_cgroup"] == "/host/sys/fs/cgroup/kubepods.slice"
    assert spec["nodeSelector"] == {"imdswatch.io/enforce": "deny"}
