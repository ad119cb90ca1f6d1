"""Well-known legitimate callers of the metadata service, keyed by name, executable AND
where they run.

A name alone proves nothing (anyone can call a binary `amazon-ssm-agent`), so an entry
matches only when the executable is one of the paths the vendor's package installs. A path
alone proves little more: any container image can put a binary at `/app/aws-k8s-agent` or
`/usr/bin/amazon-ssm-agent`. So each entry also says where the agent runs: on the host
(a host path, which a containerised caller cannot supply: a caller in a container claiming
a host agent's path is not that agent) and/or in the vendor's images (by repository, tag
and digest ignored; a caller outside those images is not the agent).
Names are the kernel's `comm`, truncated to 15 bytes, as the tracer and most EDR exports
report them; an entry's full name is truncated the same way.

An interpreted agent (cloud-init, yum, dnf, waagent: Python scripts) reports its script's
name and the interpreter as its executable, which any script can also do (`/tmp/yum` with a
`#!/usr/bin/python3` line). Its identity is the interpreter AND the script: the script path
is read from the command line (`script_of`), and both must be the vendor's.
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass
from fnmatch import fnmatchcase

from scoring.detectors import image_repository
from scoring.events import Event

COMM_LEN = 15


def comm(name: str) -> str:
    """The name as Linux reports it in `comm`: at most 15 bytes."""
    raw = name.encode()
    return raw[:COMM_LEN].decode(errors="ignore") if len(raw) > COMM_LEN else name


# The first word of a command line that is an interpreter rather than the program it runs.
_INTERPRETER = re.compile(r"^(?:python|platform-python|perl|ruby|node|bash|sh|dash)[\d.]*$")
# Interpreter options that take the next word as their value.
_OPTION_WITH_VALUE = frozenset(("-W", "-X", "-Q"))


def script_of(exe: str | None, command_line: str | None) -> str | None:
    """The script an interpreter runs, as its command line names it: the first word after
    the interpreter and its options (`/usr/bin/python3 -s /usr/bin/yum makecache`, what the
    kernel makes of a `#!` line), or the first word itself when it is not the interpreter
    (`/usr/bin/yum makecache`, an export that keeps the argv the script was run with). None
    when no script is named (`python3 -c ...`, `-m module`, no command line) or it is not an
    absolute path: only a path can be the vendor's file. The one place the script is found,
    so a kernel-provided script path can replace it."""
    if not command_line:
        return None
    try:
        words = shlex.split(command_line)
    except ValueError:  # unbalanced quotes: a command line is not shell syntax
        words = command_line.split()
    if not words:
        return None
    first = os.path.basename(words[0])
    if not (_INTERPRETER.match(first) or (exe and first == os.path.basename(exe))):
        return words[0] if words[0].startswith("/") else None
    rest = iter(words[1:])
    for word in rest:
        if word == "--":
            word = next(rest, "")
        elif word in ("-c", "-m") or word.startswith(("-c", "-m")) and not \
                word.startswith("--"):
            return None  # inline code or a module: no script file
        elif word.startswith("-"):
            if word in _OPTION_WITH_VALUE:
                next(rest, None)
            continue
        return word if word.startswith("/") else None
    return None


@dataclass(frozen=True, slots=True)
class KnownCaller:
    name: str
    executables: tuple[str, ...]  # exact paths or globs below a fixed directory
    vendor: str
    host: bool = True  # runs on the host (outside any container)
    images: tuple[str, ...] = ()  # image repositories it runs in, matched exactly
    # An interpreted agent: the interpreters (globs) that may run it, and its script paths
    # (exact). Both must match: the interpreter alone is anyone's script.
    interpreters: tuple[str, ...] = ()
    scripts: tuple[str, ...] = ()

    def matches(self, name: str, exe: str | None, image: str | None = None,
                in_container: bool = False, script: str | None = None) -> bool:
        if exe is None or comm(self.name) != comm(name):
            return False
        if not (any(fnmatchcase(exe, pattern) for pattern in self.executables)
                or (script is not None and script in self.scripts
                    and any(fnmatchcase(exe, pattern) for pattern in self.interpreters))):
            return False
        if not in_container:
            return self.host
        repo = image_repository(image)
        return repo is not None and repo in self.images


def _k(name: str, vendor: str, *executables: str) -> KnownCaller:
    """A host agent (installed by a package or the node image)."""
    return KnownCaller(name, executables, vendor)


def _c(name: str, vendor: str, executables: tuple[str, ...], *images: str,
       host: bool = False) -> KnownCaller:
    """An agent shipped as a container image (a DaemonSet), by its vendor's repositories."""
    return KnownCaller(name, executables, vendor, host, images)


def _py(name: str, vendor: str, scripts: tuple[str, ...], *executables: str,
        interpreters: tuple[str, ...] = ("/usr/bin/python3*",)) -> KnownCaller:
    """A host agent that is a Python script: its interpreter and script both, or a native
    executable of its own where a distribution ships one."""
    return KnownCaller(name, executables, vendor, interpreters=interpreters, scripts=scripts)


# Amazon EKS add-on images come from account 602401143452's ECR in these regions (the
# newer regions use other accounts). Each registry host is spelt out: a glob over the
# region also matched `602401143452.dkr.ecr.evil.example/x.amazonaws.com`.
EKS_ECR_REGIONS = (
    "us-east-1", "us-east-2", "us-west-1", "us-west-2", "ca-central-1", "sa-east-1",
    "eu-central-1", "eu-west-1", "eu-west-2", "eu-west-3", "eu-north-1",
    "ap-northeast-1", "ap-northeast-2", "ap-northeast-3", "ap-south-1",
    "ap-southeast-1", "ap-southeast-2",
)


def _eks(repository: str) -> tuple[str, ...]:
    return tuple(f"602401143452.dkr.ecr.{region}.amazonaws.com/{repository}"
                 for region in EKS_ECR_REGIONS)


KNOWN_CALLERS: tuple[KnownCaller, ...] = (
    _py("cloud-init", "canonical", ("/usr/bin/cloud-init", "/usr/local/bin/cloud-init"),
        "/usr/bin/cloud-init", "/usr/local/bin/cloud-init"),
    _k("amazon-ssm-agent", "aws", "/usr/bin/amazon-ssm-agent",
       "/snap/amazon-ssm-agent/*/amazon-ssm-agent"),
    _k("ssm-agent-worker", "aws", "/usr/bin/ssm-agent-worker",
       "/snap/amazon-ssm-agent/*/ssm-agent-worker"),
    _k("ssm-session-worker", "aws", "/usr/bin/ssm-session-worker",
       "/snap/amazon-ssm-agent/*/ssm-session-worker"),
    _c("aws-k8s-agent", "aws", ("/app/aws-k8s-agent",), *_eks("amazon-k8s-cni")),
    _c("aws-ebs-csi-driver", "aws", ("/bin/aws-ebs-csi-driver",),
       "public.ecr.aws/ebs-csi-driver/aws-ebs-csi-driver", *_eks("eks/aws-ebs-csi-driver"),
       "registry.k8s.io/provider-aws/aws-ebs-csi-driver"),
    _c("aws-efs-csi-driver", "aws", ("/bin/aws-efs-csi-driver",),
       "public.ecr.aws/efs-csi-driver/amazon/aws-efs-csi-driver",
       *_eks("eks/aws-efs-csi-driver")),
    _k("ecr-credential-provider", "aws",
       "/etc/eks/image-credential-provider/ecr-credential-provider",
       "/usr/local/bin/ecr-credential-provider", "/usr/bin/ecr-credential-provider"),
    _c("eks-pod-identity-agent", "aws", ("/go-runner", "/eks-pod-identity-agent"),
       *_eks("eks/eks-pod-identity-agent")),
    _k("amazon-cloudwatch-agent", "aws",
       "/opt/aws/amazon-cloudwatch-agent/bin/amazon-cloudwatch-agent"),
    # Amazon Linux's yum and dnf are Python scripts (exe: the interpreter); their
    # plugins read the identity document over IMDSv1 to pick the region's mirrors.
    _py("yum", "aws", ("/usr/bin/yum",),
        interpreters=("/usr/bin/python2*", "/usr/bin/python3*",
                      "/usr/libexec/platform-python*")),
    _py("dnf", "aws", ("/usr/bin/dnf", "/usr/bin/dnf-3"),
        interpreters=("/usr/bin/python3*", "/usr/libexec/platform-python*")),
    _k("nodeadm", "aws", "/usr/bin/nodeadm", "/usr/local/bin/nodeadm"),
    _k("ec2-instance-connect", "aws", "/usr/share/ec2-instance-connect/*",
       "/opt/aws/bin/eic_*"),
    _k("kubelet", "kubernetes", "/usr/bin/kubelet", "/usr/local/bin/kubelet",
       "/home/kubernetes/bin/kubelet"),
    _k("google_guest_agent", "gcp", "/usr/bin/google_guest_agent"),
    _k("google_metadata_script_runner", "gcp", "/usr/bin/google_metadata_script_runner"),
    _k("google_oslogin_nss", "gcp", "/usr/bin/google_oslogin_nss"),
    _k("google_osconfig_agent", "gcp", "/usr/bin/google_osconfig_agent"),
    _c("gke-metadata-server", "gcp", ("/gke-metadata-server",),
       "gke.gcr.io/gke-metadata-server"),
    _k("gce-workload-cert-refresh", "gcp", "/usr/bin/gce-workload-cert-refresh"),
    _py("waagent", "azure", ("/usr/sbin/waagent", "/usr/bin/waagent"), "/usr/sbin/waagent"),
    _py("WALinuxAgent", "azure", ("/usr/sbin/waagent", "/usr/bin/waagent"), "/usr/sbin/waagent"),
    _c("azure-cns", "azure", ("/usr/local/bin/azure-cns", "/azure-cns"),
       "mcr.microsoft.com/containernetworking/azure-cns"),
    _k("azure-vnet", "azure", "/opt/cni/bin/azure-vnet"),
    _k("aliyun-service", "alibaba", "/usr/sbin/aliyun-service"),
    _k("oracle-cloud-agent", "oci", "/usr/libexec/oracle-cloud-agent/*",
       "/usr/bin/oracle-cloud-agent"),
)


class KnownCallerCatalog:
    """Lookup by (name, executable, image, in a container), memoised: agents call every
    few minutes."""

    def __init__(self, callers: tuple[KnownCaller, ...] = KNOWN_CALLERS) -> None:
        self._by_comm: dict[str, list[KnownCaller]] = {}
        for c in callers:
            self._by_comm.setdefault(comm(c.name), []).append(c)
        self._memo: dict[tuple, KnownCaller | None] = {}
        self._interpreted = frozenset(comm(c.name) for c in callers if c.scripts)

    def script_key(self, event: Event) -> str | None:
        """The script that decides the event's caller's identity: None unless its name is an
        interpreted agent's (so other callers never pay for reading a command line)."""
        name = event.name  # on every scored event: a set lookup, comm() only when long
        if name is None or (name not in self._interpreted and (
                len(name) <= COMM_LEN or comm(name) not in self._interpreted)):
            return None
        return script_of(event.exe, event.command_line)

    def knows_name(self, name: str) -> bool:
        """True when some entry has this name (whatever its executable)."""
        return comm(name) in self._by_comm

    def runs_here(self, name: str, image: str | None = None,
                  in_container: bool = False) -> bool:
        """True when an agent named `name` runs where the caller runs (a host agent on the
        host, a DaemonSet agent in its vendor's image): what can be said of a caller whose
        executable is unknown."""
        repo = image_repository(image) if in_container else None
        return any(c.host if not in_container else repo is not None and repo in c.images
                   for c in self._by_comm.get(comm(name), ()))

    def lookup_event(self, event: Event) -> KnownCaller | None:
        """The entry vouching for the event's caller; a container id or an image puts the
        caller in a container, and so does an unknown container: a host agent is vouched
        for only where it is known to run outside one."""
        return self.lookup(event.name, event.exe, event.image,
                           event.container_id is not None or event.image is not None
                           or bool(event.container_unknown),
                           self.script_key(event))

    def lookup(self, name: str, exe: str | None, image: str | None = None,
               in_container: bool = False, script: str | None = None) -> KnownCaller | None:
        key = (name, exe, image, in_container, script)
        try:
            return self._memo[key]
        except KeyError:
            pass
        hit = next((c for c in self._by_comm.get(comm(name), ())
                    if c.matches(name, exe, image, in_container, script)), None)
        if len(self._memo) > 100_000:
            self._memo.clear()
        self._memo[key] = hit
        return hit
