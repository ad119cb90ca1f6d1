# Metadata paths in this file are data (event fields): nothing here connects anywhere.
"""The HTTP requests each caller of the scenario sends, modelled on the real agents:
their paths, the anti-SSRF header they send (IMDSv2 token, `Metadata-Flavor: Google`,
`Metadata: true`, the Pod Identity `Authorization`) and their User-Agent strings as the
vendors' SDKs build them. A sequence is cycled over a caller's calls: IMDSv2 callers
alternate the token PUT and the GET (their connection times come in pairs).
"""

from __future__ import annotations

from bench.ecs import Req

AWS_TOKEN = "/latest/api/token"
AWS_ROLE = "/latest/meta-data/iam/security-credentials/"
NODE_ROLE = "eks-prod-use1-node-role"
AZ_API = "api-version=2021-02-01"


def v2(ua: str, *paths: str) -> tuple[Req, ...]:
    """IMDSv2: a PUT for the session token, then a GET with it, for each path."""
    out: list[Req] = []
    for p in paths:
        out += [Req("PUT", AWS_TOKEN, ua=ua), Req("GET", p, ua=ua)]
    return tuple(out)


def v1(ua: str, *paths: str) -> tuple[Req, ...]:
    """IMDSv1: plain GETs without a token (old SDKs, yum's plugin)."""
    return tuple(Req("GET", p, ua=ua, guarded=False) for p in paths)


def gcp(ua: str, *paths: str, query: str | None = None) -> tuple[Req, ...]:
    return tuple(Req("GET", "/computeMetadata/v1/" + p, query, ua) for p in paths)


def azure(ua: str, *paths: str, query: str = AZ_API) -> tuple[Req, ...]:
    return tuple(Req("GET", "/metadata/" + p, query, ua) for p in paths)


def wireserver(ua: str, *queries: str) -> tuple[Req, ...]:
    # WireServer has no anti-SSRF header to send: guarded is not reported.
    return tuple(Req("GET", "/machine/", q, ua, None) for q in queries)


GO_SDK_V1 = "aws-sdk-go/1.50.8 (go1.21.6; linux; amd64)"
GO_SDK_V2 = ("aws-sdk-go-v2/1.25.2 os/linux lang/go#1.21.6 md/GOOS#linux md/GOARCH#amd64 "
             "api/imds#1.15.2")
GO_HTTP = "Go-http-client/1.1"
BOTO = "Boto3/1.34.69 md/Botocore#1.34.69 ua/2.0 os/linux#6.1.79 md/arch#x86_64 lang/python#3.11.8"
AWS_CLI = ("aws-cli/2.15.30 md/awscrt#0.19.19 ua/2.0 os/linux#6.1.79 md/arch#x86_64 "
           "lang/python#3.11.8")
JAVA_SDK = "aws-sdk-java/2.25.16 Linux/6.1.79 OpenJDK_64-Bit_Server_VM/17.0.10+7-LTS"
CLOUD_INIT = "Cloud-Init/23.4.4"
CURL = "curl/8.5.0"
WALA = "WALinuxAgent/2.11.1.4"

CLOUD_INIT_REQS = {
    "aws": v2(CLOUD_INIT, "/latest/meta-data/instance-id", "/latest/user-data",
              "/latest/dynamic/instance-identity/document", "/latest/meta-data/local-ipv4"),
    "gcp": gcp(CLOUD_INIT, "instance/attributes/user-data", "instance/hostname",
               "instance/network-interfaces/0/ip"),
    "azure": azure(CLOUD_INIT, "instance", "instance/compute/userData"),
}
USER_DATA_CURL_TOKEN = Req("PUT", AWS_TOKEN, ua="curl/8.3.0")
USER_DATA_CURL_GET = Req("GET", "/latest/meta-data/instance-id", ua="curl/8.3.0")
NODEADM = v2(GO_SDK_V2, "/latest/meta-data/instance-id", "/latest/meta-data/instance-type",
             "/latest/meta-data/placement/region", "/latest/meta-data/mac")
GCE_STARTUP = gcp(GO_HTTP, "instance/attributes/startup-script", "instance/attributes/")
GKE_CONFIGURE = gcp("curl/7.88.1", "instance/attributes/kube-env")
WAAGENT_BOOT = wireserver(WALA, "comp=versions", "comp=goalstate", "comp=certificates")

SSM = v2(GO_SDK_V1, "/latest/meta-data/instance-id", "/latest/meta-data/placement/region",
         AWS_ROLE + NODE_ROLE)
SSM_WORKER = v2(GO_SDK_V1, AWS_ROLE + NODE_ROLE, "/latest/meta-data/instance-id")
KUBELET_AWS = v2(GO_SDK_V1, "/latest/meta-data/instance-type",
                 "/latest/meta-data/local-ipv4", "/latest/meta-data/mac")
ECR_PROVIDER = v2(GO_SDK_V2, AWS_ROLE + NODE_ROLE)
VPC_CNI = v2(GO_SDK_V1 + " amazon-vpc-cni-k8s/cni-v1.18.1",
             "/latest/meta-data/mac",
             "/latest/meta-data/network/interfaces/macs/0e:5f:1a:2b:3c:4d/local-ipv4s",
             AWS_ROLE + NODE_ROLE)
EBS_CSI = v2(GO_SDK_V2, "/latest/meta-data/placement/availability-zone",
             "/latest/meta-data/instance-id")
GUEST_AGENT = gcp(GO_HTTP, "", query="recursive=true&alt=json&wait_for_change=true&timeout=60")
OSCONFIG = gcp(GO_HTTP, "instance/service-accounts/default/token", "project/project-id")
KUBELET_GCP = gcp(GO_HTTP, "instance/zone", "instance/machine-type")
GKE_METADATA_SERVER = gcp(GO_HTTP, "instance/service-accounts/default/token",
                          "instance/service-accounts/default/identity",
                          "project/numeric-project-id")
GKE_MDS_PROBE = (Req("GET", "/healthz", ua="kube-probe/1.29", guarded=None),)
# The agent re-reads the tenant certificates with each goal state it processes.
WAAGENT_WIRE = wireserver(WALA, "comp=goalstate", "comp=health", "comp=goalstate",
                          "comp=certificates")
WAAGENT_IMDS = azure(WALA, "instance")
EXTHANDLER_HOSTGA = (Req("GET", "/vmSettings", ua=WALA, guarded=None),)
EXTHANDLER_WIRE = wireserver(WALA, "comp=goalstate",
                             "comp=config&type=extensionsConfig&incarnation=3")
AZURE_CNS = azure(GO_HTTP, "instance/network", "instance/compute")
KUBELET_AZURE = azure(GO_HTTP, "instance/compute")
FLUENT_BIT = {
    "aws": v2("Fluent-Bit", "/latest/meta-data/instance-id"),
    "gcp": gcp("Fluent-Bit", "instance/id", "instance/zone"),
    "azure": azure("Fluent-Bit", "instance/compute"),
}
OTEL = {
    "aws": v2(GO_SDK_V1, "/latest/dynamic/instance-identity/document",
              "/latest/meta-data/hostname"),
    "gcp": gcp(GO_HTTP, "instance/id", "project/project-id", "instance/zone"),
    "azure": azure(GO_HTTP, "instance/compute"),
}
INVENTORY = {
    "aws": v2("Python-urllib/3.11", "/latest/meta-data/instance-id",
              "/latest/meta-data/instance-type"),
    "gcp": gcp("Python-urllib/3.11", "instance/id", "instance/machine-type"),
    "azure": azure("Python-urllib/3.11", "instance"),
}
VELERO = v2(GO_SDK_V1 + " velero/v1.13.0", AWS_ROLE + NODE_ROLE)
OPERATOR_CLI = v2(AWS_CLI, AWS_ROLE + NODE_ROLE)
# yum's amazon-id plugin reads the identity document over IMDSv1 to pick mirrors.
YUM = v1("urlgrabber/3.10 yum/3.4.3", "/latest/dynamic/instance-identity/document",
         "/latest/dynamic/instance-identity/signature")
# A logging DaemonSet built on an old aws-sdk-ruby: IMDSv1 for its role credentials.
FLUENTD_V1 = v1("aws-sdk-ruby2/2.11.632 ruby/2.7.8 x86_64-linux", AWS_ROLE,
                AWS_ROLE + NODE_ROLE)
BACKUP_CLI = v2(AWS_CLI, AWS_ROLE + NODE_ROLE)
COST_AGENT = v2(GO_SDK_V2, "/latest/meta-data/instance-type",
                "/latest/meta-data/placement/availability-zone")

APP_REQS = {
    "payments-api": (Req("GET", "/v1/credentials", ua=JAVA_SDK),),  # EKS Pod Identity
    "orders-worker": v2(BOTO, AWS_ROLE + NODE_ROLE),
    "storefront": v2(BOTO, "/latest/meta-data/placement/region"),
    "recommender": gcp("google-auth/2.29.0 python/3.11.8",
                       "instance/service-accounts/default/token"),
    "checkout-web": gcp("google-api-nodejs-client/9.7.0 gccl/7.0.0",
                        "instance/service-accounts/default/token", "project/project-id"),
    "billing-svc": azure("azsdk-java-azure-identity/1.12.0 (17.0.10; Linux; 6.1.79)",
                         "identity/oauth2/token",
                         query="api-version=2018-02-01&resource=https://vault.azure.net"),
    "reporting": azure("azsdk-python-identity/1.16.0 Python/3.12.2 (Linux-6.1.79-x86_64)",
                       "identity/oauth2/token",
                       query="api-version=2018-02-01&resource=https://storage.azure.com/"),
}
