"""Where a peer should serve: pure placement arithmetic over the swarm's announced spans and throughputs.

No DHT, no clocks, no randomness: records in, spans out; `peer.announce` does the I/O and the claim protocol.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from protos.errors import InvalidInputError
from protos.records import PeerRecord, PeerState

MIN_CONTRIBUTION = 1e-6  # a peer that announces 0 (still measuring) still counts as covering its blocks
COUNTED_STATES = (PeerState.ONLINE, PeerState.JOINING)  # a joining peer has claimed its span


def block_throughputs(
    records: Mapping[str, PeerRecord], num_blocks: int, *, exclude: str | None = None
) -> list[float]:
    """Summed throughput (steps/s) per block of the ONLINE and JOINING peers, leaving out `exclude`."""
    totals = [0.0] * num_blocks
    for peer_id, record in records.items():
        if peer_id == exclude or record.state not in COUNTED_STATES or record.end > num_blocks:
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


def weaker(throughputs: Sequence[float], span: tuple[int, int], other: tuple[int, int]) -> bool:
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
        if r.state in COUNTED_STATES and r.end <= num_blocks
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
            if best != (start, end) and weaker(totals, best, (start, end)):
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
    if target == current or not weaker(others, target, current):
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
