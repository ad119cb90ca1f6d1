"""The policy projected onto what the kernel checks (policy.kernel_rules): never denying
what the policy allows (allow entries may widen, deny entries never do)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from policy.kernel_rules import project
from policy.model import ALLOW, DENY, Policy, Rule
from scoring.known_callers import KNOWN_CALLERS, comm
from tracer.enforcer import ANY_UID, KIND_COMM, KIND_EXE_NAME, kernel_file_id


def test_host_only_executables_match_by_device_and_inode(tmp_path: Path) -> None:
    exe = tmp_path / "usr" / "bin" / "agent"
    exe.parent.mkdir(parents=True)
    exe.write_text("")
    st = os.stat(exe)
    passwd = tmp_path / "passwd"
    passwd.write_text("root:x:0:0::/root:/bin/sh\napp:x:1000:1000::/:/bin/sh\n")
    pol = Policy((
        Rule("host", ALLOW, executable="/usr/bin/agent", user="app", container=False),
        Rule("anywhere", ALLOW, executable="/usr/bin/agent"),
        Rule("absent", ALLOW, executable="/app/tool", image="registry/x"),
        Rule("by-name", ALLOW, process="amazon-ssm-agent-worker"),
        Rule("by-user", ALLOW, user="uid:33"),
    ), default=DENY, agents="policy")
    p = project(pol, str(passwd), str(tmp_path))
    k = p.rules
    dev, ino = kernel_file_id(str(exe))
    assert ino == st.st_ino
    assert (dev, ino, 1000) in k.allow_exe and (dev, ino, ANY_UID) in k.allow_exe
    # only the rule that may match containers is widened to the file name
    assert k.allow_name == {("agent", ANY_UID, KIND_EXE_NAME), ("tool", ANY_UID, KIND_EXE_NAME),
                            ("amazon-ssm-agen", ANY_UID, KIND_COMM)}
    assert k.allow_uid == {33} and k.default_deny and not k.allow_all
    assert any("image and namespace are not checked" in n for n in p.notes)


def test_an_allow_rule_the_kernel_cannot_narrow_allows_everyone() -> None:
    p = project(Policy((Rule("shop", ALLOW, image="registry/shop"),), default=DENY))
    assert p.rules.allow_all and any("allows every caller" in n for n in p.notes)


def test_deny_rules_enter_the_kernel_only_when_exact(tmp_path: Path) -> None:
    exe = tmp_path / "bin" / "curl"
    exe.parent.mkdir()
    exe.write_text("")
    pol = Policy((
        Rule("curl", DENY, executable="/bin/curl"),
        Rule("nobody", DENY, user="uid:65534"),
        Rule("user-data", DENY, classes=("user-data",)),
        Rule("in-pods", DENY, image="registry/*"),
        Rule("by-name", DENY, process="wget"),
    ))
    p = project(pol, "/nonexistent", str(tmp_path))
    assert p.rules.deny_exe == {(*kernel_file_id(str(exe)), ANY_UID): 1}
    assert p.rules.deny_uid == {65534: 2}
    assert not p.rules.default_deny
    assert sum("not enforced in the kernel" in n for n in p.notes) == 3


def test_the_nodes_agents_are_allowed_in_the_kernel_unless_the_policy_takes_them(
        tmp_path: Path) -> None:
    exe = tmp_path / "usr" / "bin" / "amazon-ssm-agent"
    exe.parent.mkdir(parents=True)
    exe.write_text("")
    k = project(Policy((), default=DENY), "/nonexistent", str(tmp_path)).rules
    assert (*kernel_file_id(str(exe)), ANY_UID) in k.allow_exe
    assert ("aws-k8s-agent", ANY_UID, KIND_EXE_NAME) in k.allow_name  # shipped as an image
    globbed = [a for a in KNOWN_CALLERS if any("*" in os.path.basename(x)
                                               for x in a.executables)]
    for a in globbed:  # a file name that is a glob: by process name
        assert (comm(a.name), ANY_UID, KIND_COMM) in k.allow_name, a.name
    assert not k.allow_all and not k.allow_uid  # never everyone for the agents' sake
    assert not project(Policy((), default=DENY, agents="policy"), "/nonexistent",
                       str(tmp_path)).rules.allow_exe


@pytest.mark.root
def test_a_file_on_overlayfs_is_named_by_the_device_its_mount_shows(tmp_path: Path) -> None:
    """The kernel reads an executable's device from its inode's superblock, which is the
    device mountinfo shows for its mount; on overlayfs stat()'s st_dev can be a layer's."""
    base = tmp_path / "base"  # on a tmpfs of its own: overlayfs takes no overlay as upper
    base.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(base)], check=True)
    lower, upper, work, merged = (base / n for n in ("lower", "upper", "work", "merged"))
    for d in (lower, upper, work, merged):
        d.mkdir()
    (lower / "tool").write_text("")
    try:
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={lower},upperdir={upper},workdir={work}", str(merged)],
                       check=True)
    except subprocess.CalledProcessError:
        subprocess.run(["umount", str(base)], check=True)
        raise
    try:
        line = next(x for x in Path("/proc/self/mountinfo").read_text().splitlines()
                    if x.split()[4] == str(merged))
        major, minor = (int(n) for n in line.split()[2].split(":"))
        dev, ino = kernel_file_id(str(merged / "tool"))
        assert dev == (major << 20) | minor
        assert ino == os.stat(merged / "tool").st_ino
    finally:
        subprocess.run(["umount", str(merged)], check=True)
        subprocess.run(["umount", str(base)], check=True)
    assert kernel_file_id(str(tmp_path / "absent")) is None


def test_allow_entries_carry_their_rules_request_classes() -> None:
    """An entry allows the union of the classes of every rule that put it there; one that
    allows every class is not listed (the kernel restricts nothing for it)."""
    from policy.request_patterns import class_bit

    pol = Policy((
        Rule("curl-metadata", ALLOW, process="curl", classes=("metadata",)),
        Rule("curl-token", ALLOW, process="curl", classes=("session",)),
        Rule("app", ALLOW, user="uid:1000", classes=("metadata", "credentials")),
        Rule("app-all", ALLOW, user="uid:1001"),
        Rule("wget", ALLOW, process="wget", classes=("metadata",)),
        Rule("wget-all", ALLOW, process="wget"),
    ), default=DENY, agents="policy")
    k = project(pol, "/nonexistent", "/nonexistent").rules
    assert k.mask(("curl", ANY_UID, KIND_COMM)) == class_bit("metadata") | class_bit("session")
    assert k.mask(1000) == class_bit("metadata") | class_bit("credentials")
    assert 1001 not in k.classes and ("wget", ANY_UID, KIND_COMM) not in k.classes
