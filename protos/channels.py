"""One pool of gRPC channels per process, shared by every session and request of a client or a peer: one
channel per address and certificate, the same message-size options everywhere, the least recently used
closed past a cap. A secure pool (the default) speaks TLS only, trusting for each peer exactly the
certificate its record announced (`protos.tls`); a plaintext pool is an explicit choice (`insecure`). In a
private swarm every call carries the swarm token for its server (`protos.swarm_key`)."""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import Any

import grpc

from protos import peer_pb2, peer_pb2_grpc, tls
from protos.errors import CorollaError
from protos.records import PeerRecord
from protos.relay import RelayDialer, Unreachable
from protos.swarm_key import METADATA_KEY, SwarmKey

logger = logging.getLogger(__name__)

DEFAULT_MAX_CHANNELS = 256  # open channels kept at once; a swarm's route rarely needs more than a few dozen


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """gRPC options of every server and channel: the largest message sent or accepted."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


class NoCertificate(CorollaError):
    """A secure pool was asked for a peer that announces no TLS certificate: it cannot be reached safely."""


_Key = tuple[str, bytes]  # (address or "relay:PEER_ID", certificate; empty in a plaintext pool)
Relay = tuple[str, tuple[str, ...]]  # (peer id, its relays' circuit multiaddresses): a peer nobody can dial
_METHODS = tuple(peer_pb2.DESCRIPTOR.services_by_name["Peer"].methods_by_name)


class _WithMetadata:
    """A stub's multicallable that adds fixed metadata to every call (unary and streaming alike)."""

    def __init__(self, call: Any, metadata: tuple[tuple[str, str], ...]) -> None:
        self._call = call
        self._metadata = metadata

    def __call__(self, *args: Any, metadata: Any = (), **kwargs: Any) -> Any:
        return self._call(*args, metadata=(*self._metadata, *(metadata or ())), **kwargs)


class ChannelPool:
    """Channels by address and certificate, reused across requests. Used from one event loop only."""

    def __init__(
        self,
        *,
        max_message_bytes: int,
        insecure: bool = False,
        max_channels: int = DEFAULT_MAX_CHANNELS,
        swarm_key: SwarmKey | None = None,
    ) -> None:
        if max_channels < 1:
            raise ValueError(f"max_channels must be >= 1, got {max_channels}")
        if swarm_key is not None and insecure:
            raise ValueError("a private swarm speaks TLS only: its tokens never travel in plaintext")
        self.insecure = insecure
        self._swarm_key = swarm_key
        self._options = channel_options(max_message_bytes)
        self._max_channels = max_channels
        self._channels: OrderedDict[_Key, grpc.aio.Channel] = OrderedDict()
        self._stubs: dict[_Key, peer_pb2_grpc.PeerStub] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self.relays: RelayDialer | None = None  # set where the process has a libp2p node to reach relays

    def __len__(self) -> int:
        return len(self._channels)

    def get(
        self, address: str, certificate: bytes | None = None, *, relay: Relay | None = None
    ) -> grpc.aio.Channel:
        """The channel to `address`, or through `relay` to a peer nobody can dial (`protos.relay`):
        plaintext in an insecure pool, else TLS trusting only `certificate`. Calls made on it directly carry
        no swarm token: a private swarm's peers refuse them (use `stub`)."""
        key = self._key(address, certificate, relay)
        channel = self._channels.get(key)
        if channel is None:
            if relay is not None:
                if self.relays is None:
                    raise Unreachable(
                        f"peer {relay[0]} is reached through relays only, and this process has none"
                    )
                target = self.relays.target(*relay)
            else:
                target = f"dns:///{address}"  # explicit: a host named like a resolver ("unix:") stays a host
            if self.insecure:
                channel = grpc.aio.insecure_channel(target, options=self._options)
            else:
                credentials = tls.channel_credentials(key[1])
                channel = grpc.aio.secure_channel(
                    target, credentials, options=self._options + tls.channel_options()
                )
            self._channels[key] = channel
            self._evict()
        self._channels.move_to_end(key)
        return channel

    def stub(
        self, address: str, certificate: bytes | None = None, *, relay: Relay | None = None
    ) -> peer_pb2_grpc.PeerStub:
        """A `Peer` stub on the channel of `get` (cached with it)."""
        channel = self.get(address, certificate, relay=relay)
        key = self._key(address, certificate, relay)
        stub = self._stubs.get(key)
        if stub is None:
            stub = self._stubs[key] = peer_pb2_grpc.PeerStub(channel)
            if self._swarm_key is not None:
                metadata = ((METADATA_KEY, self._swarm_key.grpc_token(key[1])),)
                for method in _METHODS:
                    setattr(stub, method, _WithMetadata(getattr(stub, method), metadata))
        return stub

    def record_stub(self, peer_id: str, record: PeerRecord) -> peer_pb2_grpc.PeerStub:
        """A `Peer` stub for the peer that announced `record` (under subkey `peer_id`)."""
        certificate = record.certificate.encode() if record.certificate is not None else None
        relay = (peer_id, record.relay_maddrs) if record.relay_maddrs else None
        return self.stub(record.address, certificate, relay=relay)

    def _key(self, address: str, certificate: bytes | None, relay: Relay | None = None) -> _Key:
        if relay is not None:
            address = f"relay:{relay[0]}"
        if self.insecure:
            return address, b""
        if not certificate:
            raise NoCertificate(f"the peer at {address!r} announces no TLS certificate")
        return address, certificate

    def _evict(self) -> None:
        while len(self._channels) > self._max_channels:
            key, channel = self._channels.popitem(last=False)
            self._stubs.pop(key, None)
            logger.debug("channel evicted address=%s", key[0])
            task = asyncio.get_running_loop().create_task(channel.close(grace=None))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), OrderedDict()
        self._stubs.clear()
        for channel in channels:
            await channel.close()
        await asyncio.gather(*self._closing, return_exceptions=True)
        if self.relays is not None:
            await self.relays.close()
