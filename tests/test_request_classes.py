# Metadata addresses here are event data only; nothing connects to them, so no netns is needed.
# Metadata addresses in this file are data (event fields, expected matches): nothing here
# connects to them.
"""Request classes per provider (scoring.endpoints.classify_request): a pure, total
function of (endpoint, method, path, query)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scoring.endpoints import (
    BUILTIN_ENDPOINTS,
    REQUEST_CLASSES,
    EndpointCatalog,
    classify_request,
    normalize_path,
)

CAT = EndpointCatalog.from_config()
IMDS = CAT.match("169.254.169.254", 80)
IMDS6 = CAT.match("fd00:ec2::254", 80)
ECS = CAT.match("169.254.170.2", 80)
EKS = CAT.match("169.254.170.23", 80)
EKS6 = CAT.match("fd00:ec2::23", 80)
GKE = CAT.match("169.254.169.252", 988)
WIRE = CAT.match("168.63.129.16", 80)
HOSTGA = CAT.match("168.63.129.16", 32526)
ALI = CAT.match("100.100.100.200", 80)
OCI6 = CAT.match("fd00:c1::a9fe:a9fe", 80)
AKAMAI = CAT.match("fd00:a9fe:a9fe::1", 80)

CASES = [
    # AWS IMDS, v1 and v2 paths
    (IMDS, "PUT", "/latest/api/token", None, "session"),
    (IMDS6, "PUT", "/latest/api/token", None, "session"),
    (IMDS, "GET", "/latest/api/token", None, "other"),
    (IMDS, "GET", "/latest/meta-data/iam/security-credentials/", None, "credentials"),
    (IMDS, "GET", "/latest/meta-data/iam/security-credentials/node-role", None, "credentials"),
    (IMDS6, "GET", "/latest/meta-data/iam/security-credentials/r", None, "credentials"),
    (IMDS, "GET", "/latest/meta-data/identity-credentials/ec2/security-credentials/"
     "ec2-instance", None, "credentials"),
    (IMDS, "GET", "/latest/meta-data/iam/info", None, "metadata"),
    (IMDS, "GET", "/latest/dynamic/instance-identity/document", None, "identity"),
    (IMDS, "GET", "/latest/dynamic/instance-identity/signature", None, "identity"),
    (IMDS, "GET", "/latest/dynamic/instance-identity/pkcs7", None, "identity"),
    (IMDS, "GET", "/latest/user-data", None, "user-data"),
    (IMDS, "GET", "/latest/meta-data/instance-id", None, "metadata"),
    (IMDS, "GET", "/latest/meta-data/placement/region", None, "metadata"),
    (IMDS, "GET", "/2021-07-15/meta-data/local-ipv4", None, "metadata"),
    (IMDS, "GET", "/", None, "metadata"),
    (IMDS, "GET", "/favicon.ico", None, "other"),
    (IMDS, "GET", "/latest/nonsense", None, "other"),
    # ECS task credentials and metadata, EKS Pod Identity
    (ECS, "GET", "/v2/credentials/3c3b9e0e-6a4b-4cf4-9a9e-1e7b0f0f6a11", None, "credentials"),
    (ECS, "GET", "/v4/0123abcd/task", None, "metadata"),
    (ECS, "GET", "/v2/metadata", None, "metadata"),
    (EKS, "GET", "/v1/credentials", None, "credentials"),
    (EKS6, "GET", "/v1/credentials", None, "credentials"),
    # GCP and the GKE metadata server
    (IMDS, "GET", "/computeMetadata/v1/instance/service-accounts/default/token", None, "token"),
    (GKE, "GET", "/computeMetadata/v1/instance/service-accounts/sa@p.iam.gserviceaccount.com"
     "/token", "scopes=x", "token"),
    (IMDS, "GET", "/computeMetadata/v1/instance/service-accounts/default/identity",
     "audience=https://vault", "identity"),
    (IMDS, "GET", "/computeMetadata/v1/instance/service-accounts/default/email", None,
     "metadata"),
    (IMDS, "GET", "/computeMetadata/v1/instance/attributes/kube-env", None, "user-data"),
    (IMDS, "GET", "/computeMetadata/v1/instance/attributes/startup-script", None, "user-data"),
    (IMDS, "GET", "/computeMetadata/v1/instance/attributes/cluster-name", None, "metadata"),
    (IMDS, "GET", "/computeMetadata/v1/instance/zone", None, "metadata"),
    (IMDS, "GET", "/computeMetadata/v1/", "recursive=true", "metadata"),
    # Azure IMDS and WireServer
    (IMDS, "GET", "/metadata/identity/oauth2/token",
     "api-version=2018-02-01&resource=https://management.azure.com/", "token"),
    (IMDS, "GET", "/metadata/instance", "api-version=2021-02-01", "metadata"),
    (IMDS, "GET", "/metadata/instance/compute/userData", "api-version=2021-01-01", "user-data"),
    (IMDS, "GET", "/metadata/attested/document", "api-version=2020-09-01", "identity"),
    (IMDS, "GET", "/metadata/scheduledevents", "api-version=2020-07-01", "metadata"),
    (WIRE, "GET", "/machine/", "comp=certificates", "credentials"),
    (WIRE, "GET", "/machine/?comp=certificates", None, "credentials"),
    (WIRE, "GET", "/machine/", "comp=goalstate", "metadata"),
    (WIRE, "GET", "/machine/", "comp=config&type=extensionsConfig&incarnation=2", "user-data"),
    (HOSTGA, "GET", "/vmSettings", None, "user-data"),
    # Alibaba, OCI, Akamai
    (ALI, "GET", "/latest/meta-data/ram/security-credentials/EcsRole", None, "credentials"),
    (ALI, "PUT", "/latest/api/token", None, "session"),
    (ALI, "GET", "/latest/dynamic/instance-identity/pkcs7", None, "identity"),
    (ALI, "GET", "/latest/user-data", None, "user-data"),
    (OCI6, "GET", "/opc/v2/identity/key.pem", None, "credentials"),
    (OCI6, "GET", "/opc/v2/instance/", None, "metadata"),
    (AKAMAI, "PUT", "/v1/token", None, "session"),
    (AKAMAI, "GET", "/v1/user-data", None, "user-data"),
    # an unknown or custom endpoint: every provider's layout applies
    (None, "GET", "/latest/meta-data/iam/security-credentials/x", None, "credentials"),
    (None, "GET", "/metadata/identity/oauth2/token", None, "token"),
    (None, "GET", None, None, "other"),
]


@pytest.mark.parametrize(("endpoint", "method", "path", "query", "cls"), CASES)
def test_classes(endpoint, method, path, query, cls):
    assert classify_request(endpoint, method, path, query) == cls


# An SSRF payload or a hand-written request must not leave its class by spelling.
@pytest.mark.parametrize("path", [
    "/latest//meta-data/iam/security-credentials/r",
    "/latest/meta-data/./iam/security-credentials/r",
    "/latest/meta-data/x/../iam/security-credentials/r",
    "/latest/meta-data/iam/%73ecurity-credentials/r",
    "/latest/meta-data/iam/%2573ecurity-credentials/r",  # double encoding
    "/LATEST/META-DATA/IAM/SECURITY-CREDENTIALS/R",
    "http://169.254.169.254/latest/meta-data/iam/security-credentials/r",  # proxy form
    "/latest/meta-data/iam/security-credentials/r#frag",
    "/latest/meta-data/iam/security-credentials/r?x=1",
    "/../../latest/meta-data/iam/security-credentials/",
])
def test_evasive_spellings_keep_their_class(path):
    assert classify_request(IMDS, "GET", path) == "credentials"


def test_a_provider_layout_only_on_its_own_endpoint():
    # Azure's token path on the ECS endpoint or WireServer is a 404 there, not a token.
    assert classify_request(ECS, "GET", "/metadata/identity/oauth2/token") == "other"
    assert classify_request(EKS, "GET", "/computeMetadata/v1/instance/service-accounts/"
                            "default/token") == "other"


def test_normalize_path_appends_the_query():
    assert normalize_path("/a//b/./c/", "x=1") == "/a/b/c?x=1"
    assert normalize_path("/a?y=2", "x=1") == "/a?y=2&x=1"


ENDPOINTS = st.sampled_from([None, *BUILTIN_ENDPOINTS])
TEXT = st.one_of(st.none(), st.text(max_size=300),
                 st.text(alphabet="/.%?#&=\\:ahtp2e5ACDEFlmsu-", max_size=120))


@settings(max_examples=400, deadline=None)
@given(ENDPOINTS, TEXT, TEXT, TEXT)
def test_total_on_any_strings(endpoint, method, path, query):
    assert classify_request(endpoint, method, path, query) in REQUEST_CLASSES


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=5000), st.text(max_size=5000))
def test_long_input_is_bounded(path, query):
    assert len(normalize_path(path, query)) <= 3 * 2 * 2048 + 2
