"""Telling the swarm about this peer: one `PeerRecord` per hosted block in the DHT, refreshed periodically,
with the peer's lifecycle state (JOINING, ONLINE, DRAINING, OFFLINE)."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence

from hivemind.dht.node import DHTNode
from hivemind.utils.timed_storage import get_dht_time

from protos.errors import InvalidInputError
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
            keys.append(MODEL_INDEX_KEY)
            values.append({"num_blocks": self.num_blocks})
            subkeys.append(self.model_id)
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
        except (TimeoutError, OSError) as e:
            logger.warning("final announce failed state=%s reason=%r", final_state, e)


# ---- where to serve: pure placement arithmetic -------------------------------------------------------

MIN_CONTRIBUTION = 1e-6  # a peer that announces 0 (still measuring) still counts as covering its blocks
_COUNTED = (PeerState.ONLINE, PeerState.JOINING)  # a joining peer has claimed its span


def block_throughputs(
    records: Mapping[str, PeerRecord], num_blocks: int, *, exclude: str | None = None
) -> list[float]:
    """Summed throughput (steps/s) per block of the ONLINE and JOINING peers, leaving out `exclude`."""
    totals = [0.0] * num_blocks
    for peer_id, record in records.items():
        if peer_id == exclude or record.state not in _COUNTED or record.end > num_blocks:
            continue
        for block in range(record.start, record.end):
            totals[block] += max(record.throughput, MIN_CONTRIBUTION)
    return totals


def choose_span(throughputs: Sequence[float], length: int) -> tuple[int, int]:
    """The `length` contiguous blocks where a new peer helps most: the window whose throughputs, sorted
    ascending, are lexicographically smallest (the most blocks at the weakest level); ties go to the
    lowest start. `length` is clipped to the model."""
    if not throughputs or length < 1:
        raise InvalidInputError("need at least one block and a span length >= 1")
    length = min(length, len(throughputs))
    best = min(range(len(throughputs) - length + 1), key=lambda s: (sorted(throughputs[s : s + length]), s))
    return best, best + length


def _weaker(throughputs: Sequence[float], span: tuple[int, int], other: tuple[int, int]) -> bool:
    """Whether `span` is strictly needier than `other`, by the order `choose_span` uses."""
    return sorted(throughputs[span[0] : span[1]]) < sorted(throughputs[other[0] : other[1]])


def swarm_quality(throughputs: Sequence[float]) -> tuple[float, int]:
    """(bottleneck throughput, minus the number of unserved blocks): larger is better."""
    return min(throughputs), -sum(value <= 0 for value in throughputs)


Placement = Mapping[str, tuple[int, int, float]]  # peer_id -> (start, end, steps/s through the span)
SIMULATED_PEERS = 32  # larger swarms skip the simulation of everyone's replies (quadratic work)
SIMULATED_ROUNDS = 8


def placement_of(records: Mapping[str, PeerRecord], num_blocks: int) -> dict[str, tuple[int, int, float]]:
    """The spans of the ONLINE and JOINING peers, as `plan_move` simulates them."""
    return {
        peer_id: (r.start, r.end, max(r.throughput, MIN_CONTRIBUTION))
        for peer_id, r in records.items()
        if r.state in _COUNTED and r.end <= num_blocks
    }


def _totals(placement: Placement, num_blocks: int) -> list[float]:
    totals = [0.0] * num_blocks
    for start, end, speed in placement.values():
        for block in range(start, end):
            totals[block] += speed
    return totals


def _settle(placement: dict[str, tuple[int, int, float]], num_blocks: int) -> list[float]:
    """Every peer in turn (by id) takes its best span given the others, until a round changes nothing;
    returns the per-block totals reached."""
    totals = _totals(placement, num_blocks)
    for _ in range(SIMULATED_ROUNDS):
        changed = False
        for peer_id in sorted(placement):
            start, end, speed = placement[peer_id]
            for block in range(start, end):
                totals[block] -= speed
            best = choose_span(totals, end - start)
            if best != (start, end) and _weaker(totals, best, (start, end)):
                placement[peer_id] = (*best, speed)
                start, end, changed = *best, True
            for block in range(start, end):
                totals[block] += speed
        if not changed:
            break
    return totals


def plan_move(
    others: Sequence[float],
    current: tuple[int, int],
    throughput: float,
    margin: float,
    *,
    placement: Placement | None = None,
    me: str = "",
) -> tuple[int, int] | None:
    """Where this peer should move, or None. `others` is every other peer's per-block throughput.

    A move must raise the swarm's bottleneck by more than `margin` (relative), or serve blocks that nobody
    serves without leaving any unserved: small gains are not worth a reload and would make peers flap.
    When this move alone does not, but `placement` (every peer's span, this one's under `me`) is given for
    a swarm of at most `SIMULATED_PEERS`, the move also counts with the moves it lets other peers make:
    the swarm is simulated with this peer moved and every peer then taking its best span in turn.
    """
    length = current[1] - current[0]
    target = choose_span(others, length)
    if target == current or not _weaker(others, target, current):
        return None
    contribution = max(throughput, MIN_CONTRIBUTION)

    def with_me(span: tuple[int, int]) -> list[float]:
        return [value + contribution * (span[0] <= b < span[1]) for b, value in enumerate(others)]

    (now_min, now_unserved), (then_min, then_unserved) = (
        swarm_quality(with_me(current)),
        swarm_quality(with_me(target)),
    )
    if _clearly_better(now_min, then_min, margin):
        return target
    if now_min <= 0 and then_unserved > now_unserved:  # fewer unserved blocks (counts are negated)
        return target
    if placement is None or len(placement) > SIMULATED_PEERS or me not in placement:
        return None
    simulated = dict(placement)
    simulated[me] = (*target, contribution)
    if _clearly_better(now_min, min(_settle(simulated, len(others))), margin):
        return target
    return None


def _clearly_better(now: float, then: float, margin: float) -> bool:
    return then > now * (1.0 + margin) and then > now


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
            peer_id < me and record.state in _COUNTED and record.start < span[1] and span[0] < record.end
            for peer_id, record in records.items()
        )
        if yields and better != span and _weaker(others, better, span):
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
