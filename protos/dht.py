"""Starting a hivemind DHT node inside the caller's asyncio loop, with the options both sides need.

The node runs in-process (no forked DHT process, no IPC, no pickling); see shared/research/hivemind.md. Every
node of the process runs `protos.dht_storage.BoundedDHTProtocol` (bounded replicas, answers checked entry by
entry), and caches nothing it reads: corolla's reads always ask the replicas for the latest entries.
"""

from __future__ import annotations

import heapq
import ipaddress
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hivemind.dht import node as hivemind_node
from hivemind.dht.node import DHTNode
from hivemind.p2p import P2P
from hivemind.utils import timed_storage

from protos.dht_storage import BoundedDHTProtocol
from protos.dialback import DialBack
from protos.errors import CorollaError
from protos.identity import Identity, IdentityError
from protos.records import is_loopback, maddr_host
from protos.swarm_key import SwarmKey
from protos.validation import SignedRecordValidator

logger = logging.getLogger(__name__)


def _store_keeping_newer(self: Any, key: Any, value: Any, expiration_time: float) -> bool:
    """`TimedStorage.store` of hivemind 1.1.12 re-points the eviction entry before deciding to reject a
    store, so a rejected older record evicts the newer one early on every replica. Same logic, with the
    eviction entry moved only when the store is accepted."""
    if expiration_time < timed_storage.get_dht_time() and not self.frozen:
        return False
    if key in self.data and self.data[key].expiration_time >= expiration_time:
        return False
    self.key_to_heap[key] = timed_storage.HeapEntry(expiration_time, key)
    heapq.heappush(self.expiration_heap, self.key_to_heap[key])
    self.data[key] = timed_storage.ValueWithExpiration(value, expiration_time)
    self._remove_outdated()
    return True


timed_storage.TimedStorage.store = _store_keeping_newer  # type: ignore[method-assign]
# `DHTNode.create` builds its protocol from this name and takes no class to use instead
hivemind_node.DHTProtocol = BoundedDHTProtocol  # type: ignore[misc]


class JoinError(CorollaError, RuntimeError):
    """No initial peer answered: they are unreachable, or hold another swarm key than this node (or none)."""


def _all_loopback(maddrs: Sequence[str]) -> bool:
    """Whether every multiaddress names a loopback IP (`/ip4/127.../...`, `/ip6/::1/...`)."""
    return all((host := maddr_host(maddr)) is not None and is_loopback(host) for maddr in maddrs)


def _p2p_class(extra_args: Sequence[str]) -> type[P2P]:
    """hivemind's `P2P` with more p2pd flags than `P2P.create` takes (relay service, static relays only)."""
    if not extra_args:
        return P2P

    class _P2P(P2P):
        @staticmethod
        def _make_process_args(*args: Any, **kwargs: Any) -> list[str]:
            return [*P2P._make_process_args(*args, **kwargs), *extra_args]

    return _P2P


def host_maddr(host: str, port: int) -> str:
    """`/ip4/HOST/tcp/PORT`, `/ip6/...` for an IPv6 address (brackets allowed), `/dns/...` for a name."""
    bare = host.strip("[]")
    try:
        version = "ip6" if ipaddress.ip_address(bare).version == 6 else "ip4"
    except ValueError:
        version = "dns"
    return f"/{version}/{bare}/tcp/{port}"


async def start_dht_node(
    *,
    initial_peers: Sequence[str] = (),
    host: str = "127.0.0.1",
    port: int = 0,
    client_mode: bool = False,
    identity_path: Path | None = None,
    identity: Identity | None = None,
    nat_port_map: bool | None = None,
    swarm_key: SwarmKey | None = None,
    ensure_bootstrap_success: bool = True,
    relay_service: bool = True,
    relays: Sequence[str] = (),
    announce_maddrs: Sequence[str] = (),
) -> DHTNode:
    """A DHT node listening on host:port (servers) or dialing out only (`client_mode`), enforcing the
    swarm's record rules (`protos.validation`) on what it stores and reads.

    A server node's key is `identity`, else the Ed25519 identity in `identity_path` (created there when
    missing; a new one for this process without a path): p2pd takes its peer id from it and the node signs
    its own records with it. A client node signs nothing. With `swarm_key` the node belongs to that private
    swarm only: it answers and believes only nodes holding the same key (`protos.swarm_key`), so joining
    through `initial_peers` of another swarm, or of the public one, fails (`JoinError` unless
    `ensure_bootstrap_success` is False: then the node starts alone). Port mapping (UPnP/NAT-PMP) sends
    packets beyond loopback, so it is off for loopback hosts unless asked.

    Relays (libp2p circuit relay v2, `protos.relay`): a node off loopback relays for others (at most 16
    circuits per peer; each circuit carries 128 KiB each way and lasts 2 minutes, which `protos.resumable`
    outlives) unless `relay_service` is False. A
    node that nobody can dial passes `relays` (multiaddresses of public nodes): it reserves a slot on each at
    once and can then be reached through them; it runs in client mode. A server node answers dial-back
    probes (`protos.relay.DialBack`).

    `announce_maddrs` (a server in a container, behind a published port): the addresses the node tells others
    to reach it at, instead of those it listens on.
    """
    loopback = is_loopback(host)
    if nat_port_map is None:
        nat_port_map = not loopback
    if relays:
        client_mode = True
    if identity is None and not client_mode:
        identity = Identity.load_or_create(identity_path)
    options: dict[str, Any] = {
        "initial_peers": list(initial_peers),
        "host_maddrs": [host_maddr(host, port)],
        "nat_port_map": nat_port_map,
        # p2pd's check that an identity is free understands RSA keys only
        "identity_path": str(identity.path) if identity is not None else None,
        "check_if_identity_free": False,
    }
    if announce_maddrs and not client_mode:
        options["announce_maddrs"] = list(announce_maddrs)
    extra_args = []
    if loopback and _all_loopback(initial_peers):
        options.update(auto_nat=False, use_relay=False)
    elif not relay_service or relays or client_mode:
        extra_args.append("-relayService=0")
    if relays:  # reserve on these relays at once, not after p2pd's 3-minute wait for 4 candidates
        options.update(use_auto_relay=True, force_reachability="private", trusted_relays=list(relays))
        extra_args.append("-relayDiscovery=0")
    if client_mode:
        options.update(dht_mode="client")
    # started here, not by DHTNode.create: a node that fails to bootstrap would leave its p2pd running
    p2p = await _p2p_class(extra_args).create(**options)
    try:
        node = await DHTNode.create(
            p2p=p2p,
            initial_peers=list(initial_peers),
            client_mode=client_mode,
            # a cached copy is served instead of the stored entries when it expires later (protos.dht_storage)
            cache_locally=False,
            cache_nearest=0,
            record_validator=SignedRecordValidator(*([identity] if identity is not None else [])),
            authorizer=swarm_key.dht_authorizer() if swarm_key is not None else None,
            ensure_bootstrap_success=ensure_bootstrap_success,
        )
    except BaseException as e:
        await p2p.shutdown()
        if not isinstance(e, RuntimeError) or "bootstrap failed" not in str(e):
            raise
        swarm = f"the private swarm key {swarm_key.fingerprint}" if swarm_key is not None else "no swarm key"
        raise JoinError(
            "cannot join the DHT: none of the initial peers answered (unreachable, or they belong to a swarm "
            f"with another key: this node has {swarm})"
        ) from None
    node._should_shutdown_p2p = True  # the node owns its p2pd, as when DHTNode.create starts it
    if not client_mode:
        await DialBack(p2p).start()
    if identity is not None and node.peer_id.to_base58() != identity.peer_id:
        await node.shutdown()
        raise IdentityError(f"p2pd did not take the identity in {identity.path}")
    logger.info(
        "dht node started id=%s client_mode=%s swarm_key=%s",
        node.peer_id,
        client_mode,
        swarm_key.fingerprint if swarm_key is not None else "none (public swarm)",
    )
    return node


async def visible_maddrs(node: DHTNode) -> list[str]:
    """Multiaddresses (with the /p2p/ peer id) others pass as `initial_peers`."""
    return [str(maddr) for maddr in await node.get_visible_maddrs()]
