"""The endpoint catalog as BPF map entries: LPM-trie keys with port bitmaps.

The kernel asks the trie for the longest prefix holding the destination and tests the port
in that one entry. The catalog, though, accepts a destination when *any* endpoint containing
it allows the port (a narrow user entry with ports does not hide a broader built-in entry).
So each entry's port set is the union of the port sets of every endpoint whose network
contains the entry's network: every endpoint that contains an address contains its longest
match, which makes the two answers identical.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

PORT_WORDS = 1024  # 65536 bits


@dataclass(frozen=True, slots=True)
class PortSet:
    any_port: bool
    ports: frozenset[int]

    def words(self) -> list[int]:
        w = [0] * PORT_WORDS
        for p in self.ports:
            w[p >> 6] |= 1 << (p & 63)
        return w


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Endpoint(Protocol):
    """What the kernel filter needs of a metadata endpoint (the catalog's entries,
    `scoring.endpoints.Endpoint`, are passed in by the app): its network and its ports,
    none meaning every port."""

    @property
    def network(self) -> Network: ...

    @property
    def ports(self) -> frozenset[int]: ...


def _kernel_networks(e: Endpoint) -> list[Network]:
    """An IPv4-mapped IPv6 network (::ffff:a.b.c.d/1xx) is matched by the kernel through the
    IPv4 trie, like the catalog does, so it is stored there."""
    n = e.network
    if n.version == 6 and n.prefixlen >= 96 and n.network_address.ipv4_mapped is not None:
        return [ipaddress.ip_network(f"{n.network_address.ipv4_mapped}/{n.prefixlen - 96}")]
    return [n]


def entries(endpoints: Iterable[Endpoint]) -> dict[Network, PortSet]:
    """Map entries for a catalog: network -> the ports the kernel accepts there."""
    nets: list[tuple[Network, Endpoint]] = [
        (net, e) for e in endpoints for net in _kernel_networks(e)
    ]
    out: dict[Network, PortSet] = {}
    for net, _ in nets:
        if net in out:
            continue
        covering = [e for n2, e in nets if n2.version == net.version and net.subnet_of(n2)]
        any_port = any(not e.ports for e in covering)
        ports = frozenset() if any_port else frozenset(p for e in covering for p in e.ports)
        out[net] = PortSet(any_port, ports)
    return out


def first_bytes(nets: Iterable[Network], version: int) -> set[int]:
    """First address bytes covered by the `version` networks (the kernel's pre-filter)."""
    out: set[int] = set()
    for net in nets:
        if net.version != version:
            continue
        shift = net.max_prefixlen - 8
        lo = int(net.network_address) >> shift
        hi = int(net.broadcast_address) >> shift
        out.update(range(lo, hi + 1))
    return out


def write(table4: object, table6: object, endpoints: Iterable[Endpoint],
          first4: object | None = None, first6: object | None = None) -> int:
    """Make the BCC LPM tables (and the first-byte pre-filter arrays, when given) hold
    exactly the catalog. New and changed entries are written before stale ones are removed,
    pre-filter bytes set before and cleared after, so a reload never opens a window with no
    filter entries. Returns the number of entries."""
    wanted = entries(endpoints)
    firsts = [(arr, first_bytes(wanted, v)) for arr, v in ((first4, 4), (first6, 6))
              if arr is not None]
    for arr, needed in firsts:
        for byte in needed:
            arr[arr.Key(byte)] = arr.Leaf(1)
    for table, version in ((table4, 4), (table6, 6)):
        keep = set()
        for net, ps in wanted.items():
            if net.version != version:
                continue
            key = _key(table, net)
            leaf = table.Leaf()
            leaf.any_port = int(ps.any_port)
            if not ps.any_port:
                for i, word in enumerate(ps.words()):
                    if word:
                        leaf.bits[i] = word
            table[key] = leaf
            keep.add((net.prefixlen, bytes(net.network_address.packed)))
        for key in list(table.keys()):
            if (key.prefixlen, bytes(key.addr)) not in keep:
                del table[key]
    for arr, needed in firsts:
        for byte in range(256):
            if byte not in needed:
                arr[arr.Key(byte)] = arr.Leaf(0)
    return len(wanted)


def _key(table: object, net: Network) -> object:
    key = table.Key()
    key.prefixlen = net.prefixlen
    for i, b in enumerate(net.network_address.packed):
        key.addr[i] = b
    return key
