"""The kernel's request patterns (policy.request_patterns) against the classifier they are
derived from: for every canonical request of a corpus built from the classifier's own rules,
the kernel's class mask contains the classifier's class, and a plain request of one class
gives exactly that class (so a metadata-only caller's instance-id is not refused)."""

from __future__ import annotations

import itertools

from policy.request_patterns import ALL_CLASSES, class_bit, classify, fnv1a, patterns
from scoring.endpoints import classify_request

PATHS = [
    "/", "/latest", "/latest/", "/latest/meta-data/instance-id", "/latest/meta-data/",
    "/latest/meta-data/iam/security-credentials/", "/latest/meta-data/iam/security-credentials/r",
    "/latest/meta-data/iam/info", "/latest/api/token", "/latest/user-data",
    "/latest/dynamic/instance-identity/document", "/latest/dynamic/foo", "/latest/foo",
    "/2021-07-15/meta-data/instance-id", "/2021-07-15/meta-data/iam/security-credentials/x",
    "/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance",
    "/latest/meta-data/identity-credentials/a/b/c/d/e/security-credentials/x",
    "/latest/meta-data/ram/security-credentials/x",
    "/computemetadata/v1/instance/service-accounts/default/token",
    "/computeMetadata/v1/instance/service-accounts/default/email",
    "/computemetadata/v1/instance/service-accounts/default/identity",
    "/computemetadata/v1beta1/instance/attributes/kube-env",
    "/computemetadata/v1/instance/attributes/foo", "/computemetadata/v1/project/project-id",
    "/metadata/instance/compute", "/metadata/identity/oauth2/token", "/metadata/attested/document",
    "/metadata/instance/compute/userdata", "/metadata/other", "/metadata/v1/user-data",
    "/metadata/v1.json", "/machine", "/vmsettings", "/v2/credentials/abc", "/v1/credentials",
    "/v3/task", "/v4/x/stats", "/opc/v2/identity/cert.pem", "/opc/v1/instance/",
    "/opc/v2/instance/metadata/user_data", "/openstack/latest/password",
    "/openstack/2018-08-27/user_data", "/openstack/latest/meta_data.json", "/hetzner/v1/userdata",
    "/user_data", "/conf", "/v1/token", "/v1/user-data", "/v1/instance", "/nothing/here",
]


def test_the_kernel_mask_always_holds_the_classifiers_class():
    pats = patterns()
    for path, method, query in itertools.product(PATHS, ("GET", "PUT"), ("", "comp=certificates")):
        full = path + ("?" + query if query else "")
        cls = classify_request(None, method, full)
        mask = classify(method, path, bool(query), pats)
        assert mask & class_bit(cls), (method, full, cls, bin(mask))


def test_plain_requests_get_exactly_their_class():
    for method, path, cls in (("GET", "/latest/meta-data/instance-id", "metadata"),
                              ("GET", "/latest/meta-data/iam/security-credentials/r",
                               "credentials"),
                              ("PUT", "/latest/api/token", "session"),
                              ("GET", "/latest/api/token", "other"),
                              ("GET", "/computemetadata/v1/instance/service-accounts/d/token",
                               "token"),
                              ("GET", "/latest/user-data", "user-data")):
        assert classify(method, path, False) == class_bit(cls), path


def test_the_table_fits_the_kernel_and_hashes_like_it():
    pats = patterns()
    assert 0 < len(pats) <= 192 and all(len(p.segments) <= 8 for p in pats)
    assert all(0 < p.mask <= ALL_CLASSES and p.family < 32 for p in pats)
    assert fnv1a("a") == 0xE40C292C  # the FNV-1a 32-bit test vector the kernel also meets
