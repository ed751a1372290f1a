"""`SwarmConnection`: what a client holds to reach one model's swarm (the background loop, the DHT node and
discovery, one channel pool, the ban list and the peers' measured speeds), shared by its inference sessions
and its stateless forward/backward passes. Knows nothing of transformers."""

from __future__ import annotations

import logging

from hivemind.dht.node import DHTNode

from client.config import ClientConfig
from client.discovery import (
    BanList,
    DhtDiscovery,
    Discovery,
    direct_peers_only,
    tls_peers_only,
    weights_filter,
)
from client.finetune import RemoteSpans
from client.latency import Latency
from client.route import PeerStats
from client.runtime import Runtime
from client.session import InferenceSession
from protos.channels import ChannelPool
from protos.dht import start_dht_node
from protos.relay import RelayDialer
from protos.swarm_key import SwarmKey
from protos.tensors import WIRE_FORMAT_NAMES

logger = logging.getLogger(__name__)


def load_swarm_key(config: ClientConfig) -> SwarmKey | None:
    """The private swarm's key the client was given (`swarm_key=`), or None for the public swarm."""
    return SwarmKey.load(config.swarm_key) if config.swarm_key is not None else None


class SwarmConnection:
    """One client's link to one model's swarm. `connect` joins the DHT; `from_discovery` takes any
    `Discovery` (tests use `InMemoryDiscovery`). Everything runs on `runtime`'s loop; `close` ends it all."""

    def __init__(
        self,
        config: ClientConfig,
        discovery: Discovery,
        *,
        runtime: Runtime,
        wire_dtype: str,
        node: DHTNode | None = None,
    ) -> None:
        if wire_dtype not in WIRE_FORMAT_NAMES:
            raise ValueError(f"wire_dtype must be one of {', '.join(WIRE_FORMAT_NAMES)}, got {wire_dtype!r}")
        self.config = config
        # a TLS client routes only through peers it can authenticate, and whose weights it accepts
        discovery = discovery if config.insecure else tls_peers_only(discovery)
        discovery = discovery if node is not None else direct_peers_only(discovery)
        self.discovery = weights_filter(discovery, config.quant)
        self.runtime = runtime
        self.wire_dtype = wire_dtype
        self.node = node
        self.channels = ChannelPool(
            max_message_bytes=config.max_message_bytes,
            insecure=config.insecure,
            swarm_key=load_swarm_key(config),
        )
        if node is not None:  # peers nobody can dial are reached through their relays (protos.relay)
            self.channels.relays = RelayDialer(node.p2p)
        self.bans = BanList(config.ban_timeout, config.ban_backoff, config.max_ban_timeout)
        self.stats = PeerStats()  # what this client measured of each peer, shared by its sessions
        self.latency = Latency(self.channels, self.stats)  # its round trips to peers, for planning
        self.remote = RemoteSpans(self)
        self.closed = False

    @classmethod
    def connect(
        cls, config: ClientConfig, *, model_id: str, num_blocks: int, wire_dtype: str
    ) -> SwarmConnection:
        """Join the DHT through `config.initial_peers` and start reading the model's records."""
        runtime = Runtime()

        async def join() -> tuple[DHTNode, DhtDiscovery]:
            node = await start_dht_node(
                initial_peers=config.initial_peers, client_mode=True, swarm_key=load_swarm_key(config)
            )
            discovery = DhtDiscovery(
                node,
                model_id,
                num_blocks=num_blocks,
                refresh_period=config.refresh_period,
                fetch_timeout=config.fetch_timeout,
            )
            discovery.start()
            return node, discovery

        try:
            node, discovery = runtime.run(join(), timeout=config.join_timeout)
        except BaseException:
            runtime.close()
            raise
        return cls(config, discovery, runtime=runtime, wire_dtype=wire_dtype, node=node)

    @classmethod
    def from_discovery(
        cls, discovery: Discovery, config: ClientConfig, *, wire_dtype: str = "float32"
    ) -> SwarmConnection:
        """A connection over a discovery the caller made (no DHT node); it is closed with the connection."""
        return cls(config, discovery, runtime=Runtime(), wire_dtype=wire_dtype)

    def new_session(self, max_length: int, *, adapter: str = "") -> InferenceSession:
        """An inference session of up to `max_length` positions, through peers serving the LoRA `adapter`
        ("" the base model); it opens its route on the first step."""
        return InferenceSession(self, max_length=max_length, adapter=adapter)

    def close(self) -> None:
        """Close channels, discovery and the DHT node, then stop the loop. Safe to call twice."""
        if self.closed:
            return
        self.closed = True

        async def close() -> None:
            await self.latency.close()
            await self.channels.close()
            await self.discovery.close()
            if self.node is not None:
                await self.node.shutdown()

        try:
            self.runtime.run(close(), timeout=self.config.close_timeout)
        except Exception as e:  # the loop stops anyway: nothing is left to retry at exit
            logger.warning("swarm connection did not close cleanly reason=%r", e)
        self.runtime.close()
