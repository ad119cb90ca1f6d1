# Metadata addresses in this file are data (event fields, expected matches): nothing here
# connects to them. Real connections happen only inside a test's own network namespace
# (netns, tests/netns_fixtures.py).
"""The attack half of the scenario: the attack actors, spread over the second week.

Each actor is one intrusion: the same process on the same host, a handful of metadata
connections (or a beacon, or a burst). Their kinds follow what is seen in the wild:
web shells, interpreters in containers, masquerading binaries,
common tools run by an unusual user or parent, and the endpoints other than
169.254.169.254 (IPv6 IMDS, the AWS ECS task endpoint, EKS Pod Identity, Azure WireServer).
Several are built to be hard for a particular anchor: a common name (python3, node,
java) from an unusual parent defeats rarity by name; kube-system defeats Falco's default
exception; an executable already seen on the host defeats a new-terms rule.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from bench import http_requests as R
from bench.ecs import Host, Pod, Proc, Req, Trace, shape
from bench.fleet import APPS, DAY, HOUR, Fleet
from bench.timing import burst, pair, periodic

BASH = ("bash", "/usr/bin/bash")
SH = ("sh", "/bin/sh")


@dataclass
class Actor:
    """Ground truth for one attack actor."""

    id: str
    kind: str
    description: str
    host: str
    first_ts: float = 0.0
    last_ts: float = 0.0
    events: int = 0

    def as_dict(self) -> dict:
        return {"id": self.id, "truth": "attack", "kind": self.kind,
                "description": self.description, "host": self.host,
                "first_ts": self.first_ts, "last_ts": self.last_ts, "events": self.events}


KINDS = ("web_shell", "container_interpreter", "masquerade", "unusual_user_or_parent",
         "other_endpoint", "exfil_burst", "ssrf_legit_caller", "spray", "fresh_node")
N_SLOTS = 28  # actors placed at random times in week two (fresh-node ones follow a join)

CREDS_PATH = R.AWS_ROLE
GCP_TOKEN = "/computeMetadata/v1/instance/service-accounts/default/token"
AZ_TOKEN = "/metadata/identity/oauth2/token"


def get(path: str, ua: str | None, guarded: bool | None = False,
        query: str | None = None) -> Req:
    return Req("GET", path, query, ua, guarded)


class Attacks:
    """Places the actors on the fleet and writes their events."""

    def __init__(self, rng: random.Random, trace: Trace, fleet: Fleet) -> None:
        self.rng, self.trace, self.fleet = rng, trace, fleet
        self.actors: list[Actor] = []
        start = fleet.start
        # Start times: the second half (days 7.3-13.6 of two weeks), so every system has
        # a week of history first.
        days = (fleet.end - start) / DAY
        self._slots = sorted(start + rng.uniform(0.52, 0.97) * days * DAY
                             for _ in range(N_SLOTS))

    def _slot(self) -> float:
        return self._slots.pop(self.rng.randrange(len(self._slots)))

    def _hosts(self, cloud: str, joined_week_one: bool = False) -> list[Host]:
        f = self.fleet
        hosts = [h for h in f.hosts if h.cloud == cloud]
        if joined_week_one:
            early = [h for h in hosts if f.start < h.join_ts < f.start + 7 * DAY]
            if early:
                return early
        return [h for h in hosts if h.initial]

    def _web(self, cloud: str) -> tuple[Host, Pod]:
        return self.rng.choice(self.fleet.web_pods[cloud])

    def _app(self, name: str, at: float) -> tuple[Host, Pod]:
        """A pod of the app that is alive at time `at` (an attack needs a live pod)."""
        live = [(h, p) for h, p, a, b in self.fleet.pods[name] if a <= at < b]
        return self.rng.choice(live or [(h, p) for h, p, _, _ in self.fleet.pods[name]])

    def actor(self, aid: str, kind: str, desc: str, host: Host, proc: Proc,
              dsts: list[tuple[str, int]], times: list[float], pod: Pod | None = None,
              reqs: tuple[Req, ...] = ()) -> None:
        """The i-th call goes to dsts[i % len] and sends reqs[i % len] (the request it
        makes there; every attack call sends one)."""
        times = [t for t in times if t < self.fleet.end]
        if not times:
            return  # a short trace ends before this actor would start
        a = Actor(aid, kind, desc, host.name, min(times), max(times), len(times))
        self.actors.append(a)
        calls = [(dsts[i % len(dsts)], reqs[i % len(reqs)] if reqs else None)
                 for i in range(max(len(dsts), len(reqs)))]
        sids = {}
        for (ip, port), r in calls:
            if ((ip, port), r) not in sids:
                sids[((ip, port), r)] = self.trace.add_shape(
                    shape(host, proc, ip, port, "attack", aid, pod, request=r))
        for i, t in enumerate(times):
            self.trace.emit(t, sids[calls[i % len(calls)]])

    def proc(self, name: str, exe: str, user: str, uid: str, parent: tuple[str, str],
             cmd: str) -> Proc:
        return Proc(name, exe, user, uid, parent[0], parent[1], cmd, self.fleet.pid(),
                    self.fleet.pid())

    def few(self, t: float, n: int, spread: float = 120.0) -> list[float]:
        return burst(self.rng, t, n, spread)

    # ------------------------------------------------------------------------------
    def generate(self) -> list[Actor]:
        rng = self.rng
        imds = ("169.254.169.254", 80)
        creds = "http://169.254.169.254/latest/meta-data/iam/security-credentials/"

        # Web shells: curl/wget as www-data spawned by the web server.
        h, pod = self._web("aws")
        self.actor("web-shell-phpfpm-curl", "web_shell",
                   "curl as www-data from php-fpm in the aws web frontend",
                   h, self.proc("curl", "/usr/bin/curl", "www-data", "33",
                                ("php-fpm8.2", "/usr/sbin/php-fpm8.2"), f"curl -s {creds}"),
                   [imds], self.few(self._slot(), 3), pod,
                   (get(CREDS_PATH, "curl/7.88.1"),
                    get(CREDS_PATH + R.NODE_ROLE, "curl/7.88.1")))
        h, pod = self._web("gcp")
        self.actor("web-shell-apache-wget", "web_shell",
                   "wget as www-data from apache2 in the gcp storefront",
                   h, self.proc("wget", "/usr/bin/wget", "www-data", "33",
                                ("apache2", "/usr/sbin/apache2"),
                                "wget -qO- --header=Metadata-Flavor: Google http://169.254."
                                "169.254/computeMetadata/v1/instance/service-accounts/default"
                                "/token"), [imds], self.few(self._slot(), 2), pod,
                   (get(GCP_TOKEN, "Wget/1.21.3", True),))
        h = rng.choice(self._hosts("azure"))
        self.actor("web-shell-nginx-curl-host", "web_shell",
                   "curl as www-data from php-fpm on an azure node (host web server)",
                   h, self.proc("curl", "/usr/bin/curl", "www-data", "33",
                                ("php-fpm7.4", "/usr/sbin/php-fpm7.4"),
                                "curl -s -H Metadata:true http://169.254.169.254/metadata/"
                                "identity/oauth2/token?api-version=2018-02-01&resource="
                                "https://management.azure.com/"), [imds],
                   self.few(self._slot(), 3), reqs=(get(
                       AZ_TOKEN, "curl/7.81.0", True,
                       "api-version=2018-02-01&resource=https://management.azure.com/"),))

        # Interpreters in containers whose image never called the metadata service.
        h, pod = self._web("aws")
        self.actor("container-python-c", "container_interpreter",
                   "python3 -c in the aws web frontend (image never called IMDS)",
                   h, self.proc("python3", "/usr/bin/python3.11", "nginx", "101", SH,
                                "python3 -c import urllib.request as u;print(u.urlopen("
                                f"'{creds}').read())"), [imds], self.few(self._slot(), 2), pod,
                   (get(CREDS_PATH, "Python-urllib/3.11"),))
        h, pod = self._web("gcp")
        self.actor("container-perl", "container_interpreter",
                   "perl socket one-liner in the gcp storefront",
                   h, self.proc("perl", "/usr/bin/perl", "nginx", "101", SH,
                                "perl -MIO::Socket::INET -e $s=IO::Socket::INET->new("
                                "'169.254.169.254:80');print $s 'GET /computeMetadata/v1/'"),
                   [imds], self.few(self._slot(), 2), pod, (get("/computeMetadata/v1/", None),))
        h, pod = self._web("azure")
        self.actor("container-bash-devtcp", "container_interpreter",
                   "bash /dev/tcp in the azure portal container",
                   h, self.proc("bash", "/bin/bash", "nginx", "101", SH,
                                "bash -c exec 3<>/dev/tcp/169.254.169.254/80;echo -e 'GET "
                                "/metadata/instance?api-version=2021-02-01 HTTP/1.0' >&3"),
                   [imds], self.few(self._slot(), 2), pod,
                   (get("/metadata/instance", None, False, R.AZ_API),))
        t = self._slot()
        h, pod = self._app("checkout-web", t)
        self.actor("container-node-e", "container_interpreter",
                   "node -e from a shell in the checkout pod (node calls IMDS there, but "
                   "never from sh)",
                   h, self.proc("node", "/usr/local/bin/node", "node", "1000", SH,
                                "node -e require('http').get('http://169.254.169.254/"
                                "computeMetadata/v1/instance/service-accounts/default/token')"),
                   [imds], self.few(t, 3), pod, (get(GCP_TOKEN, None),))

        # Masquerading: a well-known agent's name from a writable directory.
        h = rng.choice(self._hosts("aws"))
        t = self._slot()
        self.actor("masq-ssm-agent-tmp", "masquerade",
                   "amazon-ssm-agent from /tmp beaconing every 5 minutes for an hour",
                   h, self.proc("amazon-ssm-agent", "/tmp/.ssm/amazon-ssm-agent", "root", "0",
                                BASH, "/tmp/.ssm/amazon-ssm-agent"), [imds],
                   pair(periodic(rng, t, t + HOUR, 300, 0.05)), reqs=R.SSM)
        h = rng.choice(self._hosts("gcp"))
        t = self._slot()
        self.actor("masq-kubelet-devshm", "masquerade",
                   "kubelet from /dev/shm started by a systemd unit, every 10 minutes",
                   h, self.proc("kubelet", "/dev/shm/kubelet", "root", "0",
                                ("systemd", "/usr/lib/systemd/systemd"), "/dev/shm/kubelet"),
                   [imds], periodic(rng, t, t + 3 * HOUR, 600, 0.05),
                   reqs=(get(GCP_TOKEN, R.GO_HTTP, True),))
        t = self._slot()
        h, pod = self._app("orders-worker", t)
        self.actor("masq-aws-k8s-agent-pod", "masquerade",
                   "aws-k8s-agent from /var/tmp inside an orders-worker pod",
                   h, self.proc("aws-k8s-agent", "/var/tmp/aws-k8s-agent", "root", "0", SH,
                                "/var/tmp/aws-k8s-agent"), [imds],
                   self.few(t, 4, 600), pod, R.VPC_CNI[-2:])
        h = rng.choice(self._hosts("azure"))
        self.actor("masq-waagent-wireserver", "masquerade",
                   "a native binary named waagent from /var/tmp to WireServer and IMDS",
                   h, self.proc("waagent", "/var/tmp/waagent", "root", "0", BASH,
                                "/var/tmp/waagent -collect"),
                   [("168.63.129.16", 32526), imds], self.few(self._slot(), 4),
                   reqs=(Req("GET", "/vmSettings", ua=R.WALA, guarded=None),
                         get(AZ_TOKEN, R.WALA, True,
                             "api-version=2018-02-01&resource=https://vault.azure.net")))

        # Common tools run by an unusual user or parent.
        h = rng.choice(self._hosts("aws", joined_week_one=True))
        self.actor("curl-ec2-user-ssh", "unusual_user_or_parent",
                   "curl by ec2-user from an ssh shell (curl only ever ran from user-data)",
                   h, self.proc("curl", "/usr/bin/curl", "ec2-user", "1000", BASH,
                                "curl -s -H X-aws-ec2-metadata-token: AQAEAStolenTok3n== "
                                f"{creds}node-role"), [imds], self.few(self._slot(), 4),
                   reqs=R.v2("curl/8.3.0", CREDS_PATH + R.NODE_ROLE))
        h = rng.choice(self._hosts("gcp", joined_week_one=True))
        self.actor("curl-ubuntu-ssh", "unusual_user_or_parent",
                   "curl by ubuntu from an ssh shell on a gke node",
                   h, self.proc("curl", "/usr/bin/curl", "ubuntu", "1000", BASH,
                                "curl -s -H Metadata-Flavor: Google http://169.254.169.254/"
                                "computeMetadata/v1/instance/service-accounts/default/token"),
                   [imds], self.few(self._slot(), 2), reqs=(get(GCP_TOKEN, "curl/7.81.0", True),))
        h = rng.choice(self._hosts("aws"))
        t = self._slot()
        self.actor("aws-cli-cron", "unusual_user_or_parent",
                   "aws CLI run by root from cron every hour (operators run it from bash)",
                   h, self.proc("aws", "/usr/local/bin/aws", "root", "0",
                                ("cron", "/usr/sbin/cron"),
                                "aws sts get-caller-identity --output text"), [imds],
                   [x for s in periodic(rng, t, t + 8 * HOUR, HOUR, 0.01)
                    for x in (s, s + 0.25)], reqs=R.v2(R.AWS_CLI, CREDS_PATH + R.NODE_ROLE))
        h = rng.choice(self._hosts("azure"))
        self.actor("python3-exfil-burst", "exfil_burst",
                   "python3 from an ssh shell fetching tokens in a burst (python3 as root is "
                   "the waagent extension handler on every azure node)",
                   h, self.proc("python3", "/usr/bin/python3.10", "root", "0", BASH,
                                "python3 /root/.cache/t.py"), [imds],
                   burst(rng, self._slot(), 80, 40.0), reqs=tuple(
                       get(AZ_TOKEN, "python-requests/2.31.0", True,
                           f"api-version=2018-02-01&resource=https://{r}/")
                       for r in ("management.azure.com", "vault.azure.net",
                                 "storage.azure.com", "graph.microsoft.com")))

        # Endpoints other than 169.254.169.254.
        h, pod = self._web("aws")
        self.actor("ipv6-imds-curl", "other_endpoint",
                   "curl to the IPv6 IMDS address from the aws web frontend",
                   h, self.proc("curl", "/usr/bin/curl", "nginx", "101", SH,
                                "curl -6 -s http://[fd00:ec2::254]/latest/meta-data/"
                                "iam/security-credentials/"),
                   [("fd00:ec2::254", 80)], self.few(self._slot(), 3), pod,
                   (get(CREDS_PATH, "curl/7.88.1"),))
        h, pod = self._web("aws")
        self.actor("ecs-endpoint-wget", "other_endpoint",
                   "wget to the AWS ECS task credentials endpoint from a pod",
                   h, self.proc("wget", "/usr/bin/wget", "nginx", "101", SH,
                                "wget -qO- http://169.254.170.2/v2/credentials/"
                                "3c3b9e0e-6a4b-4cf4-9a9e-1e7b0f0f6a11"),
                   [("169.254.170.2", 80)], self.few(self._slot(), 2), pod,
                   (get("/v2/credentials/3c3b9e0e-6a4b-4cf4-9a9e-1e7b0f0f6a11",
                        "Wget/1.21.3"),))
        t = self._slot()
        h, pod = self._app("orders-worker", t)
        self.actor("eks-pod-identity-python", "other_endpoint",
                   "python3 from sh in an orders-worker pod to EKS Pod Identity",
                   h, self.proc("python3", "/usr/local/bin/python3.11", "root", "0", SH,
                                "python3 -c import os,urllib.request as u;print(u.urlopen("
                                "'http://169.254.170.23/v1/credentials').read())"),
                   [("169.254.170.23", 80)], self.few(t, 2), pod,
                   (get("/v1/credentials", "Python-urllib/3.11"),))
        h = rng.choice(self._hosts("aws"))
        pod = Pod("kube-system", "aws-node-x7kq2", "602401143452.dkr.ecr.us-east-1.amazonaws"
                  ".com/amazon-k8s-cni:v1.18.1", f"{rng.getrandbits(256):064x}")
        self.actor("kube-system-nc", "container_interpreter",
                   "nc to IMDS from a shell in a kube-system pod (Falco's default exception)",
                   h, self.proc("nc", "/usr/bin/nc", "root", "0", SH,
                                "nc 169.254.169.254 80"), [imds], self.few(self._slot(), 2), pod,
                   (get("/latest/meta-data/", None),))
        h = rng.choice(self._hosts("azure"))
        self.actor("wireserver-certs-curl", "other_endpoint",
                   "curl by azureuser to WireServer certificates and HostGAPlugin vmSettings",
                   h, self.proc("curl", "/usr/bin/curl", "azureuser", "1000", BASH,
                                "curl -s http://168.63.129.16/machine/?comp=certificates"),
                   [("168.63.129.16", 80), ("168.63.129.16", 32526)],
                   self.few(self._slot(), 3),
                   reqs=(get("/machine/", "curl/7.81.0", None, "comp=certificates"),
                         Req("GET", "/vmSettings", ua="curl/7.81.0", guarded=None)))
        self.ssrf()
        self.sprays()
        self.fresh_nodes()
        return self.actors

    # -- SSRF through legitimate callers (a name-rarity model cannot see it), all clouds --
    def ssrf(self) -> None:
        rng, f = self.rng, self.fleet
        app = {a.name: a for a in APPS}

        def app_proc(name: str) -> Proc:
            a = app[name]
            return Proc(a.proc, a.exe, a.user, a.uid, "containerd-shim",
                        "/usr/bin/containerd-shim-runc-v2", a.cmd, f.pid(), f.pid())

        t = self._slot()
        h, pod = self._app("storefront", t)
        self.actor("ssrf-storefront-role-creds", "ssrf_legit_caller",
                   "the aws storefront (IMDSv2 for its region every 15 min) made to fetch its "
                   "role's credentials without a token through an image-fetch SSRF",
                   h, app_proc("storefront"), [("169.254.169.254", 80)], self.few(t, 2), pod,
                   (get(CREDS_PATH, "python-requests/2.31.0"),
                    get(CREDS_PATH + R.NODE_ROLE, "python-requests/2.31.0")))
        t = self._slot()
        h, pod = self._app("checkout-web", t)
        self.actor("ssrf-checkout-token-no-flavor", "ssrf_legit_caller",
                   "the gcp checkout app (node) asking for a token without Metadata-Flavor "
                   "through a webhook SSRF",
                   h, app_proc("checkout-web"), [("169.254.169.254", 80)], self.few(t, 2), pod,
                   (get(GCP_TOKEN, "node-fetch/1.0 (+https://github.com/bitinn/node-fetch)"),))
        t = self._slot()
        h = rng.choice(self._hosts("azure"))
        ext = Proc("python3", "/usr/bin/python3.10", "root", "0", "waagent",
                   "/usr/bin/python3.10",
                   "python3 -u bin/WALinuxAgent-2.11.1.4-py3.8.egg -run-exthandlers",
                   f.pid(), f.pid())
        self.actor("ssrf-waagent-python3-mi-token", "ssrf_legit_caller",
                   "the Azure agent's own python3 (extension handler) asking IMDS for a "
                   "managed-identity token, with Metadata: true",
                   h, ext, [("169.254.169.254", 80)], self.few(t, 2),
                   reqs=(get(AZ_TOKEN, R.WALA, True,
                             "api-version=2018-02-01&resource=https://management.azure.com/"),))
        t = self._slot()
        h = rng.choice(self._hosts("aws"))
        fb = Proc("fluent-bit", "/fluent-bit/bin/fluent-bit", "root", "0", "containerd-shim",
                  "/usr/bin/containerd-shim-runc-v2",
                  "/fluent-bit/bin/fluent-bit -c /fluent-bit/etc/fluent-bit.conf",
                  f.pid(), f.pid())
        fb_pod = Pod("logging", "fluent-bit-q8x2m", "cr.fluentbit.io/fluent/fluent-bit:3.0.4",
                     f"{rng.getrandbits(256):064x}")
        self.actor("monitoring-agent-node-creds", "ssrf_legit_caller",
                   "the fluent-bit log agent (instance id hourly) fetching the node role's "
                   "credentials with IMDSv2 (a malicious output plugin)",
                   h, fb, [("169.254.169.254", 80)], pair(self.few(t, 2)), fb_pod,
                   R.v2("Fluent-Bit", CREDS_PATH + R.NODE_ROLE))
        t = self._slot()
        # On the node where the fleet runs the nightly backup (found by its events).
        h = next(h for h in f.hosts if h.cloud == "aws" and h.initial)
        for doc in self.trace.shape_docs:
            if doc["labels"]["imdswatch_actor"] == "benign/backup-cli":
                h = next(x for x in f.hosts if x.name == doc["host"]["name"])
                break
        cli = Proc("aws", "/usr/local/bin/aws", "root", "0", "sh", "/bin/sh",
                   "aws s3 sync /data s3://acme-prod-backups/nightly/", f.pid(), f.pid())
        pod = Pod("backup", "nightly-backup-x1", "amazon/aws-cli:2.15.30",
                  f"{rng.getrandbits(256):064x}")
        self.actor("backup-cli-imdsv1-fallback", "ssrf_legit_caller",
                   "the nightly backup job's aws CLI falling back to IMDSv1 for the role's "
                   "credentials (token PUT blocked: an attacker-set hop limit or proxy)",
                   h, cli, [("169.254.169.254", 80)], self.few(t, 2, 5), pod,
                   (get(CREDS_PATH, R.AWS_CLI), get(CREDS_PATH + R.NODE_ROLE, R.AWS_CLI)))

    # -- sprays: throwaway names to blind the model, then a real attack later -------------
    def sprays(self) -> None:
        rng, f = self.rng, self.fleet
        t = self._slot()
        h, pod = self._web("aws")
        a = Actor("name-spray-devshm", "spray",
                  "40 throwaway process names from /dev/shm in the aws web frontend, one "
                  "unguarded credential request each, within a minute", h.name)
        times = [x for x in burst(rng, t, 40, 60.0) if x < f.end]
        a.first_ts, a.last_ts, a.events = times[0], times[-1], len(times)
        self.actors.append(a)
        for k, ts in enumerate(times):
            name = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789")
                           for _ in range(rng.randint(4, 12)))
            proc = Proc(name, f"/dev/shm/.{k}/{name}", "nginx", "101", "sh", "/bin/sh",
                        f"/dev/shm/.{k}/{name}", f.pid(), f.pid())
            sid = self.trace.add_shape(shape(h, proc, "169.254.169.254", 80, "attack", a.id,
                                             pod, request=get(CREDS_PATH, None)))
            self.trace.emit(ts, sid)
        h2, pod2 = self._web("gcp")
        self.actor("after-spray-curl", "spray",
                   "curl in the gcp storefront three hours after the spray, with the "
                   "Metadata-Flavor header (rarity alone must catch it)",
                   h2, self.proc("curl", "/usr/bin/curl", "nginx", "101", SH,
                                 "curl -s -H Metadata-Flavor:Google http://169.254.169.254/"
                                 "computeMetadata/v1/project/project-id"),
                   [("169.254.169.254", 80)], self.few(t + 3 * HOUR, 2), pod2,
                   (get("/computeMetadata/v1/project/project-id", "curl/7.88.1", True),))

    # -- attacks on nodes that joined minutes ago ------------------------------------------
    def fresh_nodes(self) -> None:
        rng, f = self.rng, self.fleet
        for cloud in ("aws", "gcp"):
            late = max((h for h in f.hosts if h.cloud == cloud), key=lambda h: h.join_ts)
            t = late.join_ts + rng.uniform(5, 12) * 60
            if cloud == "aws":
                pod = Pod("default", "debug-7f9c", "docker.io/library/python:3.12-slim",
                          f"{rng.getrandbits(256):064x}")
                self.actor("fresh-node-aws-debug-pod", "fresh_node",
                           "python3 in a debug pod on an aws node that joined minutes ago, "
                           "credentials without a token",
                           late, self.proc("python3", "/usr/local/bin/python3.12", "root",
                                           "0", SH, "python3 /tmp/x.py"),
                           [("169.254.169.254", 80)], self.few(t, 2), pod,
                           (get(CREDS_PATH, "python-requests/2.31.0"),
                            get(CREDS_PATH + R.NODE_ROLE, "python-requests/2.31.0")))
            else:
                self.actor("fresh-node-gcp-curl-token", "fresh_node",
                           "curl by root from an interactive shell on a gke node that joined "
                           "minutes ago, token with Metadata-Flavor",
                           late, self.proc("curl", "/usr/bin/curl", "root", "0", BASH,
                                           "curl -s -H Metadata-Flavor:Google http://metadata"
                                           ".google.internal/computeMetadata/v1/instance/"
                                           "service-accounts/default/token"),
                           [("169.254.169.254", 80)], self.few(t, 2),
                           reqs=(get(GCP_TOKEN, "curl/7.88.1", True),))
