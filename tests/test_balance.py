"""Span choice and rebalancing: pure placement tables, and the claim/move protocols on an in-memory swarm."""

from __future__ import annotations

import asyncio
import copy
import json

import pytest
from records_factory import peer_record

from peer import throughput
from peer.announce import Rebalancer, claim_span
from peer.blocks import HostedSpan
from peer.config import parse_option
from peer.placement import block_throughputs, choose_span, plan_move
from protos.errors import InvalidInputError
from protos.records import PeerRecord, PeerState

T = 100.0


@pytest.mark.parametrize(
    ("throughputs", "length", "expected"),
    [
        ([0.0] * 30, 10, (0, 10)),  # an empty swarm: the first blocks
        ([T] * 10 + [0.0] * 20, 10, (10, 20)),  # the first blocks nobody serves
        ([T] * 20 + [0.0] * 10, 10, (20, 30)),
        ([100.0] * 10 + [80.0] * 10 + [120.0] * 10, 10, (10, 20)),  # the weakest part
        ([5.0, 5.0, 1.0, 1.0, 5.0, 5.0], 2, (2, 4)),
        ([0.0, 5.0, 5.0, 0.0, 5.0], 3, (0, 3)),  # ties on the sorted window go to the lowest start
        ([5.0, 0.0, 5.0, 0.0, 5.0], 3, (1, 4)),  # two unserved blocks beat one
        ([1.0, 2.0, 3.0], 10, (0, 3)),  # longer than the model: all of it
        ([T] * 10 + [50.0] * 5 + [T] * 15, 10, (5, 15)),  # the weak blocks inside, lowest start
    ],
)
def test_choose_span(throughputs: list[float], length: int, expected: tuple[int, int]) -> None:
    assert choose_span(throughputs, length) == expected


def test_choose_span_rejects_empty() -> None:
    with pytest.raises(InvalidInputError):
        choose_span([], 3)
    with pytest.raises(InvalidInputError):
        choose_span([1.0], 0)


@pytest.mark.parametrize(
    ("others", "current", "speed", "margin", "expected"),
    [
        # a duplicate of [0,10) fills the hole another peer left
        ([T] * 10 + [0.0] * 10 + [T] * 10, (0, 10), T, 0.2, (10, 20)),
        # the only server of its blocks stays
        ([0.0] * 10 + [T] * 20, (0, 10), T, 0.2, None),
        # a gain of 11% is under the 20% margin ...
        ([100.0] * 10 + [90.0] * 10 + [100.0] * 10, (0, 10), 10.0, 0.2, None),
        # ... and over a 5% one
        ([100.0] * 10 + [90.0] * 10 + [100.0] * 10, (0, 10), 10.0, 0.05, (10, 20)),
        # doubling the bottleneck
        ([100.0] * 10 + [50.0] * 10 + [100.0] * 10, (0, 10), 50.0, 0.2, (10, 20)),
        # already where it helps most
        ([100.0] * 10 + [50.0] * 10 + [100.0] * 10, (10, 20), 50.0, 0.2, None),
        # nothing can fix every block, but fewer blocks go unserved
        ([T] * 5 + [0.0] * 15 + [T] * 10, (0, 10), T, 0.2, (5, 15)),
        # moving would open a new hole as large as the one it closes
        ([0.0] * 10 + [T] * 10 + [0.0] * 10, (0, 10), T, 0.2, None),
    ],
)
def test_plan_move(
    others: list[float],
    current: tuple[int, int],
    speed: float,
    margin: float,
    expected: tuple[int, int] | None,
) -> None:
    assert plan_move(others, current, speed, margin) == expected


def test_block_throughputs_count_online_and_joining_only() -> None:
    records = {
        "A": peer_record(0, 2, 10.0),
        "B": peer_record(1, 3, 5.0, PeerState.JOINING),
        "C": peer_record(0, 3, 7.0, PeerState.DRAINING),
        "D": peer_record(2, 3, 0.0),  # still measuring: counts as covering
        "E": peer_record(0, 3, 1.0, PeerState.OFFLINE),
    }
    totals = block_throughputs(records, 3)
    assert totals[:2] == [10.0, 15.0] and 5.0 < totals[2] < 5.001
    assert block_throughputs(records, 3, exclude="A")[0] == 0.0


class FakeSwarm:
    """Peers' latest records in memory, as `read_records` returns them."""

    def __init__(self) -> None:
        self.records: dict[str, PeerRecord] = {}

    async def read(self) -> dict[str, PeerRecord]:
        await asyncio.sleep(0)
        return dict(self.records)


class FakeAnnouncer:
    def __init__(self, swarm: FakeSwarm, peer_id: str, span: tuple[int, int], speed: float = T) -> None:
        self.swarm, self.peer_id, self.span, self.speed = swarm, peer_id, span, speed
        self.state = PeerState.JOINING

    async def announce(self, state: PeerState | None = None) -> bool:
        self.state = state or self.state
        self.swarm.records[self.peer_id] = peer_record(*self.span, self.speed, self.state)
        await asyncio.sleep(0)
        return True


async def _claim_all(swarm: FakeSwarm, announcers: list[FakeAnnouncer]) -> list[tuple[int, int]]:
    claims = [
        claim_span(a, swarm.read, num_blocks=30, length=10, settle=0.01, jitter=0.0)  # type: ignore[arg-type]
        for a in announcers
    ]
    return list(await asyncio.gather(*claims))


def test_peers_starting_together_claim_different_spans() -> None:
    swarm = FakeSwarm()
    announcers = [FakeAnnouncer(swarm, peer_id, (0, 1)) for peer_id in ("Pc", "Pa", "Pb")]
    spans = asyncio.run(_claim_all(swarm, announcers))
    assert sorted(spans) == [(0, 10), (10, 20), (20, 30)]


def _rebalancer(swarm: FakeSwarm, announcer: FakeAnnouncer, moved: list[tuple[str, tuple[int, int]]]):
    async def move(span: tuple[int, int]) -> None:
        moved.append((announcer.peer_id, span))
        await announcer.announce(PeerState.ONLINE)

    return Rebalancer(
        announcer,  # type: ignore[arg-type]
        swarm.read,
        num_blocks=30,
        throughput=lambda: announcer.speed,
        move=move,
        period=1.0,
        margin=0.2,
        settle=0.0,
    )


def test_stable_swarm_never_moves_and_a_hole_is_filled() -> None:
    async def scenario() -> None:
        swarm = FakeSwarm()
        peers = {
            "A": FakeAnnouncer(swarm, "A", (0, 10), 120.0),
            "B": FakeAnnouncer(swarm, "B", (10, 20), 90.0),
            "C": FakeAnnouncer(swarm, "C", (20, 30), 100.0),
            "D": FakeAnnouncer(swarm, "D", (10, 20), 40.0),
            "E": FakeAnnouncer(swarm, "E", (0, 10), 30.0),
        }
        for announcer in peers.values():
            await announcer.announce(PeerState.ONLINE)
        moved: list[tuple[str, tuple[int, int]]] = []
        balancers = {peer_id: _rebalancer(swarm, a, moved) for peer_id, a in peers.items()}
        for _ in range(50):  # many periods, every peer checks in turn
            for balancer in balancers.values():
                await balancer.check()
        assert moved == []
        assert {p: a.span for p, a in peers.items()}["D"] == (10, 20)

        # C leaves: [20,30) is unserved until a peer moves there; a few moves later (each one raising the
        # bottleneck by more than the margin) the swarm reaches the best placement and stays there
        del swarm.records["C"], balancers["C"]
        for _ in range(20):
            for balancer in balancers.values():
                await balancer.check()
        settled = len(moved)
        assert 1 <= settled <= 3
        assert min(block_throughputs(swarm.records, 30)) == 70.0  # {A}, {B}, {D, E}: the optimum
        assert all(record.state is PeerState.ONLINE for record in swarm.records.values())
        for _ in range(20):
            for balancer in balancers.values():
                await balancer.check()
        assert len(moved) == settled

    asyncio.run(scenario())


def test_move_abandoned_when_another_peer_filled_the_hole() -> None:
    async def scenario() -> None:
        swarm = FakeSwarm()
        a = FakeAnnouncer(swarm, "A", (0, 10))
        b = FakeAnnouncer(swarm, "B", (0, 10))
        c = FakeAnnouncer(swarm, "C", (20, 30))
        for announcer in (a, b, c):
            await announcer.announce(PeerState.ONLINE)
        moved: list[tuple[str, tuple[int, int]]] = []
        balancer = _rebalancer(swarm, a, moved)
        original = swarm.read

        async def read_then_b_moves() -> dict[str, PeerRecord]:
            records = await original()
            b.span = (10, 20)  # B claims the hole while A waits for its claim to settle
            await b.announce(PeerState.JOINING)
            return records

        balancer.read = read_then_b_moves
        assert await balancer.check() is None
        assert moved == [] and a.span == (0, 10) and swarm.records["A"].state is PeerState.ONLINE

    asyncio.run(scenario())


def test_throughput_is_measured_once_and_cached(tmp_path, local) -> None:
    span = HostedSpan.from_model(copy.deepcopy(local), 0, 2)
    key = throughput.cache_key(span, "llama", "test")
    assert "float32" in key and "cpu-" in key
    first = throughput.resolve("auto", span, key=key, cache_dir=tmp_path)
    assert first.decode_rps > 0 and first.forward_tps > 0
    assert first.batch_tps > 0  # the tiny Llama batches: its batched decode is measured too
    cached = json.loads((tmp_path / throughput.CACHE_FILE).read_text())
    assert set(cached) == {key}
    cached[key]["decode_rps"] = 1234.5  # a later run reads the cache instead of measuring
    (tmp_path / throughput.CACHE_FILE).write_text(json.dumps(cached))
    assert throughput.resolve("auto", span, key=key, cache_dir=tmp_path).decode_rps == 1234.5
    assert throughput.resolve("eval", span, key=key, cache_dir=tmp_path).decode_rps != 1234.5
    assert throughput.resolve("42", span, key=key, cache_dir=tmp_path).decode_rps == 42.0
    del cached[key]["batch_tps"]  # an entry written before batching was measured still reads
    (tmp_path / throughput.CACHE_FILE).write_text(json.dumps(cached))
    assert throughput.resolve("auto", span, key=key, cache_dir=tmp_path).batch_tps == 0.0
    (tmp_path / throughput.CACHE_FILE).write_text("garbage{")  # a broken cache is measured over
    assert throughput.resolve("auto", span, key=key, cache_dir=tmp_path).decode_rps > 0


def test_announced_throughput_divides_by_blocks_and_respects_bandwidth() -> None:
    speed = throughput.Throughput(decode_rps=300.0, forward_tps=6000.0)
    assert speed.for_span(10) == (30.0, 600.0)
    link = throughput.network_rps(1.0, hidden_size=1000, bytes_per_value=4)  # 1 Mbit/s, 64 kbit per step
    assert link == pytest.approx(15.625)
    assert speed.for_span(10, link)[0] == pytest.approx(15.625)


@pytest.mark.parametrize("value", ["fast", "-1", "0", "inf", "nan"])
def test_throughput_option_rejects(value: str) -> None:
    with pytest.raises(InvalidInputError):
        parse_option(value)


def test_plan_move_counts_the_moves_it_lets_others_make() -> None:
    """A at [2,5) moving to [0,3) leaves the bottleneck at 1 by itself, but then D and C can take better
    spans, which together raise it by more than the margin; alone, the move is not worth it."""
    placement = {"A": (2, 5, 4.0), "B": (4, 6, 3.0), "C": (0, 3, 1.0), "D": (2, 5, 1.0)}
    others = [1.0, 1.0, 2.0, 1.0, 4.0, 3.0]  # B, C and D per block
    assert plan_move(others, (2, 5), 4.0, 0.2) is None
    assert plan_move(others, (2, 5), 4.0, 0.2, placement=placement, me="A") == (0, 3)
    assert plan_move(others, (2, 5), 4.0, 10.0, placement=placement, me="A") is None  # under a huge margin
