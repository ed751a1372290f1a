"""Address prefixes of peer records, the unit of the client's Sybil limits: identities are free (an Ed25519
key), addresses are not, so one host or subnet counts once in the throughput median and holds at most a
bounded share of a route. Pure bookkeeping over records; knows nothing of routes or costs.

    record address       prefix (one vote)
    203.0.113.7:8700     203.0.113.0/24
    [2001:db8:1::5]:8700 2001:db8:1::/48
    peer.example.org:1   peer.example.org       (a name counts as its own prefix)
    127.0.0.1:8700       none: loopback is this machine, not a stranger; each such peer counts alone
"""

from __future__ import annotations

import ipaddress
import math
import statistics
from collections.abc import Iterable, Mapping

from protos.records import PeerRecord

__all__ = ["address_prefix", "median_per_prefix", "prefix_blocks", "prefix_budgets", "prefixes"]

IPV4_PREFIX = 24  # one provider's subnet: a host with many addresses usually holds them in one /24
IPV6_PREFIX = 48  # one site: providers hand out /48 to /64, so a /48 bounds what one customer holds
_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain"})


def address_prefix(address: str) -> str | None:
    """The prefix `address` (host:port, as records carry it) counts under, or None for a loopback host: a
    record pointing there reaches a process on the client's own machine, which no stranger can place."""
    host = address.rpartition(":")[0] or address
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        name = host.lower().rstrip(".")
        return None if name in _LOOPBACK_NAMES else name
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return None
    bits = IPV4_PREFIX if isinstance(ip, ipaddress.IPv4Address) else IPV6_PREFIX
    return str(ipaddress.ip_network(f"{ip}/{bits}", strict=False))


def prefixes(peers: Mapping[str, PeerRecord]) -> dict[str, str | None]:
    """peer_id -> its record's prefix (None: loopback, exempt from prefix limits)."""
    return {peer_id: address_prefix(record.address) for peer_id, record in peers.items()}


def median_per_prefix(values: Mapping[str, float], prefix_of: Mapping[str, str | None]) -> float:
    """The median over prefixes of each prefix's median of `values` (peer_id -> value): a prefix holding
    many records still has one vote. Loopback peers vote one each, so an all-loopback swarm gets the plain
    median over its peers. `values` must not be empty."""
    groups: dict[tuple[str, str], list[float]] = {}
    for peer_id, value in values.items():
        prefix = prefix_of.get(peer_id)
        key = ("peer", peer_id) if prefix is None else ("prefix", prefix)
        groups.setdefault(key, []).append(value)
    return statistics.median(statistics.median(group) for group in groups.values())


def prefix_blocks(
    hops: Iterable[tuple[str, int, int]], prefix_of: Mapping[str, str | None]
) -> dict[str, int]:
    """prefix -> blocks of the route `hops` (peer_id, start, end) its peers carry; loopback not counted."""
    counts: dict[str, int] = {}
    for peer_id, start, end in hops:
        prefix = prefix_of.get(peer_id)
        if prefix is not None:
            counts[prefix] = counts.get(prefix, 0) + end - start
    return counts


def prefix_budgets(
    peers: Mapping[str, PeerRecord], prefix_of: Mapping[str, str | None], start: int, end: int, share: float
) -> dict[str, int]:
    """prefix -> the most blocks of [start, end) its peers may carry in one route: `ceil(share * blocks)`
    (a route of one block, or of an odd number split between two prefixes, stays possible), or as many as
    the blocks no other prefix and no loopback peer serves, if more."""
    limit = math.ceil(share * (end - start) - 1e-9)  # 0.7 * 10 is 7.000000000000001
    forced: dict[str, int] = {}
    for block in range(start, end):
        serving = {prefix_of[peer_id] for peer_id, r in peers.items() if r.start <= block < r.end}
        for prefix in serving:
            if prefix is not None:
                forced[prefix] = forced.get(prefix, 0) + (len(serving) == 1)
    return {prefix: max(limit, blocks) for prefix, blocks in forced.items()}
