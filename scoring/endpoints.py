"""The catalog of cloud metadata endpoints and the matcher that decides whether a
destination is one of them.

An entry is an address or CIDR, optionally restricted to ports where the address is
shared with other services (Azure's WireServer also answers DNS on port 53).
IPv4-mapped IPv6 destinations (::ffff:a.b.c.d) match their IPv4 entry, and IPv6 zone
suffixes (fe80::a9fe:a9fe%eth0) are ignored.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import unquote

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One metadata endpoint. `id` is short and stable: it is a metric label value."""

    id: str
    provider: str
    network: IPNetwork
    ports: frozenset[int] = field(default_factory=frozenset)  # empty: every port

    def matches_port(self, port: int | None) -> bool:
        # An event without a port cannot be excluded by port, so it matches.
        return not self.ports or port is None or port in self.ports

    @property
    def address(self) -> str:
        n = self.network
        return str(n.network_address) if n.prefixlen == n.max_prefixlen else str(n)


def _ep(id_: str, provider: str, address: str, ports: Iterable[int] = ()) -> Endpoint:
    return Endpoint(id_, provider, ipaddress.ip_network(address), frozenset(ports))


# 169.254.169.254 is shared by most clouds, so its provider names them all.
BUILTIN_ENDPOINTS: tuple[Endpoint, ...] = (
    _ep("imds", "aws,gcp,azure,oci,openstack,digitalocean,hetzner", "169.254.169.254"),
    _ep("aws-imds-v6", "aws", "fd00:ec2::254"),
    _ep("aws-ecs-task-metadata", "aws", "169.254.170.2"),
    _ep("aws-eks-pod-identity", "aws", "169.254.170.23"),
    _ep("aws-eks-pod-identity-v6", "aws", "fd00:ec2::23"),
    _ep("gke-metadata-server", "gcp", "169.254.169.252", (988,)),
    _ep("azure-wireserver", "azure", "168.63.129.16", (80, 32526)),
    _ep("alibaba-metadata", "alibaba", "100.100.100.200"),
    _ep("oci-metadata-v6", "oci", "fd00:c1::a9fe:a9fe"),
    _ep("scaleway-metadata", "scaleway", "169.254.42.42"),
    _ep("scaleway-metadata-v6", "scaleway", "fd00:42::42"),
    _ep("akamai-metadata-v6", "akamai", "fd00:a9fe:a9fe::1"),
    _ep("openstack-metadata-v6", "openstack,hetzner", "fe80::a9fe:a9fe"),
)


def parse_endpoint(spec: dict) -> Endpoint:
    """Build an endpoint from a config table: {id?, provider?, address, ports?}."""
    if "address" not in spec:
        raise ValueError(f"endpoint {spec!r} has no 'address'")
    try:
        network = ipaddress.ip_network(str(spec["address"]), strict=False)
    except ValueError as exc:
        raise ValueError(f"endpoint address {spec['address']!r}: {exc}") from None
    if network.version == 6 and network.prefixlen >= 96:
        mapped = network.network_address.ipv4_mapped
        if mapped is not None:  # ::ffff:a.b.c.d is reached (and reported) as a.b.c.d
            network = ipaddress.ip_network(f"{mapped}/{network.prefixlen - 96}", strict=False)
    ports = spec.get("ports", ())
    if any(not isinstance(p, int) or not 0 < p < 65536 for p in ports):
        raise ValueError(f"endpoint {spec['address']}: ports must be integers 1-65535")
    id_ = str(spec.get("id") or f"custom-{network.network_address}")
    return Endpoint(id_, str(spec.get("provider", "custom")), network, frozenset(ports))


def normalize_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """Parse an address, folding IPv4-mapped IPv6 to IPv4 and dropping a zone id."""
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    text = text.split("%", 1)[0]
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    if addr.version == 6 and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


class EndpointCatalog:
    """Decides, fast, whether (ip, port) is a metadata endpoint.

    Lookups are memoised by the address string as it appears in the events: a trace names
    few distinct destinations, and parsing each one with `ipaddress` would dominate replay.
    """

    _CACHE_LIMIT = 65536

    def __init__(self, endpoints: Iterable[Endpoint]) -> None:
        self.endpoints: tuple[Endpoint, ...] = tuple(endpoints)
        # Most specific first, so a user's narrower entry wins over a built-in CIDR.
        self._ordered = sorted(self.endpoints, key=lambda e: -e.network.prefixlen)
        self._by_text: dict[str, Endpoint | tuple[Endpoint, ...] | bool] = {}

    @classmethod
    def from_config(
        cls, add: Iterable[dict] = (), remove: Iterable[str] = (), builtin: bool = True
    ) -> EndpointCatalog:
        """The built-in catalog, less `remove` (ids or addresses), plus `add`."""
        removed = {str(r) for r in remove}
        base = [
            e
            for e in (BUILTIN_ENDPOINTS if builtin else ())
            if e.id not in removed and e.address not in removed
        ]
        unknown = removed - {e.id for e in BUILTIN_ENDPOINTS} - {
            e.address for e in BUILTIN_ENDPOINTS
        }
        if unknown:
            raise ValueError(f"cannot remove unknown endpoints: {', '.join(sorted(unknown))}")
        return cls([*base, *(parse_endpoint(a) for a in add)])

    def _resolve(self, ip_text: str) -> Endpoint | tuple[Endpoint, ...] | bool:
        """What `match` caches per address text: False (no endpoint), the one endpoint
        when it takes every port, or the candidates to check against the port."""
        addr = normalize_ip(ip_text)
        cands = () if addr is None else tuple(
            e for e in self._ordered
            if e.network.version == addr.version and addr in e.network
        )
        if not cands:
            hit: Endpoint | tuple[Endpoint, ...] | bool = False
        elif not cands[0].ports:
            hit = cands[0]
        else:
            hit = cands
        if len(self._by_text) >= self._CACHE_LIMIT:
            self._by_text.clear()
        self._by_text[ip_text] = hit
        return hit

    def match(self, ip_text: str, port: int | None = None) -> Endpoint | None:
        """The endpoint that (ip, port) reaches, or None when it is not a metadata endpoint."""
        hit = self._by_text.get(ip_text)
        if hit is None:
            hit = self._resolve(ip_text)
        if hit.__class__ is Endpoint:
            return hit  # type: ignore[return-value]
        if hit is False:
            return None
        for e in hit:  # type: ignore[union-attr]
            if e.matches_port(port):
                return e
        return None

    def __iter__(self):  # noqa: ANN204 - iterator of Endpoint
        return iter(self.endpoints)

    def __len__(self) -> int:
        return len(self.endpoints)


# -- what a request asks for ---------------------------------------------------------------
#
# A request to a metadata endpoint is put in one of a few classes, so a detector can ask
# "has this caller ever asked for credentials before?" and metrics can count requests by
# class (bounded: never by path). The classes:
CREDENTIALS = "credentials"  # keys that act as the instance/task/pod: AWS role credentials,
#                              AWS ECS/EKS credentials, Alibaba RAM, OCI instance principal, ...
TOKEN = "token"  # an OAuth access token: GCP service-account token, Azure managed identity
IDENTITY = "identity"  # signed proof of identity: AWS identity document/signature/pkcs7,
#                        GCP identity token (JWT), Azure attested document
USER_DATA = "user-data"  # boot configuration, often with secrets (user-data, kube-env)
SESSION = "session"  # the IMDSv2 session-token handshake (PUT /latest/api/token): useful
#                      only against the metadata service itself
METADATA = "metadata"  # everything else the service documents (instance id, region, ...)
OTHER = "other"  # a path the provider's API does not have
REQUEST_CLASSES = (CREDENTIALS, TOKEN, IDENTITY, USER_DATA, SESSION, METADATA, OTHER)
# What grants access beyond the instance: worth an alert without history when it is asked
# for without the anti-SSRF header (see scoring.detectors).
SENSITIVE_CLASSES = frozenset((CREDENTIALS, TOKEN, IDENTITY))

# One API family per provider path layout: (providers it belongs to, path prefix regex,
# rules on the rest of the path, first match wins, default class for the family). The
# families' prefixes do not overlap, so the shared 169.254.169.254 needs no provider hint.
_AWS_LIKE = (
    (r"/api/token", SESSION),
    (r"/meta-data/iam/security-credentials(/.*)?", CREDENTIALS),
    (r"/meta-data/identity-credentials(/.*)?/security-credentials(/.*)?", CREDENTIALS),
    (r"/meta-data/ram/security-credentials(/.*)?", CREDENTIALS),  # Alibaba
    (r"/dynamic/instance-identity(/.*)?", IDENTITY),
    (r"/user-data(/.*)?", USER_DATA),
    (r"(/meta-data(/.*)?|/dynamic(/.*)?|/?)", METADATA),
)
_FAMILIES: tuple[tuple[frozenset[str], str, tuple[tuple[str, str], ...], str], ...] = (
    (frozenset({"aws", "alibaba", "openstack"}), r"/(latest|\d{4}-\d{2}-\d{2})", _AWS_LIKE,
     OTHER),
    (frozenset({"gcp"}), r"/computemetadata/v1(beta1)?", (
        (r"/instance/service-accounts/[^/]+/token", TOKEN),
        (r"/instance/service-accounts/[^/]+/identity", IDENTITY),
        (r"/instance/attributes/(startup-script|user-data|kube-env|windows-startup-script"
         r"-ps1|sysprep-specialize-script-ps1)", USER_DATA),
    ), METADATA),
    (frozenset({"digitalocean"}), r"/metadata/v1(\.json)?", (
        (r"/user-data", USER_DATA),
    ), METADATA),
    (frozenset({"azure"}), r"/metadata", (
        (r"/identity/oauth2/token", TOKEN),
        (r"/attested/document", IDENTITY),
        (r"/instance/compute/(userdata|customdata)", USER_DATA),
        (r"/(instance|identity|scheduledevents|loadbalancer|versions)(/.*)?", METADATA),
    ), OTHER),
    # Azure WireServer: tenant certificates carry private keys; vmSettings and the
    # extensions config carry extension settings (protected ones included).
    (frozenset({"azure"}), r"/machine", (
        (r"/?\?.*comp=certificates.*", CREDENTIALS),
        (r"/?\?.*type=extensionsconfig.*", USER_DATA),
    ), METADATA),
    (frozenset({"azure"}), r"/(vmsettings|extensionartifact|health|status)", (
        (r"", USER_DATA),
    ), METADATA),
    (frozenset({"aws"}), r"/v2/credentials", ((r"(/.*)?", CREDENTIALS),), CREDENTIALS),  # AWS ECS
    (frozenset({"aws"}), r"/v1/credentials", ((r"(/.*)?", CREDENTIALS),), CREDENTIALS),  # EKS
    (frozenset({"aws"}), r"/v[1-4]", (), METADATA),  # AWS ECS task metadata v2-v4
    (frozenset({"oci"}), r"/opc/v[12]", (
        (r"/identity(/.*)?", CREDENTIALS),
        (r"/instance/metadata/user_data", USER_DATA),
    ), METADATA),
    (frozenset({"openstack"}), r"/openstack(/[^/]+)?", (
        (r"/password", CREDENTIALS),
        (r"/user_data", USER_DATA),
    ), METADATA),
    (frozenset({"hetzner"}), r"/hetzner/v1", ((r"/userdata", USER_DATA),), METADATA),
    (frozenset({"scaleway"}), r"/(conf|user_data|state)", ((r"/user_data(/.*)?", USER_DATA),),
     METADATA),
    (frozenset({"akamai"}), r"/v1", (
        (r"/token", SESSION),
        (r"/user-data", USER_DATA),
    ), METADATA),
)
_COMPILED = tuple(
    (providers, re.compile(prefix + r"(?=/|\?|$)(?P<rest>.*)", re.S),
     tuple((re.compile(rule + r"/?", re.S), cls) for rule, cls in rules), default)
    for providers, prefix, rules, default in _FAMILIES
)
_ALL_PROVIDERS = frozenset({"custom"})
MAX_PATH = 2048  # a longer path is cut: what decides the class is at its start


def normalize_path(path: str, query: str | None = None) -> str:
    """The path as a server would resolve it, lower-cased, with the query appended after
    "?": percent-escapes decoded (twice, against double encoding), an absolute-form target
    (`GET http://169.254.169.254/latest/... HTTP/1.1`, what a forward proxy receives)
    reduced to its path, repeated slashes merged, `.` and `..` resolved. A detector must
    not be evaded by `/latest//meta-data/./iam/%73ecurity-credentials`."""
    path = path[:MAX_PATH]
    for _ in range(2):
        if "%" not in path:
            break
        path = unquote(path, errors="replace")
    path = path.replace("\\", "/")
    lowered = path.lower()
    if lowered.startswith(("http://", "https://")):
        path = "/" + path.split("/", 3)[3] if path.count("/") >= 3 else "/"
    path = path.partition("#")[0]
    path, sep, inline_query = path.partition("?")
    segments: list[str] = []
    for seg in path.split("/"):
        if seg in ("", "."):
            continue
        if seg == "..":
            if segments:
                segments.pop()
            continue
        segments.append(seg)
    out = "/" + "/".join(segments)
    q = "&".join(x for x in (inline_query if sep else "", query or "") if x)
    return (out + ("?" + unquote(q[:MAX_PATH], errors="replace") if q else "")).lower()


def classify_request(endpoint: Endpoint | None, method: str | None, path: str | None,
                     query: str | None = None) -> str:
    """The class (one of REQUEST_CLASSES) of a request to `endpoint`. Total: any strings
    give a class, never an exception. `endpoint` None (or a custom one) lets every
    provider's layout apply; a built-in endpoint only its own providers'."""
    if path is None:
        return OTHER
    target = normalize_path(path, query)
    if target == "/" or target.startswith("/?"):
        return METADATA  # the root lists the API versions
    providers = _ALL_PROVIDERS if endpoint is None else frozenset(
        endpoint.provider.split(","))
    any_provider = "custom" in providers
    for fam_providers, prefix, rules, default in _COMPILED:
        if not any_provider and not fam_providers & providers:
            continue
        m = prefix.match(target)
        if m is None:
            continue
        rest = m.group("rest")
        path_rest, _, _ = rest.partition("?")
        for rule, cls in rules:
            # WireServer rules read the query; every other rule reads the path only.
            if rule.fullmatch(path_rest) or (rest.startswith(("?", "/?")) and
                                             rule.fullmatch(rest)):
                # The session handshake is a PUT; anything else there is not it.
                if cls == SESSION and method is not None and method.upper() != "PUT":
                    return OTHER
                return cls
        return default
    return OTHER
