"""When a hop of a step counts as stuck: each hop gets a deadline from what the client expects of it (its
measured step time, else its announced throughput); past it the client pings the hop, and only a hop that
does not answer is blamed, so a slow but alive peer (a long prefill, a busy CPU) is waited on."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc

from client.errors import PeerFailure
from client.route import MIN_THROUGHPUT, Hop
from client.streams import HopStream, rpc_failure
from protos import peer_pb2

if TYPE_CHECKING:
    from client.discovery import SwarmView
    from client.session import StepLog
    from client.swarm import SwarmConnection


@dataclass
class Waiting:
    """A step in flight: it is done when every expected hop has reported its output."""

    log: StepLog
    expect: list[HopStream]  # the last one's output is the step's result
    done: asyncio.Future[None]
    sent_at: float = 0.0  # time.perf_counter() when the step left the client
    # the hops' outputs come back together in the last hop's result (Step.carried), not one by one
    carried: bool = False
    arrivals: dict[int, float] = field(default_factory=dict)  # block -> when the output entering it came

    def complete(self) -> bool:
        return all(stream.hop.end in self.log.inputs for stream in self.expect)

    def pending(self) -> list[HopStream]:
        """The expected hops that have not reported the step yet, in route order."""
        return [stream for stream in self.expect if stream.hop.end not in self.log.inputs]


class HopDeadlines:
    """The deadlines of one inference session's hops; `wait` waits for a step under them."""

    def __init__(self, swarm: SwarmConnection) -> None:
        self.swarm = swarm
        self.config = swarm.config
        self.prior: dict[str, float] = {}  # peer_id -> announced seconds per block of a decode step

    def expect(self, view: SwarmView, hops: list[Hop]) -> None:
        """Remember what the records of newly planned hops announce, for before any measurement."""
        peers = view.peers()
        for hop in hops:
            record = peers[hop.peer_id]
            self.prior[hop.peer_id] = 1.0 / (
                max(record.throughput, MIN_THROUGHPUT) * (record.end - record.start)
            )

    def hop_timeout(self, hop: Hop, positions: int) -> float:
        """Seconds to wait for `hop`'s output of a step of `positions` new positions before pinging it:
        `hop_timeout_factor` times what this client measured of the peer (its announced throughput before
        any measurement), scaled by the positions, between `min_hop_timeout` and `max_hop_timeout`."""
        per_block = self.swarm.stats.block_times().get(hop.peer_id, self.prior.get(hop.peer_id))
        if per_block is None:
            return self.config.max_hop_timeout
        expected = per_block * (hop.end - hop.start) * max(positions, 1)
        timeout = self.config.hop_timeout_factor * expected
        return min(max(timeout, self.config.min_hop_timeout), self.config.max_hop_timeout)

    def chain_timeout(self, waiting: Waiting, pending: list[HopStream], positions: int) -> float:
        """Seconds without progress before the `pending` hops of a step are pinged: the first one's
        `hop_timeout` when each hop reports its output, the sum of theirs when the outputs come back
        together from the last hop (nothing tells how far along the chain the step is)."""
        if waiting.carried:
            return sum(self.hop_timeout(stream.hop, positions) for stream in pending)
        return self.hop_timeout(pending[0].hop, positions)

    async def wait(self, waiting: Waiting) -> None:
        """Wait for the step. When the hops that have not reported it take longer than their
        `chain_timeout`, ping them: the first that does not answer within `ping_timeout` is stuck and
        blamed; hops that answer are alive (a long prefill, a busy CPU) and waited on, up to
        `forward_timeout` in all."""
        give_up = waiting.sent_at + self.config.forward_timeout
        checked = waiting.sent_at  # the last sign of progress: the send, an output, an answered ping
        positions = int(waiting.log.positions.shape[1])
        while True:
            pending = waiting.pending() or waiting.expect[-1:]
            progress = max([checked, *waiting.arrivals.values()])
            timeout = self.chain_timeout(waiting, pending, positions)
            remaining = progress + timeout - time.perf_counter()
            try:
                await asyncio.wait_for(asyncio.shield(waiting.done), max(remaining, 0.0))
                return
            except TimeoutError:
                pass
            if time.perf_counter() > give_up:
                raise PeerFailure(
                    grpc.StatusCode.DEADLINE_EXCEEDED, "step over forward_timeout", pending[0].hop.peer_id
                )
            if time.perf_counter() - progress >= timeout:
                await self.ping(waiting.pending() or pending)
                checked = time.perf_counter()

    async def ping(self, streams: list[HopStream]) -> None:
        """Raise a `PeerFailure` for the first of `streams` whose peer does not answer an Info request."""

        async def ping(stream: HopStream) -> PeerFailure | None:
            stub = self.swarm.channels.stub(
                stream.hop.address, stream.hop.certificate, relay=stream.hop.relay
            )
            try:
                await stub.Info(peer_pb2.InfoRequest(), timeout=self.config.ping_timeout)
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    return PeerFailure(e.code(), "no answer to a step or a ping", stream.hop.peer_id)
                return rpc_failure(e, stream.hop.peer_id, "ping failed")
            return None

        for failure in await asyncio.gather(*(ping(stream) for stream in streams)):
            if failure is not None:
                raise failure
