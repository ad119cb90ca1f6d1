# Metadata addresses in this file are data (event fields, expected matches): nothing here
# connects to them. Real connections happen only inside a test's own network namespace
# (netns, tests/netns_fixtures.py).
"""The benign half of the scenario: a mixed AWS/GCP/Azure Kubernetes fleet at work.

What each node does is modelled on the real agents (names as the kernel reports them,
i.e. truncated to 15 bytes; executables, users and parents as `ps` shows them):

* AWS (EKS): amazon-ssm-agent and its ssm-agent-worker (IMDSv2: token PUT then GET),
  kubelet, ecr-credential-provider run by kubelet on image pulls, the VPC CNI's
  aws-k8s-agent and the EBS CSI driver in kube-system; chronyd to the Time Sync
  service (169.254.169.123) and systemd-resolved to the VPC resolver (169.254.169.253),
  which are not metadata endpoints.
* GCP (GKE): google_guest_agent, google_osconfig_agent, kubelet, gke-metadata-server in
  kube-system (upstream to 169.254.169.254) and kubelet probing it on 169.254.169.252:988.
* Azure (AKS): waagent (a Python script, so comm "waagent" and exe python3) to WireServer
  168.63.129.16:80 and IMDS, its extension handler (comm "python3") to the HostGAPlugin
  on 32526, azure-cns in kube-system, kubelet; DNS to 168.63.129.16:53 (not an endpoint).
* Every node: fluent-bit (namespace logging); from day ~9 a new collector, otelcol-contrib,
  rolled out to every node within ten minutes; a weekly inventory script; boot-time
  callers (cloud-init, user-data curl, nodeadm, GKE's configure.sh) on nodes that join.
* Applications in pods calling the metadata service through their cloud SDKs (java,
  node, python3), rescheduled from time to time, plus a web frontend that never does.
* Off-target traffic: cluster DNS and service IPs in 10.0.0.0/8.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from bench import http_requests as R
from bench.ecs import Host, Pod, Proc, Req, Trace, container_id, shape
from bench.timing import pair, periodic, poisson

DAY = 86400.0
HOUR = 3600.0
SHIM = ("containerd-shim", "/usr/bin/containerd-shim-runc-v2")
SYSTEMD = ("systemd", "/usr/lib/systemd/systemd")
IMDS = "169.254.169.254"

REGIONS = {"aws": "us-east-1", "gcp": "us-central1", "azure": "eastus"}
CLUSTERS = {"aws": "eks-prod-use1", "gcp": "gke-prod-usc1", "azure": "aks-prod-eus"}


@dataclass(frozen=True)
class App:
    """A Deployment whose containers use a cloud SDK (or, for web, nothing)."""

    name: str
    cloud: str
    namespace: str
    image: str
    proc: str
    exe: str
    user: str
    uid: str
    cmd: str
    dst: tuple[str, int]
    period: float
    replicas: int
    imdsv2: bool = False
    # The app's requests (bench.http_requests.APP_REQS) are keyed by `name`.


APPS: tuple[App, ...] = (
    App("payments-api", "aws", "payments",
        "123456789012.dkr.ecr.us-east-1.amazonaws.com/payments-api:2.14.1", "java",
        "/usr/lib/jvm/java-17-amazon-corretto/bin/java", "app", "1001",
        "java -XX:MaxRAMPercentage=75 -jar /app/payments-api.jar",
        ("169.254.170.23", 80), 900, 4),
    App("storefront", "aws", "shop",
        "123456789012.dkr.ecr.us-east-1.amazonaws.com/storefront:6.0.2", "gunicorn",
        "/usr/local/bin/python3.11", "app", "1001",
        "/usr/local/bin/python3.11 /usr/local/bin/gunicorn shop.wsgi -w 4 -b 0.0.0.0:8000",
        (IMDS, 80), 900, 3, True),
    App("orders-worker", "aws", "orders",
        "123456789012.dkr.ecr.us-east-1.amazonaws.com/orders-worker:1.8.0", "python3",
        "/usr/local/bin/python3.11", "root", "0", "python3 -m orders.worker --queue orders",
        (IMDS, 80), 600, 3, True),
    App("recommender", "gcp", "ml", "us-docker.pkg.dev/acme-prod/ml/recommender:4.2.0",
        "python3", "/usr/local/bin/python3.11", "root", "0",
        "python3 /srv/recommender/serve.py --port 8080", (IMDS, 80), 600, 3),
    App("checkout-web", "gcp", "checkout", "us-docker.pkg.dev/acme-prod/web/checkout:5.3.0",
        "node", "/usr/local/bin/node", "node", "1000", "node /app/server.js",
        (IMDS, 80), 900, 3),
    App("billing-svc", "azure", "billing", "acmeprod.azurecr.io/billing-svc:3.1.2", "java",
        "/opt/java/openjdk/bin/java", "app", "1001", "java -jar /opt/app/billing-svc.jar",
        (IMDS, 80), 900, 3),
    App("reporting", "azure", "reporting", "acmeprod.azurecr.io/reporting:2.0.4", "python3",
        "/usr/local/bin/python3.12", "root", "0", "python3 -m reporting.scheduler",
        (IMDS, 80), 1800, 2),
)

# Frontends that never call the metadata service: where the container attacks land.
WEB_IMAGES = {
    "aws": "123456789012.dkr.ecr.us-east-1.amazonaws.com/web-frontend:3.2.0",
    "gcp": "us-docker.pkg.dev/acme-prod/web/storefront:7.1.3",
    "azure": "acmeprod.azurecr.io/portal-web:1.4.9",
}


class Fleet:
    """Creates the nodes and writes all benign activity into a `Trace`."""

    def __init__(self, rng: random.Random, trace: Trace, start: float, end: float,
                 scale: float) -> None:
        self.rng, self.trace, self.start, self.end = rng, trace, start, end
        self.hosts: list[Host] = []
        # app name -> placements (host, pod, alive from, alive until)
        self.pods: dict[str, list[tuple[Host, Pod, float, float]]] = {}
        self.web_pods: dict[str, list[tuple[Host, Pod]]] = {}
        self._pid = 1000
        self._make_hosts(scale)

    # -- nodes ---------------------------------------------------------------------
    def _make_hosts(self, scale: float) -> None:
        rng = self.rng
        counts = {c: max(3, round(n * scale)) for c, n in (("aws", 16), ("gcp", 12),
                                                           ("azure", 12))}
        for cloud, n in counts.items():
            joiners = max(1, round(n * 0.3))
            for i in range(n):
                initial = i < n - joiners
                # Joiners arrive through both weeks; at least one per cloud in week two.
                if initial:
                    join = self.start - rng.uniform(2, 60) * DAY
                elif i == n - 1:
                    join = self.start + rng.uniform(8.5, 12.5) * DAY
                else:
                    join = self.start + rng.uniform(0.5, 13.0) * DAY
                self.hosts.append(self._host(cloud, i, join, initial))

    def _host(self, cloud: str, i: int, join: float, initial: bool) -> Host:
        rng = self.rng
        if cloud == "aws":
            name = f"ip-10-0-{rng.randrange(16, 200)}-{rng.randrange(2, 254)}.ec2.internal"
            hid = f"i-0{rng.getrandbits(64):016x}"
        elif cloud == "gcp":
            name = f"gke-prod-usc1-pool-{1 + i % 2}-{rng.getrandbits(32):08x}-{i:04x}"
            hid = str(rng.getrandbits(62))
        else:
            name = f"aks-nodepool1-{rng.randrange(10**7, 10**8)}-vmss{i:06x}"
            hid = f"{rng.getrandbits(128):032x}"
        return Host(name, hid, cloud, REGIONS[cloud], CLUSTERS[cloud], join, initial)

    def pid(self) -> int:
        self._pid += self.rng.randrange(3, 400)
        if self._pid > 4_000_000:
            self._pid = 1000
        return self._pid

    def up(self, host: Host) -> float:
        """When the node's steady-state agents start (after boot)."""
        return max(self.start, host.join_ts + 90.0)

    # -- helpers -------------------------------------------------------------------
    def emit(self, host: Host, proc: Proc, dst: tuple[str, int], times: list[float],
             actor: str, pod: Pod | None = None, transport: str = "tcp",
             reqs: tuple[Req, ...] = ()) -> None:
        """`times` of calls to `dst`; with `reqs`, the i-th call sends reqs[i % len]
        (a call to a metadata endpoint always sends one; off-target traffic none)."""
        if not times:
            return
        emit_requests(self.trace, host, proc, dst, times, "benign", f"benign/{actor}", pod,
                      reqs, transport, (self.start, self.end))

    def daemon(self, name: str, exe: str, cmd: str, parent: tuple[str, str] = SYSTEMD,
               user: str = "root", uid: str = "0", ppid: int = 1) -> Proc:
        return Proc(name, exe, user, uid, parent[0], parent[1], cmd, self.pid(), ppid)

    def kube_pod(self, host: Host, namespace: str, prefix: str, image: str,
                 born: float) -> Pod:
        suffix = "".join(self.rng.choice("bcdfghjklmnpqrstvwxz2456789") for _ in range(5))
        pod = f"{prefix}-{suffix}"
        return Pod(namespace, pod, image, container_id(host.name, pod, born))

    # -- the whole benign fleet ----------------------------------------------------
    def generate(self) -> None:
        for host in self.hosts:
            if host.join_ts >= self.start:
                self.boot(host)
            {"aws": self.aws_node, "gcp": self.gcp_node, "azure": self.azure_node}[
                host.cloud](host)
            self.common_node(host)
        self.applications()
        self.rollout()
        self.weekly_jobs()
        self.operators()
        self.legacy_and_newcomers()

    def boot(self, host: Host) -> None:
        """Callers that run once, when a node boots and joins the cluster."""
        rng, t = self.rng, host.join_ts
        ci = self.daemon("cloud-init", "/usr/bin/python3.9" if host.cloud == "aws"
                         else "/usr/bin/python3.10",
                         "/usr/bin/python3 /usr/bin/cloud-init init")
        self.emit(host, ci, (IMDS, 80), sorted(t + rng.uniform(2, 40)
                                               for _ in range(rng.randint(18, 40))),
                  "cloud-init", reqs=R.CLOUD_INIT_REQS[host.cloud])
        if host.cloud == "aws":
            # The node's user-data script fetches its identity with curl (IMDSv2).
            ppid = self.pid()
            tok = Proc("curl", "/usr/bin/curl", "root", "0", "part-001", "/usr/bin/bash",
                       "curl -s -X PUT http://169.254.169.254/latest/api/token "
                       "-H X-aws-ec2-metadata-token-ttl-seconds: 21600", self.pid(), ppid)
            get = Proc("curl", "/usr/bin/curl", "root", "0", "part-001", "/usr/bin/bash",
                       "curl -s -H X-aws-ec2-metadata-token: AQAEAFakeTokenValue0123== "
                       "http://169.254.169.254/latest/meta-data/instance-id",
                       self.pid(), ppid)
            self.emit(host, tok, (IMDS, 80), [t + 45.0], "user-data-curl",
                      reqs=(R.USER_DATA_CURL_TOKEN,))
            self.emit(host, get, (IMDS, 80), [t + 45.2, t + 45.4, t + 45.7],
                      "user-data-curl", reqs=(R.USER_DATA_CURL_GET,))
            nodeadm = self.daemon("nodeadm", "/usr/bin/nodeadm", "nodeadm init")
            self.emit(host, nodeadm, (IMDS, 80),
                      sorted(t + rng.uniform(50, 70) for _ in range(8)), "nodeadm",
                      reqs=R.NODEADM)
        elif host.cloud == "gcp":
            runner = self.daemon("google_metadata_script_runner",
                                 "/usr/bin/google_metadata_script_runner",
                                 "/usr/bin/google_metadata_script_runner startup")
            self.emit(host, runner, (IMDS, 80), sorted(t + rng.uniform(20, 40)
                                                       for _ in range(4)), "gce-startup",
                      reqs=R.GCE_STARTUP)
            curl = Proc("curl", "/usr/bin/curl", "root", "0", "configure.sh",
                        "/usr/bin/bash", "curl --fail --retry 5 -H Metadata-Flavor: Google "
                        "http://metadata.google.internal/computeMetadata/v1/instance/"
                        "attributes/kube-env", self.pid(), self.pid())
            self.emit(host, curl, (IMDS, 80), [t + 42.0, t + 43.1], "gke-configure-curl",
                      reqs=R.GKE_CONFIGURE)
        else:
            prov = self.daemon("waagent", "/usr/bin/python3.10",
                               "python3 -u /usr/sbin/waagent -daemon")
            self.emit(host, prov, ("168.63.129.16", 80),
                      sorted(t + rng.uniform(5, 60) for _ in range(12)), "waagent",
                      reqs=R.WAAGENT_BOOT)

    def aws_node(self, host: Host) -> None:
        rng, up, end = self.rng, self.up(host), self.end
        ssm = self.daemon("amazon-ssm-agent", "/usr/bin/amazon-ssm-agent",
                          "/usr/bin/amazon-ssm-agent")
        self.emit(host, ssm, (IMDS, 80), pair(periodic(rng, up, end, 900)), "amazon-ssm-agent",
                  reqs=R.SSM)
        worker = self.daemon("ssm-agent-worker", "/usr/bin/ssm-agent-worker",
                             "/usr/bin/ssm-agent-worker",
                             ("amazon-ssm-agent", "/usr/bin/amazon-ssm-agent"), ppid=ssm.pid)
        self.emit(host, worker, (IMDS, 80), pair(periodic(rng, up, end, 1800)),
                  "ssm-agent-worker", reqs=R.SSM_WORKER)
        kubelet = self.daemon("kubelet", "/usr/bin/kubelet",
                              "/usr/bin/kubelet --config /etc/kubernetes/kubelet/config.json")
        self.emit(host, kubelet, (IMDS, 80), pair(periodic(rng, up, end, 1800)), "kubelet",
                  reqs=R.KUBELET_AWS)
        ecr = self.daemon("ecr-credential-provider",
                          "/etc/eks/image-credential-provider/ecr-credential-provider",
                          "/etc/eks/image-credential-provider/ecr-credential-provider",
                          ("kubelet", "/usr/bin/kubelet"), ppid=kubelet.pid)
        self.emit(host, ecr, (IMDS, 80), pair(poisson(rng, up, end, 6)),
                  "ecr-credential-provider", reqs=R.ECR_PROVIDER)
        cni = self.kube_pod(host, "kube-system", "aws-node",
                            "602401143452.dkr.ecr.us-east-1.amazonaws.com/amazon-k8s-cni:v1.18.1",
                            up)
        ipamd = self.daemon("aws-k8s-agent", "/app/aws-k8s-agent", "/app/aws-k8s-agent",
                            ("aws-vpc-cni", "/app/aws-vpc-cni"))
        self.emit(host, ipamd, (IMDS, 80), pair(periodic(rng, up, end, 600)),
                  "aws-k8s-agent", cni, reqs=R.VPC_CNI)
        ebs = self.kube_pod(host, "kube-system", "ebs-csi-node",
                            "public.ecr.aws/ebs-csi-driver/aws-ebs-csi-driver:v1.30.0", up)
        csi = self.daemon("aws-ebs-csi-driver", "/bin/aws-ebs-csi-driver",
                          "/bin/aws-ebs-csi-driver node --endpoint=unix:/csi/csi.sock",
                          SHIM)
        self.emit(host, csi, (IMDS, 80), pair(periodic(rng, up, end, 3600)),
                  "aws-ebs-csi-driver", ebs, reqs=R.EBS_CSI)
        # Neighbours of IMDS that are not metadata endpoints.
        chrony = self.daemon("chronyd", "/usr/sbin/chronyd", "/usr/sbin/chronyd -F 2",
                             user="chrony", uid="994")
        self.emit(host, chrony, ("169.254.169.123", 123), periodic(rng, up, end, 1024),
                  "chronyd", transport="udp")
        resolved = self.daemon("systemd-resolved", "/usr/lib/systemd/systemd-resolved",
                               "/usr/lib/systemd/systemd-resolved", user="systemd-resolve",
                               uid="193")
        self.emit(host, resolved, ("169.254.169.253", 53), poisson(rng, up, end, 120),
                  "systemd-resolved", transport="udp")

    def gcp_node(self, host: Host) -> None:
        rng, up, end = self.rng, self.up(host), self.end
        guest = self.daemon("google_guest_agent", "/usr/bin/google_guest_agent",
                            "/usr/bin/google_guest_agent")
        self.emit(host, guest, (IMDS, 80), periodic(rng, up, end, 600), "google_guest_agent",
                  reqs=R.GUEST_AGENT)
        osc = self.daemon("google_osconfig_agent", "/usr/bin/google_osconfig_agent",
                          "/usr/bin/google_osconfig_agent")
        self.emit(host, osc, (IMDS, 80), periodic(rng, up, end, 600), "google_osconfig_agent",
                  reqs=R.OSCONFIG)
        kubelet = self.daemon("kubelet", "/home/kubernetes/bin/kubelet",
                              "/home/kubernetes/bin/kubelet --v=2 --cloud-provider=external")
        self.emit(host, kubelet, (IMDS, 80), periodic(rng, up, end, 1800), "kubelet",
                  reqs=R.KUBELET_GCP)
        gms_pod = self.kube_pod(host, "kube-system", "gke-metadata-server",
                                "gke.gcr.io/gke-metadata-server:20240425_2300_RC0", up)
        gms = self.daemon("gke-metadata-server", "/gke-metadata-server",
                          "/gke-metadata-server --logtostderr --token-exchange-mode=direct",
                          SHIM)
        self.emit(host, gms, (IMDS, 80), periodic(rng, up, end, 300), "gke-metadata-server",
                  gms_pod, reqs=R.GKE_METADATA_SERVER)
        # kubelet's readiness probe of the GKE metadata server on its node-local address.
        self.emit(host, kubelet, ("169.254.169.252", 988), periodic(rng, up, end, 900),
                  "kubelet", reqs=R.GKE_MDS_PROBE)

    def azure_node(self, host: Host) -> None:
        rng, up, end = self.rng, self.up(host), self.end
        wa = self.daemon("waagent", "/usr/bin/python3.10",
                         "python3 -u /usr/sbin/waagent -daemon")
        self.emit(host, wa, ("168.63.129.16", 80), periodic(rng, up, end, 300), "waagent",
                  reqs=R.WAAGENT_WIRE)
        self.emit(host, wa, (IMDS, 80), periodic(rng, up, end, 1800), "waagent",
                  reqs=R.WAAGENT_IMDS)
        ext = self.daemon("python3", "/usr/bin/python3.10",
                          "python3 -u bin/WALinuxAgent-2.11.1.4-py3.8.egg -run-exthandlers",
                          ("waagent", "/usr/bin/python3.10"), ppid=wa.pid)
        self.emit(host, ext, ("168.63.129.16", 32526), periodic(rng, up, end, 600),
                  "waagent-exthandler", reqs=R.EXTHANDLER_HOSTGA)
        self.emit(host, ext, ("168.63.129.16", 80), periodic(rng, up, end, 900),
                  "waagent-exthandler", reqs=R.EXTHANDLER_WIRE)
        cns_pod = self.kube_pod(host, "kube-system", "azure-cns",
                                "mcr.microsoft.com/containernetworking/azure-cns:v1.5.26", up)
        cns = self.daemon("azure-cns", "/usr/local/bin/azure-cns", "/usr/local/bin/azure-cns",
                          SHIM)
        self.emit(host, cns, (IMDS, 80), periodic(rng, up, end, 600), "azure-cns", cns_pod,
                  reqs=R.AZURE_CNS)
        kubelet = self.daemon("kubelet", "/usr/local/bin/kubelet",
                              "/usr/local/bin/kubelet --cloud-provider=external")
        self.emit(host, kubelet, (IMDS, 80), periodic(rng, up, end, 1800), "kubelet",
                  reqs=R.KUBELET_AZURE)
        resolved = self.daemon("systemd-resolved", "/usr/lib/systemd/systemd-resolved",
                               "/usr/lib/systemd/systemd-resolved", user="systemd-resolve",
                               uid="101")
        self.emit(host, resolved, ("168.63.129.16", 53), poisson(rng, up, end, 150),
                  "systemd-resolved", transport="udp")

    def common_node(self, host: Host) -> None:
        rng, up, end = self.rng, self.up(host), self.end
        fb_pod = self.kube_pod(host, "logging", "fluent-bit",
                               "cr.fluentbit.io/fluent/fluent-bit:3.0.4", up)
        fb = self.daemon("fluent-bit", "/fluent-bit/bin/fluent-bit",
                         "/fluent-bit/bin/fluent-bit -c /fluent-bit/etc/fluent-bit.conf", SHIM)
        fb_times = periodic(rng, up, end, 3600)
        self.emit(host, fb, (IMDS, 80), pair(fb_times) if host.cloud == "aws" else fb_times,
                  "fluent-bit", fb_pod, reqs=R.FLUENT_BIT[host.cloud])
        coredns = self.daemon("coredns", "/coredns", "/coredns -conf /etc/coredns/Corefile",
                              SHIM, user="65532", uid="65532")
        upstream = {"aws": ("169.254.169.253", 53), "gcp": ("10.128.0.2", 53),
                    "azure": ("168.63.129.16", 53)}[host.cloud]
        self.emit(host, coredns, upstream, poisson(rng, up, end, 60), "coredns",
                  transport="udp")

    def applications(self) -> None:
        """Deployments placed on nodes of their cloud, rescheduled a few times."""
        rng = self.rng
        for app in APPS:
            hosts = [h for h in self.hosts if h.cloud == app.cloud]
            # Rollouts (new pods, maybe new nodes) on two or three random days.
            cuts = sorted(self.start + rng.uniform(1, 13) * DAY for _ in range(rng.randint(2, 3)))
            spans = list(zip([self.start, *cuts], [*cuts, self.end], strict=True))
            self.pods[app.name] = []
            for a, b in spans:
                live = [h for h in hosts if self.up(h) < b]
                for h in rng.sample(live, min(app.replicas, len(live))):
                    born = max(a, self.up(h))
                    pod = self.kube_pod(h, app.namespace, app.name, app.image, born)
                    proc = Proc(app.proc, app.exe, app.user, app.uid, SHIM[0], SHIM[1],
                                app.cmd, self.pid(), self.pid())
                    times = periodic(rng, born, b, app.period)
                    times = [born + 3.0, *times]  # the SDK resolves region at start
                    self.emit(h, proc, app.dst, pair(times) if app.imdsv2 else times,
                              app.name, pod, reqs=R.APP_REQS[app.name])
                    svc = (f"10.100.{rng.randrange(256)}.{rng.randrange(1, 255)}", 5432)
                    self.emit(h, proc, svc, poisson(rng, born, b, 200), app.name, pod)
                    self.pods[app.name].append((h, pod, born, b))
        for cloud, image in WEB_IMAGES.items():
            self.web_pods[cloud] = []
            for h in [h for h in self.hosts if h.cloud == cloud][:3]:
                born = self.up(h)
                pod = self.kube_pod(h, "web", "web-frontend", image, born)
                nginx = Proc("nginx", "/usr/sbin/nginx", "nginx", "101", "nginx",
                             "/usr/sbin/nginx", "nginx: worker process", self.pid(), self.pid())
                self.emit(h, nginx, ("10.96.0.10", 53), poisson(rng, born, self.end, 150),
                          "web-frontend", pod, "udp")
                self.emit(h, nginx, ("10.100.12.7", 8080), poisson(rng, born, self.end, 150),
                          "web-frontend", pod)
                self.web_pods[cloud].append((h, pod))

    def rollout(self) -> None:
        """Day ~9: otelcol-contrib goes to every node within ten minutes, and to every
        node that joins afterwards."""
        rng = self.rng
        t0 = self.start + 9 * DAY + 10 * HOUR
        for h in self.hosts:
            born = max(t0 + rng.uniform(0, 600), self.up(h) + 60)
            if born >= self.end:
                continue
            pod = self.kube_pod(h, "observability", "otel-agent",
                                "otel/opentelemetry-collector-contrib:0.102.1", born)
            proc = Proc("otelcol-contrib", "/otelcol-contrib", "10001", "10001", SHIM[0],
                        SHIM[1], "/otelcol-contrib --config /conf/otel-agent.yaml",
                        self.pid(), self.pid())
            times = [born + 1.0, born + 1.2, born + 1.5, *periodic(rng, born, self.end, 600)]
            if h.cloud == "aws":
                times = pair(times)
            self.emit(h, proc, (IMDS, 80), times, "otelcol-contrib", pod, reqs=R.OTEL[h.cloud])

    def weekly_jobs(self) -> None:
        """A velero backup on Sundays 02:00 and an inventory timer on Mondays 04:00."""
        rng = self.rng
        aws = [h for h in self.hosts if h.cloud == "aws" and h.initial]
        for week in (0, 1):
            t = self.start + (6 + 7 * week) * DAY + 2 * HOUR
            h = rng.choice(aws)
            pod = self.kube_pod(h, "velero", "velero-backup", "velero/velero:v1.13.0", t)
            proc = Proc("velero", "/velero", "root", "0", SHIM[0], SHIM[1],
                        "/velero server --uploader-type=kopia", self.pid(), self.pid())
            self.emit(h, proc, (IMDS, 80),
                      pair(sorted(t + rng.uniform(0, 900) for _ in range(10))),
                      "velero", pod, reqs=R.VELERO)
            t = self.start + 7 * week * DAY + 4 * HOUR
            for h in self.hosts:
                if self.up(h) > t:
                    continue
                inv = self.daemon("python3", "/usr/bin/python3",
                                  "/usr/bin/python3 /opt/acme/inventory/collect.py --upload")
                times = sorted(t + rng.uniform(0, 300) + rng.uniform(0, 2) for _ in range(3))
                self.emit(h, inv, (IMDS, 80), pair(times) if h.cloud == "aws" else times,
                          "inventory", reqs=R.INVENTORY[h.cloud])

    def legacy_and_newcomers(self) -> None:
        """Callers a fixed path rule trips over, and a steady newcomer a model must learn:
        * yum's amazon-id plugin on every AWS node, daily, over IMDSv1 (a known agent);
        * a logging DaemonSet on an old aws-sdk-ruby fetching its role credentials over
          IMDSv1 every 15 minutes on every AWS node (legitimate, and exactly what a
          "credentials without the header" rule flags);
        * a nightly backup CronJob running the aws CLI (IMDSv2) on one AWS node;
        * from day ~9, a new cost agent on one AWS host calling every 30 minutes for the
          rest of the trace: benign, and new."""
        rng = self.rng
        aws = [h for h in self.hosts if h.cloud == "aws"]
        for h in aws:
            up = self.up(h)
            yum = self.daemon("yum", "/usr/bin/python2.7",
                              "/usr/bin/python2 /usr/bin/yum -q makecache fast")
            self.emit(h, yum, (IMDS, 80), pair(periodic(rng, up, self.end, DAY, 0.02), 0.05),
                      "yum-amazon-id", reqs=R.YUM)
            pod = self.kube_pod(h, "logging", "fluentd-cloudwatch",
                                "fluent/fluentd-kubernetes-daemonset:v1.16-debian-cloudwatch-1",
                                up)
            fd = Proc("ruby", "/usr/local/bin/ruby", "root", "0", "tini", "/usr/bin/tini",
                      "ruby /usr/local/bin/fluentd -c /fluentd/etc/fluent.conf", self.pid(),
                      self.pid())
            self.emit(h, fd, (IMDS, 80), pair(periodic(rng, up, self.end, 900), 0.01),
                      "fluentd-imdsv1", pod, reqs=R.FLUENTD_V1)
        h = rng.choice([h for h in aws if h.initial])
        for day in range(int((self.end - self.start) // DAY)):
            t = self.start + day * DAY + 1 * HOUR + rng.uniform(0, 300)
            pod = self.kube_pod(h, "backup", "nightly-backup", "amazon/aws-cli:2.15.30", t)
            cli = Proc("aws", "/usr/local/bin/aws", "root", "0", "sh", "/bin/sh",
                       "aws s3 sync /data s3://acme-prod-backups/nightly/", self.pid(),
                       self.pid())
            self.emit(h, cli, (IMDS, 80), pair([t, t + 0.5]), "backup-cli", pod,
                      reqs=R.BACKUP_CLI)
        h = rng.choice([h for h in aws if h.initial])
        t = self.start + 9 * DAY + rng.uniform(0, 6) * HOUR
        cost = self.daemon("cost-agent", "/usr/local/bin/cost-agent",
                           "/usr/local/bin/cost-agent --interval 30m", user="cost", uid="988")
        self.emit(h, cost, (IMDS, 80), pair(periodic(rng, t, self.end, 1800)),
                  "steady-newcomer-cost-agent", reqs=R.COST_AGENT)

    def operators(self) -> None:
        """People at work in week one: the aws CLI run by ec2-user from an ssh session."""
        rng = self.rng
        aws = [h for h in self.hosts if h.cloud == "aws" and h.initial]
        for _ in range(6):
            h = rng.choice(aws)
            t = self.start + rng.uniform(0.3, 6.5) * DAY
            sh = self.pid()
            proc = Proc("aws", "/usr/local/bin/aws", "ec2-user", "1000", "bash", "/usr/bin/bash",
                        "aws s3 ls s3://acme-prod-artifacts/releases/", self.pid(), sh)
            self.emit(h, proc, (IMDS, 80), pair([t, t + 0.3]), "operator-aws-cli",
                      reqs=R.OPERATOR_CLI)


def emit_requests(trace: Trace, host: Host, proc: Proc, dst: tuple[str, int],
                  times: list[float], truth: str, actor: str, pod: Pod | None,
                  reqs: tuple[Req, ...], transport: str = "tcp",
                  window: tuple[float, float] | None = None) -> None:
    """Write the calls at `times`, the i-th sending reqs[i % len(reqs)] (no request
    fields when `reqs` is empty); one shape per distinct request."""
    if not reqs:
        reqs = (None,)  # type: ignore[assignment]
    sids: dict[Req | None, int] = {}
    for r in reqs:
        if r not in sids:
            sids[r] = trace.add_shape(shape(host, proc, dst[0], dst[1], truth, actor, pod,
                                            transport, r))
    k = len(reqs)
    lo, hi = window if window is not None else (float("-inf"), float("inf"))
    for i, t in enumerate(times):
        if lo <= t < hi:
            trace.emit(t, sids[reqs[i % k]])
