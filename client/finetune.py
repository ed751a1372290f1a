"""Stateless passes through remote spans (`Forward`), used for scoring and as the base of fine-tuning;
a failed hop is retried on another peer for the same blocks."""

from __future__ import annotations

import logging

import grpc
import torch

from client.config import ClientConfig
from client.discovery import BanList, Discovery
from client.route import plan_forward_route
from client.session import ChannelPool, PeerFailure, SwarmUnavailableError
from protos import peer_pb2, peer_pb2_grpc
from protos.errors import InvalidInputError
from protos.tensors import from_message, to_message

logger = logging.getLogger(__name__)


async def forward_through_route(
    discovery: Discovery,
    bans: BanList,
    channels: ChannelPool,
    config: ClientConfig,
    hidden: torch.Tensor,
) -> torch.Tensor:
    """Hidden states [batch, seq, hidden] through every block, hop by hop; the client relays between hops."""
    view = await discovery.view()
    block, failures = 0, 0
    while block < view.num_blocks:
        hop = plan_forward_route(view, start=block, banned=frozenset(bans.banned()))[0]
        stub = peer_pb2_grpc.PeerStub(channels.get(hop.address))
        request = peer_pb2.ForwardRequest(start=hop.start, end=hop.end, hidden=to_message(hidden))
        try:
            reply = await stub.Forward(request, timeout=config.forward_timeout)
        except grpc.aio.AioRpcError as e:
            failure = PeerFailure(e.code(), e.details() or "forward failed", hop.peer_id)
            if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise InvalidInputError(str(failure)) from e
            failures += 1
            bans.ban(hop.peer_id, e.code().name)
            logger.warning(
                "forward retry blocks=[%d,%d) peer=%s reason=%s",
                hop.start,
                hop.end,
                hop.peer_id[-8:],
                e.code().name,
            )
            if failures > config.max_retries:
                raise SwarmUnavailableError(f"forward failed {failures} times; last: {failure}") from e
            view = await discovery.view(refresh=True)
            continue
        output = from_message(
            reply.hidden, max_bytes=config.max_message_bytes, expected_ndim=3, name="hidden"
        )
        if output.shape != hidden.shape:
            raise PeerFailure(
                grpc.StatusCode.INTERNAL, f"forward returned shape {list(output.shape)}", hop.peer_id
            )
        hidden, block = output.to(hidden.dtype), hop.end
    return hidden
