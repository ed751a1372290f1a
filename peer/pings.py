"""Round trips from this peer to the peers that may follow it on a route, measured in the background and
announced in its record (`PeerRecord.pings`, at most `MAX_PINGS`), so that clients can weigh the links of a
chain they do not travel themselves (`client/route.py`). Knows records and `Info` calls, not the blocks."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping

import grpc

from protos import peer_pb2, tls
from protos.channels import ChannelPool
from protos.records import MAX_PINGS, PeerRecord, PeerState

logger = logging.getLogger(__name__)

PING_TIMEOUT = 2.0  # seconds one Info call may take; a peer that does not answer in time is not announced
PING_TRIES = 2  # calls per peer and round, the quickest counts: the first on a new channel also connects
MAX_CONCURRENT_PINGS = 8  # peers called at once in a round


def next_hop_candidates(
    records: Mapping[str, PeerRecord], *, peer_id: str, span: tuple[int, int], limit: int = MAX_PINGS
) -> list[str]:
    """The ONLINE peers that may follow `peer_id` (serving `span`) on a route, at most `limit`: first those
    serving the block right after the span, then those whose span starts inside it (a route may leave this
    peer at any such start). Within each group the order is a hash of both ids: the same from one round to
    the next, and the peers before a block with many replicas do not all pick the same few of them."""
    start, end = span

    def rank(other: str) -> bytes:
        return hashlib.blake2b(f"{peer_id} {other}".encode(), digest_size=8).digest()

    following: list[str] = []
    inside: list[str] = []
    for other, record in records.items():
        if other == peer_id or record.state is not PeerState.ONLINE:
            continue
        if record.start <= end < record.end:
            following.append(other)
        elif start < record.start < end:
            inside.append(other)
    return [*sorted(following, key=rank), *sorted(inside, key=rank)][: max(limit, 0)]


class Pinger:
    """Every `period` seconds: read the swarm, call `Info` on the next-hop candidates (`next_hop_candidates`;
    at most `MAX_CONCURRENT_PINGS` at once, each call within `timeout`) and keep in `pings` the quickest of
    `PING_TRIES` round trips of each peer that answered. A peer that did not answer, or answered with
    another peer id (its record names someone else's address), is left out; a failed round keeps the last."""

    def __init__(
        self,
        *,
        peer_id: str,
        span: Callable[[], tuple[int, int]],
        read_records: Callable[[], Awaitable[dict[str, PeerRecord]]],
        channels: ChannelPool,
        period: float,
        timeout: float = PING_TIMEOUT,
    ) -> None:
        self.peer_id = peer_id
        self.span = span
        self.read_records = read_records
        self.channels = channels
        self.period = period
        self.timeout = timeout
        self.pings: dict[str, float] = {}  # peer_id -> seconds of a round trip, what the record announces

    async def run_forever(self) -> None:
        while True:
            try:
                await self.ping_round()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a failed DHT read: the last round's pings stand
                logger.debug("ping round failed reason=%r", e)
            await asyncio.sleep(self.period)

    async def ping_round(self) -> dict[str, float]:
        """One round; returns (and keeps) the round trips measured."""
        records = await self.read_records()
        candidates = next_hop_candidates(records, peer_id=self.peer_id, span=self.span(), limit=len(records))
        chosen = [peer_id for peer_id in candidates if self._callable(peer_id, records[peer_id])][:MAX_PINGS]
        slots = asyncio.Semaphore(MAX_CONCURRENT_PINGS)
        measured = await asyncio.gather(*(self._ping(peer_id, records[peer_id], slots) for peer_id in chosen))
        self.pings = {
            peer_id: seconds for peer_id, seconds in zip(chosen, measured, strict=True) if seconds is not None
        }
        logger.debug("ping round candidates=%d answered=%d", len(chosen), len(self.pings))
        return dict(self.pings)

    def _callable(self, peer_id: str, record: PeerRecord) -> bool:
        """A TLS pool calls only peers whose certificate binds to their id (as pushes do), a plaintext any."""
        if self.channels.insecure:
            return True
        return record.certificate is not None and tls.binds(record.certificate.encode(), peer_id)

    async def _ping(self, peer_id: str, record: PeerRecord, slots: asyncio.Semaphore) -> float | None:
        best: float | None = None
        async with slots:
            try:
                stub = self.channels.record_stub(peer_id, record)
                for _ in range(PING_TRIES):
                    started = time.perf_counter()
                    reply = await stub.Info(peer_pb2.InfoRequest(), timeout=self.timeout)
                    seconds = time.perf_counter() - started
                    if reply.peer_id != peer_id:
                        logger.debug("ping answered by another peer peer=...%s", peer_id[-8:])
                        return None
                    best = seconds if best is None else min(best, seconds)
            except grpc.aio.AioRpcError as e:
                logger.debug("ping failed peer=...%s code=%s", peer_id[-8:], e.code().name)
            except Exception as e:  # e.g. a record the pool cannot dial: not announced, never fatal
                logger.debug("ping failed peer=...%s reason=%r", peer_id[-8:], e)
        return best
