"""Well-known legitimate callers of the metadata service, keyed by name AND executable.

A name alone proves nothing (anyone can call a binary `amazon-ssm-agent`), so an entry
matches only when the executable is one of the paths the vendor's package installs.
Names are the kernel's `comm`, truncated to 15 bytes, as the tracer and most EDR exports
report them; an entry's full name is truncated the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

COMM_LEN = 15


def comm(name: str) -> str:
    """The name as Linux reports it in `comm`: at most 15 bytes."""
    raw = name.encode()
    return raw[:COMM_LEN].decode(errors="ignore") if len(raw) > COMM_LEN else name


@dataclass(frozen=True, slots=True)
class KnownCaller:
    name: str
    executables: tuple[str, ...]  # exact paths or globs below a fixed directory
    vendor: str

    def matches(self, name: str, exe: str | None) -> bool:
        if exe is None or comm(self.name) != comm(name):
            return False
        return any(fnmatchcase(exe, pattern) for pattern in self.executables)


def _k(name: str, vendor: str, *executables: str) -> KnownCaller:
    return KnownCaller(name, executables, vendor)


KNOWN_CALLERS: tuple[KnownCaller, ...] = (
    _k("cloud-init", "canonical", "/usr/bin/cloud-init", "/usr/local/bin/cloud-init",
       "/usr/bin/python3*", "/usr/lib/python3*/*"),
    _k("amazon-ssm-agent", "aws", "/usr/bin/amazon-ssm-agent",
       "/snap/amazon-ssm-agent/*/amazon-ssm-agent"),
    _k("ssm-agent-worker", "aws", "/usr/bin/ssm-agent-worker",
       "/snap/amazon-ssm-agent/*/ssm-agent-worker"),
    _k("ssm-session-worker", "aws", "/usr/bin/ssm-session-worker",
       "/snap/amazon-ssm-agent/*/ssm-session-worker"),
    _k("aws-k8s-agent", "aws", "/app/aws-k8s-agent"),
    _k("aws-ebs-csi-driver", "aws", "/bin/aws-ebs-csi-driver"),
    _k("aws-efs-csi-driver", "aws", "/bin/aws-efs-csi-driver"),
    _k("ecr-credential-provider", "aws",
       "/etc/eks/image-credential-provider/ecr-credential-provider",
       "/usr/local/bin/ecr-credential-provider", "/usr/bin/ecr-credential-provider"),
    _k("eks-pod-identity-agent", "aws", "/go-runner", "/eks-pod-identity-agent"),
    _k("nodeadm", "aws", "/usr/bin/nodeadm", "/usr/local/bin/nodeadm"),
    _k("ec2-instance-connect", "aws", "/usr/share/ec2-instance-connect/*",
       "/opt/aws/bin/eic_*"),
    _k("kubelet", "kubernetes", "/usr/bin/kubelet", "/usr/local/bin/kubelet",
       "/home/kubernetes/bin/kubelet"),
    _k("google_guest_agent", "gcp", "/usr/bin/google_guest_agent"),
    _k("google_metadata_script_runner", "gcp", "/usr/bin/google_metadata_script_runner"),
    _k("google_oslogin_nss", "gcp", "/usr/bin/google_oslogin_nss"),
    _k("google_osconfig_agent", "gcp", "/usr/bin/google_osconfig_agent"),
    _k("gke-metadata-server", "gcp", "/gke-metadata-server"),
    _k("gce-workload-cert-refresh", "gcp", "/usr/bin/gce-workload-cert-refresh"),
    _k("waagent", "azure", "/usr/sbin/waagent", "/usr/bin/python3*"),
    _k("WALinuxAgent", "azure", "/usr/sbin/waagent"),
    _k("azure-cns", "azure", "/usr/local/bin/azure-cns", "/azure-cns"),
    _k("azure-vnet", "azure", "/opt/cni/bin/azure-vnet"),
    _k("aliyun-service", "alibaba", "/usr/sbin/aliyun-service"),
    _k("oracle-cloud-agent", "oci", "/usr/libexec/oracle-cloud-agent/*",
       "/usr/bin/oracle-cloud-agent"),
)


class KnownCallerCatalog:
    """Lookup by (name, executable), memoised: agents call every few minutes."""

    def __init__(self, callers: tuple[KnownCaller, ...] = KNOWN_CALLERS) -> None:
        self._by_comm: dict[str, list[KnownCaller]] = {}
        for c in callers:
            self._by_comm.setdefault(comm(c.name), []).append(c)
        self._memo: dict[tuple[str, str | None], KnownCaller | None] = {}

    def lookup(self, name: str, exe: str | None) -> KnownCaller | None:
        key = (name, exe)
        try:
            return self._memo[key]
        except KeyError:
            pass
        hit = next((c for c in self._by_comm.get(comm(name), ()) if c.matches(name, exe)), None)
        if len(self._memo) > 100_000:
            self._memo.clear()
        self._memo[key] = hit
        return hit
