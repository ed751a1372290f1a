"""One pool of gRPC channels per process, shared by every session and request of a client or a peer: one
channel per address, the same message-size options everywhere, the least recently used closed past a cap."""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict

import grpc

from protos import peer_pb2_grpc

logger = logging.getLogger(__name__)

DEFAULT_MAX_CHANNELS = 256  # open channels kept at once; a swarm's route rarely needs more than a few dozen


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """gRPC options of every server and channel: the largest message sent or accepted."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


class ChannelPool:
    """Channels by address, reused across requests. Used from one event loop only."""

    def __init__(self, *, max_message_bytes: int, max_channels: int = DEFAULT_MAX_CHANNELS) -> None:
        if max_channels < 1:
            raise ValueError(f"max_channels must be >= 1, got {max_channels}")
        self._options = channel_options(max_message_bytes)
        self._max_channels = max_channels
        self._channels: OrderedDict[str, grpc.aio.Channel] = OrderedDict()
        self._stubs: dict[str, peer_pb2_grpc.PeerStub] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._channels)

    def get(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = grpc.aio.insecure_channel(address, options=self._options)
            self._channels[address] = channel
            self._evict()
        self._channels.move_to_end(address)
        return channel

    def stub(self, address: str) -> peer_pb2_grpc.PeerStub:
        """A `Peer` stub on the address's channel (cached with it)."""
        channel = self.get(address)
        stub = self._stubs.get(address)
        if stub is None:
            stub = self._stubs[address] = peer_pb2_grpc.PeerStub(channel)
        return stub

    def _evict(self) -> None:
        while len(self._channels) > self._max_channels:
            address, channel = self._channels.popitem(last=False)
            self._stubs.pop(address, None)
            logger.debug("channel evicted address=%s", address)
            task = asyncio.get_running_loop().create_task(channel.close(grace=None))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), OrderedDict()
        self._stubs.clear()
        for channel in channels:
            await channel.close()
        await asyncio.gather(*self._closing, return_exceptions=True)
