"""The client's own round trips to peers: `Info` calls to the usable peers of a swarm view, averaged in
`PeerStats` for route planning (`client/route.py`), which adds the links between peers from their records.
Knows channels and records, not routes or sessions."""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import Collection, Mapping

import grpc

from client.errors import short_id
from client.route import PeerStats
from protos import peer_pb2
from protos.channels import ChannelPool
from protos.records import PeerRecord

logger = logging.getLogger(__name__)

RTT_TIMEOUT = 2.0  # seconds one Info call may take; a peer that does not answer stays unmeasured
RTT_TRIES = 2  # calls per measurement, the quickest counts: the first on a new channel also connects
RTT_PERIOD = 60.0  # seconds before a peer is measured again (answered or not)
FORGET_PERIOD = 10 * RTT_PERIOD  # a peer not called for this long counts as new again
MAX_CONCURRENT_PINGS = 16  # peers called at once
MAX_PINGS_PER_PLAN = 64  # peers a plan starts measuring; the rest wait for later plans
MAX_WAIT = 1.0  # seconds after the first call to a peer that plans wait for its answer
CONNECT_ROUND_TRIPS = 3  # a first call's round trips: TCP, TLS and the call itself


class Latency:
    """Measures round trips from this client to peers; `rtts()` is what route planning uses.

    `measure` holds a plan up only for the first call to a peer, and never past `MAX_WAIT` seconds after
    that call began: a swarm's first plan (every peer new) waits for their answers or the timeout, so that
    its first route already knows near from far: on a LAN within milliseconds, a peer 250 ms away (a TLS
    handshake and two calls) within the second; plans made meanwhile (a gateway's first users) wait for the
    same calls. Later plans, a failover's included, wait only for peers new to the client: stale
    measurements are renewed in the background, and calls still under way when a wait ends finish there
    too, for the next plan. A peer that does not answer stays unmeasured (planned at the default round
    trip) and is not called again for `RTT_PERIOD`. Each measurement is the quickest of `RTT_TRIES`
    calls; until the second answers, `rtts()` offers the first (which includes connecting: an
    overestimate, so a far peer never looks near). Planning stays pure: it gets `rtts()`, a mapping."""

    def __init__(self, channels: ChannelPool, stats: PeerStats) -> None:
        self.channels = channels
        self.stats = stats
        self._tried_at: dict[str, float] = {}  # peer_id -> when its last measurement began (monotonic)
        self._first_at: dict[str, float] = {}  # peer_id -> when its first measurement began
        self._first: dict[str, float] = {}  # peer_id -> the first try of a measurement under way
        self._running: dict[str, asyncio.Task[None]] = {}
        self._slots = asyncio.Semaphore(MAX_CONCURRENT_PINGS)

    def rtts(self) -> dict[str, float]:
        """peer_id -> seconds of a round trip from this client, for the peers measured so far; a peer whose
        first call has not answered yet counts as at least a third of the time it has taken (a TCP and a
        TLS handshake and the call: a peer that slow is not near, whatever the default says)."""
        measured = self.stats.rtts()
        now = time.monotonic()
        pending = {
            peer_id: (now - self._tried_at[peer_id]) / CONNECT_ROUND_TRIPS
            for peer_id in self._running
            if peer_id not in self._first and peer_id not in measured
        }
        return {**pending, **self._first, **measured}

    async def measure(
        self,
        records: Mapping[str, PeerRecord],
        *,
        first: Collection[str] = (),
        wait: float = MAX_WAIT,
    ) -> None:
        """Start measuring the peers of `records` not called within `RTT_PERIOD`, at most
        `MAX_PINGS_PER_PLAN`: those never called first, then those in `first` (a route's possible first and
        last hops), then the longest ago. Wait for the first measurement of a peer, never past `wait`
        seconds after it began."""
        now = time.monotonic()
        self._tried_at = {p: at for p, at in self._tried_at.items() if now - at < FORGET_PERIOD}
        self._first_at = {p: at for p, at in self._first_at.items() if p in self._tried_at}
        due = [
            p
            for p in records
            if now - self._tried_at.get(p, -math.inf) >= RTT_PERIOD and p not in self._running
        ]
        due.sort(key=lambda p: (p in self._tried_at, p not in first, self._tried_at.get(p, 0.0), p))
        for peer_id in due[:MAX_PINGS_PER_PLAN]:
            self._first_at.setdefault(peer_id, now)
            self._tried_at[peer_id] = now
            task = asyncio.create_task(self._measure(peer_id, records[peer_id]), name="corolla-rtt")
            self._running[peer_id] = task
            task.add_done_callback(functools.partial(self._finished, peer_id))
        # first calls under way, this plan's or a concurrent one's: wait until `wait` after they began
        first_calls = {
            p: task
            for p, task in self._running.items()
            if p in records and self._first_at[p] == self._tried_at[p]
        }
        timeout = max((self._first_at[p] for p in first_calls), default=now) + wait - now
        if first_calls and timeout > 0:
            await asyncio.wait(first_calls.values(), timeout=timeout)
            logger.debug(
                "round trips new=%d measured=%d seconds=%.3f",
                len(first_calls),
                sum(1 for p in first_calls if p in self.stats.rtt_samples),
                time.monotonic() - now,
            )

    def _finished(self, peer_id: str, task: asyncio.Task[None]) -> None:
        if self._running.get(peer_id) is task:
            del self._running[peer_id]

    async def _measure(self, peer_id: str, record: PeerRecord) -> None:
        best: float | None = None
        async with self._slots:
            try:
                stub = self.channels.record_stub(peer_id, record)
                for _ in range(RTT_TRIES):
                    started = time.perf_counter()
                    reply = await stub.Info(peer_pb2.InfoRequest(), timeout=RTT_TIMEOUT)
                    seconds = time.perf_counter() - started
                    if reply.peer_id != peer_id:  # a record naming another peer's address: not this one
                        logger.debug(
                            "round trip not measured peer=%s: another peer answered", short_id(peer_id)
                        )
                        return
                    best = seconds if best is None else min(best, seconds)
                    self._first.setdefault(peer_id, best)
            except grpc.aio.AioRpcError as e:  # no answer: the peer stays unmeasured; bans are not ours
                logger.debug("round trip not measured peer=%s code=%s", short_id(peer_id), e.code().name)
            except Exception as e:  # a record the pool cannot dial, say: never the plan's failure
                logger.debug("round trip not measured peer=%s reason=%r", short_id(peer_id), e)
            finally:
                self._first.pop(peer_id, None)
        if best is not None:
            self.stats.observe_rtt(peer_id, best)

    async def close(self) -> None:
        """Cancel the measurements under way."""
        running = list(self._running.values())
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
