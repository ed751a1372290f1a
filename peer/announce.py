"""Telling the swarm about this peer: one `PeerRecord` per hosted block in the DHT, refreshed periodically,
with the peer's lifecycle state (JOINING, ONLINE, DRAINING, OFFLINE); the claim protocol and the Rebalancer.
The span arithmetic they act on lives in `peer.placement`."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Mapping

from hivemind.dht.node import DHTNode
from hivemind.utils.timed_storage import get_dht_time

from peer.placement import (
    COUNTED_STATES,
    MIN_CONTRIBUTION,
    block_throughputs,
    choose_span,
    placement_of,
    plan_move,
    weaker,
)
from protos.records import MODEL_INDEX_KEY, PeerRecord, PeerState, block_key, record_to_dht

logger = logging.getLogger(__name__)


class Announcer:
    """Stores this peer's records under `{model_id}.{block}` with subkey = the peer's DHT id.

    Records expire after twice the period, so a peer that dies without a word disappears on its own.
    `make_record(state, span)` builds the record with current numbers (free cache, throughput); `span` is
    what the peer serves or, while it loads one, the span it claimed.
    """

    def __init__(
        self,
        node: DHTNode,
        *,
        model_id: str,
        num_blocks: int | None,
        span: tuple[int, int],
        make_record: Callable[[PeerState, tuple[int, int]], PeerRecord],
        period: float,
    ) -> None:
        self.node = node
        self.model_id = model_id
        self.num_blocks = num_blocks
        self.span = span
        self.make_record = make_record
        self.period = period
        self.state = PeerState.JOINING
        self._task: asyncio.Task[None] | None = None

    @property
    def peer_id(self) -> str:
        return self.node.peer_id.to_base58()

    async def announce(self, state: PeerState | None = None) -> bool:
        """Store the records now; True when every block's record was stored somewhere."""
        if state is not None:
            self.state = state
        record = record_to_dht(self.make_record(self.state, self.span))
        expiration = get_dht_time() + 2 * self.period
        block_keys = [block_key(self.model_id, block) for block in range(*self.span)]
        keys, values = list(block_keys), [record] * len(block_keys)
        subkeys: list[str] = [self.peer_id] * len(block_keys)
        if self.num_blocks is not None:  # known once the model's config is read
            keys.append(MODEL_INDEX_KEY)  # each peer's own entry: only its key can sign it
            values.append({"model_id": self.model_id, "num_blocks": self.num_blocks})
            subkeys.append(self.peer_id)
        stored = await self.node.store_many(keys, values, expiration, subkeys=subkeys)
        ok = all(stored.get((key, self.peer_id), False) for key in block_keys)
        if not ok:
            logger.warning("announce incomplete model=%s state=%s", self.model_id, self.state)
        return ok

    def start(self) -> None:
        self._task = asyncio.create_task(self._refresh_forever(), name="corolla-announce")

    async def _refresh_forever(self) -> None:
        while True:
            # jitter spreads the refreshes of peers that started together
            await asyncio.sleep(self.period * random.uniform(0.8, 1.0))
            try:
                await self.announce()
            except Exception:  # keep announcing through a transient DHT failure
                logger.warning("announce failed model=%s", self.model_id, exc_info=True)

    async def stop(self, *, final_state: PeerState = PeerState.OFFLINE) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        try:
            await asyncio.wait_for(self.announce(final_state), timeout=5)
        except Exception as e:  # whatever failed, the caller's shutdown goes on: records expire by themselves
            logger.warning("final announce failed state=%s reason=%r", final_state, e)


# ---- claiming a span and moving: the peer's side of balancing ----------------------------------------

ReadRecords = Callable[[], Awaitable[Mapping[str, PeerRecord]]]
CLAIM_ROUNDS = 6  # bounds the claim protocol; rebalancing fixes whatever it leaves
QUIET_READS = 2  # reads in a row without a reason to move that end a claim


async def claim_span(
    announcer: Announcer,
    read: ReadRecords,
    *,
    num_blocks: int,
    length: int,
    settle: float,
    jitter: float,
) -> tuple[int, int]:
    """Choose this peer's span from the swarm's coverage and claim it (JOINING records) before loading.

    Peers that start together could all see the same empty swarm and choose the same span, so each claim
    is read back after `settle` seconds: a peer whose span overlaps the claim of a peer with a smaller id
    takes a less covered span when there is one, until two reads in a row find nothing to change.
    A failed read counts as an empty swarm; rebalancing corrects a poor choice later.
    """
    me = announcer.peer_id

    async def read_or_empty() -> Mapping[str, PeerRecord]:
        try:
            return await read()
        except Exception as e:  # a DHT hiccup must not stop the peer from starting
            logger.warning("reading the swarm failed while choosing a span reason=%r", e)
            return {}

    await asyncio.sleep(random.uniform(0.0, jitter))
    span = choose_span(block_throughputs(await read_or_empty(), num_blocks, exclude=me), length)
    quiet = 0
    for _ in range(CLAIM_ROUNDS):
        announcer.span = span
        await announcer.announce(PeerState.JOINING)
        await asyncio.sleep(settle)
        records = await read_or_empty()
        others = block_throughputs(records, num_blocks, exclude=me)
        better = choose_span(others, length)
        yields = any(
            peer_id < me
            and record.state in COUNTED_STATES
            and record.start < span[1]
            and span[0] < record.end
            for peer_id, record in records.items()
        )
        if yields and better != span and weaker(others, better, span):
            logger.info("span claim moved from=[%d,%d) to=[%d,%d)", *span, *better)
            span, quiet = better, 0
            continue
        quiet += 1
        if quiet >= QUIET_READS:
            break
    return span


class Rebalancer:
    """Every `period` (with jitter) re-reads the swarm; when `plan_move` finds a clearly better span, claims
    it, confirms the gain after `settle` seconds, and calls `move(span)` (load, swap, drain, free)."""

    def __init__(
        self,
        announcer: Announcer,
        read: ReadRecords,
        *,
        num_blocks: int,
        throughput: Callable[[], float],
        move: Callable[[tuple[int, int]], Awaitable[None]],
        period: float,
        margin: float,
        settle: float,
    ) -> None:
        self.announcer = announcer
        self.read = read
        self.num_blocks = num_blocks
        self.throughput = throughput
        self.move = move
        self.period = period
        self.margin = margin
        self.settle = settle
        self.moves = 0

    async def run_forever(self) -> None:
        while True:
            await asyncio.sleep(self.period * random.uniform(0.5, 1.5))
            try:
                await self.check()
            except asyncio.CancelledError:
                raise
            except Exception:  # a failed check or move leaves the peer serving its span
                logger.warning("rebalance check failed", exc_info=True)

    async def check(self) -> tuple[int, int] | None:
        """One evaluation; returns the new span when the peer moved."""
        current = self.announcer.span
        target = self._plan(await self.read(), current)
        if target is None:
            return None
        self.announcer.span = target
        moved = False
        try:
            await self.announcer.announce(PeerState.JOINING)
            await asyncio.sleep(self.settle)
            if self._plan(await self.read(), current) != target:
                logger.info("move abandoned: the swarm changed meanwhile span=[%d,%d)", *current)
                return None
            logger.warning("rebalancing: moving blocks=[%d,%d) -> [%d,%d)", *current, *target)
            await self.move(target)
            moved = True
        except asyncio.CancelledError:
            moved = True  # shutting down: the final announcement says OFFLINE
            self.announcer.span = current
            raise
        finally:
            if not moved:  # abandoned or failed: serve and announce the current span again
                self.announcer.span = current
                await self.announcer.announce(PeerState.ONLINE)
        self.moves += 1
        return target

    def _plan(self, records: Mapping[str, PeerRecord], current: tuple[int, int]) -> tuple[int, int] | None:
        me = self.announcer.peer_id
        speed = self.throughput()
        placement = placement_of(records, self.num_blocks)
        placement[me] = (*current, max(speed, MIN_CONTRIBUTION))  # where this peer serves, not its claim
        others = block_throughputs(records, self.num_blocks, exclude=me)
        return plan_move(others, current, speed, self.margin, placement=placement, me=me)
