"""How others reach this peer: the host it announces (learnt from the swarm when it listens on every
interface), the dial-back check before it goes online, and the decision to serve through relays. The relay
transport itself is `protos.relay`'s; the peer's wiring is `peer.main`'s."""

from __future__ import annotations

import collections
import contextlib
import ipaddress
import logging
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc
from hivemind.dht.node import DHTNode
from hivemind.p2p import P2P

from peer.config import PeerConfig
from peer.portmap import PortMapper
from protos.dialback import Reachability, check_reachability
from protos.errors import CorollaError
from protos.records import MAX_RELAYS, is_loopback, maddr_host

logger = logging.getLogger(__name__)

_UNROUTED_PROBE = (
    "192.0.2.1",
    9,
)  # TEST-NET-1: a UDP connect only asks the kernel for a route, sends nothing


class UnreachableError(CorollaError, RuntimeError):
    """The swarm cannot dial this peer at its announced address, and relays are off (or none are known)."""


def bracketed(host: str) -> str:
    """`host` as the host part of host:port (an IPv6 address in brackets)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def route_source(initial_peers: Sequence[str]) -> str | None:
    """The local address the kernel would send from toward the first initial peer (or, with none, toward
    the default route): what a peer listening on every interface offers when no swarm member saw it yet."""
    targets = [(host, 9) for maddr in initial_peers if (host := maddr_host(maddr)) is not None]
    for host, port in [*targets, _UNROUTED_PROBE]:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with contextlib.suppress(OSError), socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((host, port))
            return str(probe.getsockname()[0])
    return None


async def learn_host(p2p: P2P, initial_peers: Sequence[str]) -> str:
    """The host to announce for a peer listening on every interface: the one most swarm members see its
    connections come from, else the local address routed toward the swarm, else 127.0.0.1."""
    seen = await check_reachability(p2p, None, certificate=None)
    usable = [host for host in seen.observed_hosts if not _unusable(host)]
    if usable:
        observed = collections.Counter(usable).most_common(1)[0][0]
        logger.info("announce host learnt host=%s source=swarm observers=%d", observed, len(usable))
        return observed
    routed = route_source(initial_peers)
    if routed is None or _unusable(routed):
        logger.warning("announce host unknown: announcing 127.0.0.1; pass --announce-host for other machines")
        return "127.0.0.1"
    logger.info("announce host learnt host=%s source=route", routed)
    return routed


def _unusable(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return True
    return address.is_unspecified or address.is_link_local or address.is_multicast


async def check(p2p: P2P, address: str, *, certificate: bytes | None) -> Reachability | None:
    """Ask swarm members to dial `address` back and log what they said; None for a loopback address
    (a swarm on one machine), which is not checked."""
    if is_loopback(address.rpartition(":")[0].strip("[]")):
        return None
    result = await check_reachability(p2p, address, certificate=certificate)
    logger.info(
        "reachability address=%s asked=%d answered=%d reached=%d reachable=%s",
        address,
        result.asked,
        result.answered,
        result.reached,
        result.reachable,
    )
    if result.reachable is None:
        logger.warning("reachability unknown address=%s: no swarm member answered the dial-back", address)
    return result


def relays_for(initial_peers: Sequence[str], *, relay: bool, address: str, result: Reachability) -> list[str]:
    """The relays an unreachable peer serves through: its initial peers (public nodes with /p2p/ ids).
    Raises `UnreachableError` naming the fix when relays are off or none is known."""
    port = address.rpartition(":")[2]
    reasons = "; ".join(sorted(set(result.errors))) or "no handshake"
    fixes = (
        f"forward TCP port {port} on the router to this machine and pass --announce-host with the address "
        "others dial"
    )
    if not relay:
        raise UnreachableError(
            f"the swarm cannot dial this peer at {address} ({result.reached} of {result.answered} probers "
            f"reached it: {reasons}). Fix: {fixes}, or drop --no-relay to serve through relays"
        )
    relays = [maddr for maddr in initial_peers if "/p2p/" in maddr][:MAX_RELAYS]
    if not relays:
        raise UnreachableError(
            f"the swarm cannot dial this peer at {address}, and no --initial-peers can relay for it. "
            f"Fix: {fixes}"
        )
    return relays


@dataclass(frozen=True)
class Reached:
    """How the swarm reaches a peer: its address and port, the relays it needs (none: dialed directly),
    and the router's mapping of its port, held while it runs."""

    address: str
    port: int
    relays: list[str]
    port_mapper: PortMapper | None


async def announced_address(config: PeerConfig, p2p: P2P, port: int) -> tuple[str, PortMapper | None]:
    """host:port others dial: --announce-host, else the router's mapping of the port (--nat-port-map), else
    the host the swarm sees this peer at (a wildcard --host) or --host itself."""
    mapper = None
    if config.nat_port_map and not is_loopback(config.host):
        mapper = PortMapper()
        mapping = await mapper.start(port)
        if mapping is not None and "announce_host" not in config.model_fields_set:  # not given
            return f"{mapping.external_host}:{mapping.external_port}", mapper
    host = config.announce_host or bracketed(await learn_host(p2p, config.initial_peers))
    return f"{host}:{port}", mapper


async def reach_swarm(
    config: PeerConfig,
    node: DHTNode,
    port: int,
    *,
    add_port: Callable[[grpc.aio.Server, int], int],
    certificate: bytes | None,
) -> Reached:
    """Learn the address to announce and have up to 5 swarm members dial it back, a bare gRPC server on the
    port answering their TLS handshakes (the port it binds is the one the peer then serves on). Raises
    `UnreachableError` when nobody can dial it and relays are off."""
    probe = grpc.aio.server()
    port = add_port(probe, port)
    await probe.start()
    try:
        address, mapper = await announced_address(config, node.p2p, port)
        result = await check(node.p2p, address, certificate=certificate)
    finally:
        await probe.stop(None)
    relays: list[str] = []
    if result is not None and result.reachable is False:
        try:
            relays = relays_for(config.initial_peers, relay=config.relay, address=address, result=result)
        except UnreachableError:
            if mapper is not None:
                await mapper.close()
            raise
    return Reached(address, port, relays, mapper)
