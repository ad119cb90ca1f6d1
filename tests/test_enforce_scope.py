"""`run --enforce deny --enforce-scope`: only callers in scope can be denied.

The forms and their refusals, which cgroups a scope covers (plain directories named as the
runtimes name cgroups), and end to end: the real agent links its programs to a cgroup of
this test's own holding two sibling pod cgroups (kubelet's systemd naming), the fake
Kubernetes API names the pods' namespaces, and with `--enforce-scope namespaces=web` curl
in the `web` pod is refused in the kernel while curl in the `data` pod connects (and is
reported would_deny, out of scope); a deny rule naming only the `data` namespace is
refused in the kernel for that pod alone, and lifted by a reload."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.fake_kube import CID_A, UID_A, FakeApi
from netns_fixtures import (  # noqa: F401 - enforce_cgroup: a fixture
    AgentProcess,
    MetadataNamespace,
    enforce_cgroup,
    in_cgroup,
    require_bcc,
    wait_for,
)

from imdswatch.config import ConfigError, parse_config
from lab.cgroups import remove_cgroups
from policy.kernel_rules import project
from policy.toml_file import parse_policy
from tracer.enforce_scope import Scope, ScopeError, ScopeTracker, parse_scope

IMDS = "169.254.169.254"
URL = f"http://{IMDS}/latest/meta-data/instance-id"
UID_DATA = "3c3c4d5e-1111-4b8e-9a39-6c3c1a1e0a04"  # a pod of namespace `data` on node-1
CID_DATA = "d4" * 32


def pod_dir(uid: str, cid: str) -> Path:
    """A pod's container cgroup as the kubelet's systemd driver names it."""
    return (Path(f"kubepods-besteffort-pod{uid.replace('-', '_')}.slice")
            / f"cri-containerd-{cid}.scope")


def test_scope_forms():
    assert parse_scope("all").everyone
    assert parse_scope(" hosts ").kind == "hosts"
    s = parse_scope("namespaces=web, ci")
    assert s.kind == "namespaces" and s.namespaces == {"web", "ci"}
    assert str(s) == "namespaces=ci,web"
    for bad in ("pod", "namespaces=", "namespaces=Web", "namespaces=a_b", "", "hosts,pods"):
        with pytest.raises(ScopeError):
            parse_scope(bad)
    assert parse_config({"agent": {"enforce_scope": "pods"}}).agent.enforce_scope.kind == "pods"
    with pytest.raises(ConfigError, match="agent.enforce_scope"):
        parse_config({"agent": {"enforce_scope": "nodes"}})


def test_which_cgroups_a_scope_covers(tmp_path):
    host = tmp_path / "system.slice" / "cron.service"
    web, data = tmp_path / pod_dir(UID_A, CID_A), tmp_path / pod_dir(UID_DATA, CID_DATA)
    docker = tmp_path / "system.slice" / f"docker-{'e5' * 32}.scope"
    for d in (host, web, data, docker):
        d.mkdir(parents=True)
    ino = {d: d.stat().st_ino for d in (tmp_path, host, host.parent, web, web.parent, data,
                                         data.parent, docker)}
    namespaces = {UID_A: "web"}  # the data pod is not known to the API (yet)

    def covered(scope: str) -> set[Path]:
        ids = ScopeTracker(parse_scope(scope), str(tmp_path), namespaces.get).scan()
        return {d for d, i in ino.items() if i in ids}

    assert covered("hosts") == {tmp_path, host, host.parent}
    assert covered("pods") == {web, web.parent, data, data.parent, docker}
    assert covered("namespaces=web") == {web, web.parent}
    t = ScopeTracker(parse_scope("namespaces=data"), str(tmp_path), namespaces.get)
    assert t.scan() == set() and t.unattributed == 2  # unknown namespace: out (fail open)
    assert Scope().covers(None, None, None) and not Scope("namespaces").covers("c", "p", None)
    # Deny rules naming a namespace alone: the pods' cgroups of the first rule matching.
    t = ScopeTracker(Scope(), str(tmp_path), {**namespaces, UID_DATA: "data"}.get)
    t.namespace_rules = [("d*", 3), ("data", 5)]
    assert t.needed and len(t.scan()) == len(ino)
    assert t.denials == {ino[data]: 3, ino[data.parent]: 3}


def test_namespace_deny_rules_are_projected_for_the_cgroup_map():
    pol = parse_policy('[policy]\ndefault = "allow"\n\n[[rule]]\nname = "web-ok"\n'
                       'namespace = "web"\nexecutable = "/usr/bin/wget"\n\n'
                       '[[rule]]\nname = "no-ci"\naction = "deny"\nnamespace = "ci-*"\n\n'
                       '[[rule]]\nname = "ci-creds"\naction = "deny"\nnamespace = "ci"\n'
                       'classes = ["credentials"]\n', "p")
    p = project(pol)
    assert p.deny_namespaces == [("ci-*", 2)]  # the class-bound one stays audit-only
    assert any("ci-creds" in n and "would_deny" in n for n in p.notes)


def test_scope_refused_without_enforcement(tmp_path):
    from lab.agent_process import COMMAND

    r = subprocess.run([*COMMAND, "run", "--enforce-scope", "pods"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "--enforce-scope goes with --enforce" in r.stderr, r.stderr
    policy = tmp_path / "p.toml"
    policy.write_text('[policy]\ndefault = "allow"\n')
    r = subprocess.run([*COMMAND, "run", "--enforce", "audit", "--policy", str(policy),
                        "--enforce-scope", "namespaces=Bad"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "--enforce-scope" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


@pytest.fixture
def pods(enforce_cgroup) -> Iterator[tuple[Path, Path]]:  # noqa: F811 - a fixture
    """Two sibling pod cgroups below the test's cgroup, emptied and removed afterwards
    (before the test's cgroup itself)."""
    web, data = enforce_cgroup / pod_dir(UID_A, CID_A), enforce_cgroup / pod_dir(UID_DATA,
                                                                                  CID_DATA)
    web.mkdir(parents=True)
    data.mkdir(parents=True)
    try:
        yield web, data
    finally:
        remove_cgroups((web, web.parent, data, data.parent))


def curl(ns: MetadataNamespace, cgroup: Path) -> tuple[int, int, str]:
    p = ns.popen(["env", "LC_ALL=C", "curl", "-v", "-o", "/dev/null", "--max-time", "5", URL],
                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                 preexec_fn=in_cgroup(cgroup))
    _, err = p.communicate(timeout=20)
    return p.pid, p.returncode, err


@contextlib.contextmanager
def agent_with(tmp_path: Path, cgroup: Path, policy_text: str, *extra: str
               ) -> Iterator[tuple[AgentProcess, MetadataNamespace]]:
    """The agent denying in `cgroup` with this policy, the fake API naming the pods; the
    namespace with the mock IMDS. Everything stopped afterwards."""
    require_bcc()
    api = FakeApi(tmp_path, "--anonymous", "--pod", f"{UID_DATA},api-0,data,node-1")
    policy = tmp_path / "policy.toml"
    policy.write_text(policy_text)
    config = tmp_path / "imdswatch.toml"
    config.write_text(f'[agent]\nnode_name = "node-1"\nkubernetes_api = "{api.base}"\n')
    agent = None
    try:
        with MetadataNamespace(v4=(IMDS,), v6=()) as ns:
            agent = AgentProcess(
                tmp_path, "--config", str(config), "--learning-period", "0s",
                "--enforce", "deny", "--policy", str(policy), "--enforce-cgroup", str(cgroup),
                "--enforce-off-file", str(tmp_path / "enforce-off"), *extra).start()
            assert wait_for(lambda: agent.metric("imdswatch_enforcement_mode",
                                                 mode="deny") == 1, 10), agent.log_tail()
            yield agent, ns
    finally:
        if agent is not None:
            agent.kill()
        api.stop()


@pytest.mark.root
@pytest.mark.bpf
def test_only_callers_in_scope_are_denied(enforce_cgroup, pods, tmp_path):  # noqa: F811
    web, data = pods
    wget = os.path.realpath(shutil.which("wget") or "/usr/bin/wget")
    policy = (f'[policy]\ndefault = "deny"\n\n[[rule]]\nname = "wget"\n'
              f'executable = "{wget}"\n')
    with agent_with(tmp_path, enforce_cgroup, policy, "--enforce-scope", "namespaces=web"
                    ) as (agent, ns):
        # In scope once the API has named the pod (until then: out, allowed).
        assert wait_for(lambda: curl(ns, web)[1] == 7, 20), agent.log_tail()
        pid, rc, err = curl(ns, web)
        assert rc == 7 and "Operation not permitted" in err, err
        # The web pod's two cgroups (pod slice and container scope).
        assert agent.metric("imdswatch_enforcement_scope_cgroups", state="in_scope") == 2
        # One line per caller and rule a while (the first refusal's, above).
        assert wait_for(lambda: [a for a in agent.alert_lines() if a["event"]["action"] ==
                                 "connection_denied" and a["process"]["name"] == "curl"],
                        10), agent.log_tail()
        pid, rc, err = curl(ns, data)  # namespace data: out of scope, allowed
        assert rc == 0, err

        def out_of_scope() -> list[dict]:
            return [a for a in agent.alert_lines() if a["process"].get("pid") == pid]

        assert wait_for(out_of_scope, 10), agent.log_tail()
        line = out_of_scope()[0]
        assert line["event"]["action"] == "would_deny"
        assert line["imdswatch"]["policy"]["scope"] == "out"
        assert line["orchestrator"]["namespace"] == "data"
        rc, _ = agent.stop(signal.SIGTERM)
        assert rc == 0
        assert curl(ns, web)[1] == 0  # nothing stays denied


@pytest.mark.root
@pytest.mark.bpf
def test_a_namespace_deny_rule_is_enforced_by_cgroup(enforce_cgroup, pods, tmp_path):  # noqa: F811
    """A deny rule naming only a namespace is refused in the kernel for that namespace's
    pods (their cgroups, once the API has named them) and nobody else's; a reload without
    it lets them through."""
    web, data = pods
    allow = '[policy]\ndefault = "allow"\n'
    with agent_with(tmp_path, enforce_cgroup, allow + '\n[[rule]]\nname = "no-data"\n'
                    'action = "deny"\nnamespace = "data"\n') as (agent, ns):
        assert wait_for(lambda: curl(ns, data)[1] == 7, 20), agent.log_tail()
        assert curl(ns, web)[1] == 0

        def denied() -> list[dict]:
            return [a for a in agent.alert_lines()
                    if a["event"]["action"] == "connection_denied"]

        assert wait_for(denied, 10), agent.log_tail()
        assert denied()[0]["imdswatch"]["policy"]["rule"] == "no-data"
        (tmp_path / "policy.toml").write_text(allow)
        agent.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: curl(ns, data)[1] == 0, 10), agent.log_tail()
