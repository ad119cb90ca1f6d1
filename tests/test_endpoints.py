# Metadata addresses in this file are data (event fields, expected matches): nothing here
# connects to them. Real connections happen only inside a test's own network namespace
# (netns, tests/netns_fixtures.py).
"""The metadata endpoint catalog and the matcher (scoring.endpoints)."""

import ipaddress

import pytest

from scoring.endpoints import BUILTIN_ENDPOINTS, EndpointCatalog

# (address, port, expected provider substring) for every endpoint the catalog must hold.
CATALOG = [
    ("169.254.169.254", 80, "aws"),
    ("fd00:ec2::254", 80, "aws"),
    ("169.254.170.2", 80, "aws"),  # AWS ECS task metadata
    ("169.254.170.23", 80, "aws"),  # EKS Pod Identity
    ("fd00:ec2::23", 80, "aws"),
    ("169.254.169.252", 988, "gcp"),  # GKE metadata server
    ("168.63.129.16", 80, "azure"),
    ("168.63.129.16", 32526, "azure"),
    ("100.100.100.200", 80, "alibaba"),
    ("fd00:c1::a9fe:a9fe", 80, "oci"),
    ("169.254.42.42", 80, "scaleway"),
    ("fd00:42::42", 80, "scaleway"),
    ("fd00:a9fe:a9fe::1", 80, "akamai"),
    ("fe80::a9fe:a9fe", 80, "openstack"),
    ("fe80::a9fe:a9fe", 80, "hetzner"),
]


@pytest.fixture(scope="module")
def catalog():
    return EndpointCatalog.from_config()


@pytest.mark.parametrize(("address", "port", "provider"), CATALOG)
def test_every_issue_entry_matches(catalog, address, port, provider):
    ep = catalog.match(address, port)
    assert ep is not None, f"{address}:{port} should be a metadata endpoint"
    assert provider in ep.provider
    assert ipaddress.ip_address(address) in ep.network


def test_builtin_ids_are_unique_and_short():
    ids = [e.id for e in BUILTIN_ENDPOINTS]
    assert len(ids) == len(set(ids))
    assert all(i and " " not in i and len(i) <= 32 for i in ids)


def test_imds_v4_matches_any_port_and_no_port(catalog):
    for port in (80, 443, 8080, None):
        assert catalog.match("169.254.169.254", port).id == catalog.match(
            "169.254.169.254", 80).id


@pytest.mark.parametrize("text", [
    "::ffff:169.254.169.254",
    "::FFFF:169.254.169.254",
    "::ffff:a9fe:a9fe",
    "[::ffff:169.254.169.254]",
])
def test_ipv4_mapped_ipv6_matches_the_ipv4_entry(catalog, text):
    v4 = catalog.match("169.254.169.254", 80)
    assert catalog.match(text, 80) == v4


def test_ipv4_mapped_forms_of_other_entries(catalog):
    assert catalog.match("::ffff:169.254.170.2", 80) == catalog.match("169.254.170.2", 80)
    assert catalog.match("::ffff:168.63.129.16", 80) == catalog.match("168.63.129.16", 80)
    # ... and the port restriction still applies to the mapped form.
    assert catalog.match("::ffff:168.63.129.16", 53) is None


@pytest.mark.parametrize("text", ["fe80::a9fe:a9fe%eth0", "fe80::a9fe:a9fe%2",
                                  "[fe80::a9fe:a9fe%ens5]"])
def test_zone_ids_are_ignored(catalog, text):
    ep = catalog.match(text, 80)
    assert ep is not None and "openstack" in ep.provider


@pytest.mark.parametrize("text", ["[fd00:ec2::254]", "[169.254.169.254]", " fd00:ec2::254 "])
def test_bracketed_and_padded_addresses(catalog, text):
    assert catalog.match(text, 80) is not None


def test_ipv6_text_forms_are_equivalent(catalog):
    expanded = "fd00:0ec2:0000:0000:0000:0000:0000:0254"
    assert catalog.match(expanded, 80) == catalog.match("fd00:ec2::254", 80)
    assert catalog.match("FD00:EC2::254", 80) is not None


def test_gke_metadata_server_only_on_port_988(catalog):
    assert catalog.match("169.254.169.252", 988).id == "gke-metadata-server"
    for port in (80, 53, 443, 987, 989):
        assert catalog.match("169.254.169.252", port) is None


def test_azure_wireserver_ports(catalog):
    assert catalog.match("168.63.129.16", 80) is not None
    assert catalog.match("168.63.129.16", 32526) is not None
    for port in (53, 443, 32525):
        assert catalog.match("168.63.129.16", port) is None, port


def test_event_without_port_matches_port_restricted_entries(catalog):
    # An event that does not say its port cannot be excluded by port.
    assert catalog.match("168.63.129.16", None) is not None


@pytest.mark.parametrize("text", [
    "169.254.169.253",  # AWS DNS
    "169.254.169.123",  # AWS NTP
    "169.254.169.255",
    "169.254.170.3",
    "10.0.0.1",
    "8.8.8.8",
    "fd00:ec2::253",
    "fe80::1",
    "::ffff:169.254.169.253",
    "::1",
])
def test_neighbours_are_not_endpoints(catalog, text):
    for port in (53, 80, 123, None):
        assert catalog.match(text, port) is None, (text, port)


@pytest.mark.parametrize("text", ["", "not-an-ip", "169.254.169", "169.254.169.254.1",
                                  "fe80::a9fe::a9fe::1", "%eth0", "[]"])
def test_garbage_addresses_do_not_match_or_raise(catalog, text):
    assert catalog.match(text, 80) is None


def test_repeated_lookups_are_stable(catalog):
    # The matcher memoises by text; the second answer must equal the first.
    first = [catalog.match(a, p) for a, p, _ in CATALOG]
    second = [catalog.match(a, p) for a, p, _ in CATALOG]
    assert first == second


# -- configuration: add and remove -------------------------------------------------------

def test_add_endpoint_with_ports():
    cat = EndpointCatalog.from_config(
        add=[{"id": "corp-metadata", "provider": "corp", "address": "10.9.9.9",
              "ports": [8775]}])
    ep = cat.match("10.9.9.9", 8775)
    assert ep is not None and ep.id == "corp-metadata" and ep.provider == "corp"
    assert cat.match("10.9.9.9", 80) is None
    # Built-ins are still there.
    assert cat.match("169.254.169.254", 80) is not None
    assert len(cat) == len(BUILTIN_ENDPOINTS) + 1


def test_add_cidr_and_default_id():
    cat = EndpointCatalog.from_config(add=[{"address": "10.200.0.0/24"}])
    ep = cat.match("10.200.0.77", 80)
    assert ep is not None
    assert ep.id == "custom-10.200.0.0"
    assert ep.provider == "custom"
    assert cat.match("10.200.1.1", 80) is None


def test_add_ipv6_endpoint_matches_with_zone():
    cat = EndpointCatalog.from_config(add=[{"id": "v6", "address": "fd12::1"}])
    assert cat.match("fd12::1%eth0", 80).id == "v6"


def test_narrower_added_entry_wins_over_builtin():
    cat = EndpointCatalog.from_config(
        add=[{"id": "wide", "address": "169.254.0.0/16", "ports": [80]}])
    assert cat.match("169.254.169.254", 80).id == "imds"
    assert cat.match("169.254.1.1", 80).id == "wide"


@pytest.mark.parametrize("key", ["alibaba-metadata", "100.100.100.200"])
def test_remove_by_id_or_address(key):
    cat = EndpointCatalog.from_config(remove=[key])
    assert cat.match("100.100.100.200", 80) is None
    assert cat.match("169.254.169.254", 80) is not None
    assert len(cat) == len(BUILTIN_ENDPOINTS) - 1
    assert all(e.id != "alibaba-metadata" for e in cat)


def test_remove_ipv6_by_address():
    cat = EndpointCatalog.from_config(remove=["fd00:ec2::254"])
    assert cat.match("fd00:ec2::254", 80) is None
    assert cat.match("169.254.169.254", 80) is not None


def test_remove_unknown_endpoint_is_an_error_naming_it():
    with pytest.raises(ValueError, match="no-such-endpoint"):
        EndpointCatalog.from_config(remove=["no-such-endpoint"])
    with pytest.raises(ValueError, match="10.1.2.3"):
        EndpointCatalog.from_config(remove=["imds", "10.1.2.3"])


@pytest.mark.parametrize("spec", [
    {"address": "169.254.169.999"},
    {"address": "not an address"},
    {"address": "fd00::zz"},
    {"id": "x"},  # no address
    {"address": "10.0.0.1", "ports": [0]},
    {"address": "10.0.0.1", "ports": [70000]},
    {"address": "10.0.0.1", "ports": ["80"]},
])
def test_bad_added_endpoint_is_an_error(spec):
    with pytest.raises(ValueError):
        EndpointCatalog.from_config(add=[spec])


def test_no_builtin_catalog():
    cat = EndpointCatalog.from_config(add=[{"address": "10.0.0.1"}], builtin=False)
    assert len(cat) == 1
    assert cat.match("169.254.169.254", 80) is None
    assert cat.match("10.0.0.1", 80) is not None
