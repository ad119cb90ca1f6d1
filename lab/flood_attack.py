"""The attack that must still alert after a flood: a copy of curl under a name of its own,
run by a uid of its own (no passwd entry: `uid:N`), asks for the role's credentials without
the anti-SSRF header. Name and uid are fresh on every call, so an alert that another test's
curl or `nobody` raised on this machine (the agent sees all of it, and suppresses per
entity fleet-wide) cannot stand in for it. Runs INSIDE a test namespace."""

from __future__ import annotations

import secrets
import shutil
import subprocess
from pathlib import Path

from lab.sandbox import Sandbox as MetadataNamespace

IMDS = "169.254.169.254"
CREDENTIALS = f"http://{IMDS}/latest/meta-data/iam/security-credentials/test-role"


def unusual_curl(ns: MetadataNamespace, where: Path) -> tuple[int, str, int]:
    """Runs the attack in `ns`, the caller's own namespace with the address on its loopback
    and its own mock IMDS; returns (pid, name, uid). The client only ever runs through
    `ns.popen` (`ip netns exec`), never in the host's namespace."""
    if not isinstance(ns, MetadataNamespace):
        raise TypeError("the attack runs only inside a test's own MetadataNamespace")
    name = f"atk{secrets.token_hex(4)}"
    uid = 20000 + secrets.randbelow(40000)
    where.mkdir(parents=True, exist_ok=True)
    where.chmod(0o755)  # the uid must reach and run the copy
    for parent in where.parents:
        if parent == Path("/tmp") or parent == parent.parent:
            break
        parent.chmod(parent.stat().st_mode | 0o111)
    exe = where / name
    shutil.copy(shutil.which("curl") or "/usr/bin/curl", exe)
    exe.chmod(0o755)
    p = ns.popen(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                  str(exe), "-s", "-o", "/dev/null", "-m", "10", CREDENTIALS],
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    p.wait(20)
    return p.pid, name, uid
