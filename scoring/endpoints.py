"""The catalog of cloud metadata endpoints and the matcher that decides whether a
destination is one of them.

An entry is an address or CIDR, optionally restricted to ports where the address is
shared with other services (Azure's WireServer also answers DNS on port 53).
IPv4-mapped IPv6 destinations (::ffff:a.b.c.d) match their IPv4 entry, and IPv6 zone
suffixes (fe80::a9fe:a9fe%eth0) are ignored.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field

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
