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
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from scoring.detectors import image_repository
from scoring.events import Event

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
    host: bool = True  # runs on the host (outside any container)
    images: tuple[str, ...] = ()  # image repositories (globs) it runs in

    def matches(self, name: str, exe: str | None, image: str | None = None,
                in_container: bool = False) -> bool:
        if exe is None or comm(self.name) != comm(name):
            return False
        if not any(fnmatchcase(exe, pattern) for pattern in self.executables):
            return False
        if not in_container:
            return self.host
        repo = image_repository(image)
        return repo is not None and any(fnmatchcase(repo, p) for p in self.images)


def _k(name: str, vendor: str, *executables: str) -> KnownCaller:
    """A host agent (installed by a package or the node image)."""
    return KnownCaller(name, executables, vendor)


def _c(name: str, vendor: str, executables: tuple[str, ...], *images: str,
       host: bool = False) -> KnownCaller:
    """An agent shipped as a container image (a DaemonSet), by its vendor's repositories."""
    return KnownCaller(name, executables, vendor, host, images)


# Amazon EKS add-on images come from this account's ECR in every commercial region.
_EKS_ECR = "602401143452.dkr.ecr.*.amazonaws.com"


KNOWN_CALLERS: tuple[KnownCaller, ...] = (
    _k("cloud-init", "canonical", "/usr/bin/cloud-init", "/usr/local/bin/cloud-init",
       "/usr/bin/python3*", "/usr/lib/python3*/*"),
    _k("amazon-ssm-agent", "aws", "/usr/bin/amazon-ssm-agent",
       "/snap/amazon-ssm-agent/*/amazon-ssm-agent"),
    _k("ssm-agent-worker", "aws", "/usr/bin/ssm-agent-worker",
       "/snap/amazon-ssm-agent/*/ssm-agent-worker"),
    _k("ssm-session-worker", "aws", "/usr/bin/ssm-session-worker",
       "/snap/amazon-ssm-agent/*/ssm-session-worker"),
    _c("aws-k8s-agent", "aws", ("/app/aws-k8s-agent",), f"{_EKS_ECR}/amazon-k8s-cni"),
    _c("aws-ebs-csi-driver", "aws", ("/bin/aws-ebs-csi-driver",),
       "public.ecr.aws/ebs-csi-driver/aws-ebs-csi-driver", f"{_EKS_ECR}/eks/aws-ebs-csi-driver",
       "registry.k8s.io/provider-aws/aws-ebs-csi-driver"),
    _c("aws-efs-csi-driver", "aws", ("/bin/aws-efs-csi-driver",),
       "public.ecr.aws/efs-csi-driver/amazon/aws-efs-csi-driver",
       f"{_EKS_ECR}/eks/aws-efs-csi-driver"),
    _k("ecr-credential-provider", "aws",
       "/etc/eks/image-credential-provider/ecr-credential-provider",
       "/usr/local/bin/ecr-credential-provider", "/usr/bin/ecr-credential-provider"),
    _c("eks-pod-identity-agent", "aws", ("/go-runner", "/eks-pod-identity-agent"),
       f"{_EKS_ECR}/eks/eks-pod-identity-agent"),
    _k("amazon-cloudwatch-agent", "aws",
       "/opt/aws/amazon-cloudwatch-agent/bin/amazon-cloudwatch-agent"),
    # Amazon Linux's yum and dnf are Python scripts (exe: the interpreter); their
    # plugins read the identity document over IMDSv1 to pick the region's mirrors.
    _k("yum", "aws", "/usr/bin/python2*", "/usr/bin/python3*"),
    _k("dnf", "aws", "/usr/bin/python3*"),
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
    _k("waagent", "azure", "/usr/sbin/waagent", "/usr/bin/python3*"),
    _k("WALinuxAgent", "azure", "/usr/sbin/waagent"),
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

    def knows_name(self, name: str) -> bool:
        """True when some entry has this name (whatever its executable)."""
        return comm(name) in self._by_comm

    def lookup_event(self, event: Event) -> KnownCaller | None:
        """The entry vouching for the event's caller; a container id or an image puts the
        caller in a container."""
        return self.lookup(event.name, event.exe, event.image,
                           event.container_id is not None or event.image is not None)

    def lookup(self, name: str, exe: str | None, image: str | None = None,
               in_container: bool = False) -> KnownCaller | None:
        key = (name, exe, image, in_container)
        try:
            return self._memo[key]
        except KeyError:
            pass
        hit = next((c for c in self._by_comm.get(comm(name), ())
                    if c.matches(name, exe, image, in_container)), None)
        if len(self._memo) > 100_000:
            self._memo.clear()
        self._memo[key] = hit
        return hit
