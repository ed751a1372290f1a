"""Route planning on small synthetic swarms: exact routes for inference, weighted draws for forward."""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter

import pytest
from records_factory import peer_record as record

import client.prefixes
import client.route
from client.discovery import SwarmView
from client.route import (
    Hop,
    NoRouteError,
    missing_blocks,
    plan_forward_route,
    plan_inference_route,
)
from protos.errors import InvalidInputError
from protos.records import PeerRecord, PeerState

ONLINE, JOINING, DRAINING, OFFLINE = (
    PeerState.ONLINE,
    PeerState.JOINING,
    PeerState.DRAINING,
    PeerState.OFFLINE,
)


def view(num_blocks: int, **peers: PeerRecord) -> SwarmView:
    return SwarmView.from_records(num_blocks, peers, fetched_at=0.0)


def hops(route: list[Hop]) -> list[tuple[str, int, int]]:
    return [(hop.peer_id, hop.start, hop.end) for hop in route]


ZERO_RTT = {name: 0.0 for name in "ABCDE"}

INFERENCE_CASES = {
    "single peer covers all": (view(16, A=record(0, 16)), {}, [("A", 0, 16)]),
    "three disjoint spans": (
        view(16, C=record(10, 16), A=record(0, 4), B=record(4, 10)),
        {},
        [("A", 0, 4), ("B", 4, 10), ("C", 10, 16)],
    ),
    "faster of two full spans": (view(16, A=record(0, 16, 10), B=record(0, 16, 20)), {}, [("B", 0, 16)]),
    "lower rtt of two equal spans": (
        view(16, A=record(0, 16), B=record(0, 16)),
        {"rtt": {"A": 0.050, "B": 0.001}},
        [("B", 0, 16)],
    ),
    # A+B: 8/(10*8) + 8/(10*8) = 0.2 s; C: 16/(5*16) = 0.2 s; equal cost (no delay on any link), one hop fewer
    "fewer hops on a tie": (
        view(16, A=record(0, 8), B=record(8, 16), C=record(0, 16, 5)),
        {"rtt": ZERO_RTT, "default_rtt": 0.0},
        [("C", 0, 16)],
    ),
    # every link 0.1 s one way; after Z[0,1): B[1,6) costs 0.1 + 5 * 0.1 + 0.1 (back to the client) = 0.7 s,
    # B[1,3) D[3,6) 0.1 + 2 * 0.1 + 0.1 + 3 / 15 + 0.1 = 0.7 s
    "fewer hops on a tie with rtt": (
        view(6, Z=record(0, 6, 0.5), B=record(1, 6, 2.0), D=record(3, 6, 5.0)),
        {"rtt": {"Z": 0.2, "B": 0.2, "D": 0.2}, "default_rtt": 0.2},
        [("Z", 0, 1), ("B", 1, 6)],
    ),
    "no tie: the two faster hops win": (
        view(16, A=record(0, 8), B=record(8, 16), C=record(0, 16, 4.9)),
        {"rtt": ZERO_RTT},
        [("A", 0, 8), ("B", 8, 16)],
    ),
    "equal routes: lowest peer ids": (view(16, B=record(0, 16), A=record(0, 16)), {}, [("A", 0, 16)]),
    "banned peer avoided": (
        view(16, A=record(0, 16, 20), B=record(0, 16, 10)),
        {"banned": {"A"}},
        [("B", 0, 16)],
    ),
    "only ONLINE peers": (
        view(
            16,
            A=record(0, 16, 99, JOINING),
            B=record(0, 16, 99, DRAINING),
            C=record(0, 16, 99, OFFLINE),
            D=record(0, 16, 1),
        ),
        {},
        [("D", 0, 16)],
    ),
    # per block: A 1/(10*12) < B 1/(10*8), so A carries as much as it can
    "overlap: A carries the shared blocks": (
        view(16, A=record(0, 12), B=record(8, 16)),
        {},
        [("A", 0, 12), ("B", 12, 16)],
    ),
    # per block: B 1/(30*8) < A 1/(10*12), so B takes over where its span starts
    "overlap: B carries the shared blocks": (
        view(16, A=record(0, 12), B=record(8, 16, 30)),
        {},
        [("A", 0, 8), ("B", 8, 16)],
    ),
    "throughput 0 is slow but usable": (
        view(16, A=record(0, 8, 0.0), B=record(8, 16)),
        {},
        [("A", 0, 8), ("B", 8, 16)],
    ),
    "throughput 0 loses to any other peer": (
        view(16, A=record(0, 16, 0.0), B=record(0, 16, 0.001)),
        {},
        [("B", 0, 16)],
    ),
    # the fast B inside the slow A: A[0,4) B[4,8) A[8,16) (0.775 s) would beat A B C (0.801 s) but repeats
    # A, and a peer holds one cache per session id
    "a peer appears at most once": (
        view(16, A=record(0, 16, 1), B=record(4, 8, 100), C=record(8, 16, 1.9)),
        {},
        [("A", 0, 4), ("B", 4, 8), ("C", 8, 16)],
    ),
    "a peer appears at most once, even if slower": (
        view(16, A=record(0, 16, 1), B=record(4, 8, 100)),
        {},
        [("A", 0, 16)],
    ),
    "partial route inside a span": (
        view(16, A=record(0, 8), B=record(8, 16)),
        {"start": 6, "end": 10},
        [("A", 6, 8), ("B", 8, 10)],
    ),
    "partial route ignores blocks outside it": (
        view(16, A=record(2, 10)),
        {"start": 3, "end": 5},
        [("A", 3, 5)],
    ),
}


@pytest.mark.parametrize(("swarm", "options", "expected"), INFERENCE_CASES.values(), ids=INFERENCE_CASES)
def test_inference_route(swarm: SwarmView, options: dict, expected: list[tuple[str, int, int]]) -> None:
    route = plan_inference_route(swarm, **options)
    assert hops(route) == expected
    assert all(hop.address == swarm.peers()[hop.peer_id].address for hop in route)
    assert hops(plan_inference_route(swarm, **options)) == expected  # deterministic


NO_ROUTE_CASES = {
    "a gap in the middle": (
        view(30, A=record(0, 10), B=record(20, 30)),
        {},
        [(10, 20)],
        "no peer serves blocks 10..19 (of 30)",
    ),
    "two gaps, one a single block": (
        view(30, A=record(1, 10), B=record(11, 30)),
        {},
        [(0, 1), (10, 11)],
        "no peer serves blocks 0, 10 (of 30)",
    ),
    "the only peer is banned": (
        view(30, A=record(0, 30), B=record(0, 10)),
        {"banned": {"A"}},
        [(10, 30)],
        "no peer serves blocks 10..29 (of 30); 1 banned peer(s) excluded: A",
    ),
    "non-ONLINE peers do not count": (
        view(30, A=record(0, 15), B=record(15, 30, state=DRAINING)),
        {},
        [(15, 30)],
        "no peer serves blocks 15..29 (of 30)",
    ),
    "only the asked range counts": (
        view(30, A=record(0, 10)),
        {"start": 5, "end": 12},
        [(10, 12)],
        "no peer serves blocks 10..11 (of 30)",
    ),
}


@pytest.mark.parametrize(
    ("swarm", "options", "missing", "message"), NO_ROUTE_CASES.values(), ids=NO_ROUTE_CASES
)
@pytest.mark.parametrize("plan", [plan_inference_route, plan_forward_route])
def test_no_route_names_missing_blocks(plan, swarm: SwarmView, options: dict, missing, message: str) -> None:
    with pytest.raises(NoRouteError) as caught:
        plan(swarm, **options)
    assert caught.value.missing == missing
    assert str(caught.value) == message
    banned = options.get("banned", frozenset())
    bounds = {key: options[key] for key in ("start", "end") if key in options}
    assert missing_blocks(swarm, banned=banned, **bounds) == missing


def test_missing_blocks_whole_model() -> None:
    swarm = view(30, A=record(0, 10), B=record(5, 12), C=record(20, 29, state=JOINING))
    assert missing_blocks(swarm) == [(12, 30)]
    assert missing_blocks(swarm, banned={"B"}) == [(10, 30)]
    assert missing_blocks(view(30, A=record(0, 30))) == []


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"start": 5, "end": 5}, InvalidInputError),
        ({"start": 0, "end": 17}, InvalidInputError),
        ({"start": -1}, InvalidInputError),
        ({"rtt": {"A": -0.1}}, InvalidInputError),
        ({"rtt": {"A": float("nan")}}, InvalidInputError),
    ],
)
def test_inference_route_rejects_bad_arguments(options: dict, error: type[Exception]) -> None:
    with pytest.raises(error):
        plan_inference_route(view(16, A=record(0, 16)), **options)


def _one_way(records: dict[str, PeerRecord], rtt: dict[str, float], default: float, p, q) -> float:
    """The cost model of `plan_inference_route`, written out: None is the client."""
    if p is None or q is None:
        return rtt.get(q if p is None else p, default) / 2
    announced = [r for r in (records[p].pings.get(q), records[q].pings.get(p)) if r is not None]
    estimate = max(announced) if announced else default
    if p in rtt and q in rtt:
        estimate = max(estimate, abs(rtt[p] - rtt[q]))
    return estimate / 2


def _route_cost(records, rtt, default, route, previous_hop=None, next_hop=None) -> float:
    """(peer_id, start, end) hops: compute plus every link from the source to the sink."""
    chain = [previous_hop, *(peer_id for peer_id, _, _ in route), next_hop]
    links = sum(_one_way(records, rtt, default, p, q) for p, q in itertools.pairwise(chain))
    compute = sum(
        (end - start) / (max(records[p].throughput, 1e-6) * (records[p].end - records[p].start))
        for p, start, end in route
    )
    return links + compute


def _brute_force_cost(swarm: SwarmView, cost, banned=frozenset()) -> tuple[float, int]:
    """Least (cost, hops) over every route with hop boundaries at span boundaries and no repeated peer."""
    peers = {p: r for p, r in swarm.peers().items() if r.state is ONLINE and p not in banned}
    boundaries = {b for r in peers.values() for b in (r.start, r.end)}
    best = (math.inf, 0)

    def extend(block: int, route: list[tuple[str, int, int]]) -> None:
        nonlocal best
        if block == swarm.num_blocks:
            total = cost(route)
            if total < best[0] - 1e-12 or (math.isclose(total, best[0]) and len(route) < best[1]):
                best = (total, len(route))
            return
        used = {peer_id for peer_id, _, _ in route}
        for peer_id, r in peers.items():
            if r.start <= block < r.end and peer_id not in used:
                for end in sorted(b for b in boundaries if block < b <= r.end):
                    extend(end, [*route, (peer_id, block, end)])

    extend(0, [])
    return best


@pytest.mark.parametrize("seed", range(60))
def test_inference_route_matches_brute_force(seed: int) -> None:
    """Random spans, client round trips (some peers unmeasured), announced pings (some links unannounced)
    and sometimes a neighbour peer Y before or after the route: the planner's cost is the least of all."""
    rng = random.Random(seed)
    num_blocks = rng.randint(2, 8)
    names = [*"ABCDE"[: rng.randint(1, 5)], "Z", "Y"]
    spans = {}
    for name in names[:-2]:
        start = rng.randrange(num_blocks)
        spans[name] = (start, rng.randint(start + 1, num_blocks), rng.choice([0.0, 1.0, 2.0, 5.0]))
    spans["Z"] = (0, num_blocks, 0.5)  # a route always exists
    spans["Y"] = (0, num_blocks, 0.5)  # banned: a neighbour, never a hop
    records = {}
    for name, (start, end, throughput) in spans.items():
        pings = {
            other: rng.choice([0.0, 0.02, 0.2]) for other in names if other != name and rng.random() < 0.5
        }
        records[name] = record(start, end, throughput, pings=pings)
    rtt = {name: rng.choice([0.0, 0.01, 0.1, 0.3]) for name in names if rng.random() < 0.8}
    default = rng.choice([0.0, 0.005, 0.05])
    previous_hop, next_hop = rng.choice([(None, None), ("Y", None), (None, "Y")])
    swarm = view(num_blocks, **records)
    route = plan_inference_route(
        swarm, rtt=rtt, default_rtt=default, banned={"Y"}, previous_hop=previous_hop, next_hop=next_hop
    )
    assert route[0].start == 0 and route[-1].end == num_blocks
    assert all(a.end == b.start for a, b in itertools.pairwise(route))
    assert len({hop.peer_id for hop in route}) == len(route)

    def cost(route: list[tuple[str, int, int]]) -> float:
        return _route_cost(records, rtt, default, route, previous_hop, next_hop)

    expected_cost, expected_hops = _brute_force_cost(swarm, cost, banned={"Y"})
    assert cost(hops(route)) == pytest.approx(expected_cost, rel=1e-9)
    assert len(route) == expected_hops


NESTED = view(16, A=record(0, 16, 1), B=record(2, 6, 100), C=record(8, 12, 100), D=record(6, 16, 1.5))


def test_inference_route_with_nested_fast_spans() -> None:
    # fastest would be A B A C A (0.545 s); without repeats A[0,8) C D (0.792 s) beats A B D (0.817 s)
    assert hops(plan_inference_route(NESTED)) == [("A", 0, 8), ("C", 8, 12), ("D", 12, 16)]


def test_inference_route_merges_repeats_when_the_search_finds_nothing(monkeypatch) -> None:
    sweep = client.route._sweep
    monkeypatch.setattr(
        "client.route._sweep", lambda *args, distinct: None if distinct else sweep(*args, distinct=False)
    )
    assert hops(plan_inference_route(NESTED)) == [("A", 0, 16)]


def test_forward_route_draws_peers_by_throughput() -> None:
    # from block 0: A (1), B (2) or C (7); B ends at 8, so D or E (equal) carry the rest after B
    swarm = view(
        16,
        A=record(0, 16, 1.0),
        B=record(0, 8, 2.0),
        C=record(0, 16, 7.0),
        D=record(8, 16, 5.0),
        E=record(4, 16, 5.0),
    )
    rng = random.Random(1234)
    routes = Counter(tuple(hops(plan_forward_route(swarm, rng=rng))) for _ in range(1000))
    first = Counter()
    for route, count in routes.items():
        first[route[0][0]] += count
        assert route[0][1] == 0 and route[-1][2] == 16
        assert all(a[2] == b[1] for a, b in itertools.pairwise(route))
    assert set(routes) == {
        (("A", 0, 16),),
        (("C", 0, 16),),
        (("B", 0, 8), ("A", 8, 16)),
        (("B", 0, 8), ("C", 8, 16)),
        (("B", 0, 8), ("D", 8, 16)),
        (("B", 0, 8), ("E", 8, 16)),
    }
    assert first["A"] / 1000 == pytest.approx(0.1, abs=0.03)
    assert first["B"] / 1000 == pytest.approx(0.2, abs=0.04)
    assert first["C"] / 1000 == pytest.approx(0.7, abs=0.04)
    after_b = {name: routes[(("B", 0, 8), (name, 8, 16))] / first["B"] for name in "ACDE"}
    # from block 8: A 1, C 7, D 5, E 5 -> 1/18, 7/18, 5/18, 5/18
    assert after_b == pytest.approx({"A": 1 / 18, "C": 7 / 18, "D": 5 / 18, "E": 5 / 18}, abs=0.08)


def test_forward_route_partial_and_banned() -> None:
    swarm = view(16, A=record(0, 16, 100.0), B=record(0, 16, 1.0, OFFLINE), C=record(2, 12, 1.0))
    route = plan_forward_route(swarm, start=3, end=9, banned={"A"}, rng=random.Random(0))
    assert hops(route) == [("C", 3, 9)]


def test_forward_route_is_seeded() -> None:
    swarm = view(16, A=record(0, 8), B=record(0, 8), C=record(8, 16), D=record(4, 16))
    first = [hops(plan_forward_route(swarm, rng=random.Random(seed))) for seed in range(20)]
    again = [hops(plan_forward_route(swarm, rng=random.Random(seed))) for seed in range(20)]
    assert first == again
    assert len({tuple(route) for route in first}) > 1


def test_measured_block_times_override_the_announced_prior() -> None:
    swarm = view(8, A=record(0, 8, throughput=100.0), B=record(0, 8, throughput=10.0))
    assert hops(plan_inference_route(swarm, rtt=ZERO_RTT)) == [("A", 0, 8)]  # announced: A is faster
    stats = client.route.PeerStats(alpha=0.5)
    for _ in range(3):
        stats.observe_step("A", 8, 0.8)  # A measures at 0.1 s per block, B at 0.01
        stats.observe_step("B", 4, 0.04)
    assert stats.block_times() == pytest.approx({"A": 0.1, "B": 0.01})
    assert hops(plan_inference_route(swarm, rtt=ZERO_RTT, block_time=stats.block_times())) == [("B", 0, 8)]
    # an unmeasured peer keeps its prior: C announces faster than B measures
    swarm = view(8, B=record(0, 8, throughput=10.0), C=record(0, 8, throughput=1000.0))
    assert hops(plan_inference_route(swarm, rtt=ZERO_RTT, block_time=stats.block_times())) == [("C", 0, 8)]


def test_peer_stats_average_and_ignore_bad_samples() -> None:
    stats = client.route.PeerStats(alpha=0.5)
    stats.observe_step("A", 2, 2.0)
    stats.observe_step("A", 1, 3.0)
    assert stats.block_times()["A"] == pytest.approx(2.0)  # 1.0, then halfway to 3.0
    for blocks, seconds in [(0, 1.0), (1, -1.0), (1, math.nan), (1, math.inf)]:
        stats.observe_step("B", blocks, seconds)
    assert "B" not in stats.block_times() and stats.samples == {"A": 2}
    with pytest.raises(InvalidInputError):
        client.route.PeerStats(alpha=0.0)


def test_peer_stats_average_round_trips_and_ignore_bad_samples() -> None:
    stats = client.route.PeerStats(alpha=0.5)
    stats.observe_rtt("A", 0.010)
    stats.observe_rtt("A", 0.030)
    for seconds in [-0.001, math.nan, math.inf]:
        stats.observe_rtt("B", seconds)
    assert stats.rtts() == pytest.approx({"A": 0.020}) and stats.rtt_samples == {"A": 2}
    assert stats.block_times() == {} and stats.samples == {}  # round trips are not step times
    stats.rtts()["A"] = 9.0  # a copy
    assert stats.rtts()["A"] == pytest.approx(0.020)


# ---- latency: one-way delays on every link of the chain (client -> first hop -> ... -> last -> client) ----


def pinging(start: int, end: int, throughput: float = 10.0, **pings: float) -> PeerRecord:
    return record(start, end, throughput, pings=pings)


MS20 = {"A": 0.02, "B": 0.02, "C": 0.02}

LATENCY_CASES = {
    # N: 0.010 + 16 / (10 * 16) = 0.110 s; F: 0.160 + 16 / (10.5 * 16) = 0.255 s
    "the near replica beats a slightly faster far one": (
        view(16, N=record(0, 16, 10.0), F=record(0, 16, 10.5)),
        {"rtt": {"N": 0.010, "F": 0.160}},
        [("N", 0, 16)],
    ),
    # N: 0.010 + 0.5 = 0.51 s; F: 0.160 + 0.1 = 0.26 s
    "a far replica that computes much faster": (
        view(16, N=record(0, 16, 2.0), F=record(0, 16, 10.0)),
        {"rtt": {"N": 0.010, "F": 0.160}},
        [("F", 0, 16)],
    ),
    # A->B 0.100 / 2 = 0.050 s, A->C 0.005 s: C computes 4.8 ms slower, its link is 45 ms shorter
    "announced pings choose the next hop": (
        view(16, A=pinging(0, 8, B=0.100, C=0.010), B=record(8, 16, 10.5), C=record(8, 16, 10.0)),
        {"rtt": MS20},
        [("A", 0, 8), ("C", 8, 16)],
    ),
    "the next peer's announcement counts where the hop's is missing": (
        view(16, A=pinging(0, 8, B=0.100), B=record(8, 16, 10.5), C=pinging(8, 16, 10.0, A=0.010)),
        {"rtt": MS20},
        [("A", 0, 8), ("C", 8, 16)],
    ),
    # A says A->C takes 1 ms, C says 200 ms: the larger counts, and B (25 ms) is nearer
    "the larger of two announcements of a link counts": (
        view(16, A=pinging(0, 8, B=0.050, C=0.001), B=record(8, 16, 10.0), C=pinging(8, 16, 10.5, A=0.2)),
        {"rtt": MS20},
        [("A", 0, 8), ("B", 8, 16)],
    ),
    "an unannounced link counts at default_rtt": (
        view(16, A=pinging(0, 8, B=0.100), B=record(8, 16, 10.5), C=record(8, 16, 10.0)),
        {"rtt": MS20},
        [("A", 0, 8), ("C", 8, 16)],
    ),
    "an unmeasured peer counts at default_rtt": (
        view(16, N=record(0, 16), U=record(0, 16)),
        {"rtt": {"N": 0.010}, "default_rtt": 0.005},
        [("U", 0, 16)],
    ),
    "an unmeasured peer counts at default_rtt, here a long one": (
        view(16, N=record(0, 16), U=record(0, 16)),
        {"rtt": {"N": 0.010}, "default_rtt": 0.050},
        [("N", 0, 16)],
    ),
    # A B: 0.2 s of compute and one 5 ms link; C: 16 / (4.95 * 16) = 0.202 s and no link
    "every link between hops costs its delay": (
        view(16, A=record(0, 8), B=record(8, 16), C=record(0, 16, 4.95)),
        {"rtt": {"A": 0.0, "B": 0.0, "C": 0.0}, "default_rtt": 0.010},
        [("C", 0, 16)],
    ),
    # B and C cost the same to reach from A; C's result takes 100 ms back to the client, B's 10 ms
    "the way back from the last hop counts": (
        view(16, A=record(0, 8), B=record(8, 16, 10.0), C=record(8, 16, 10.5)),
        {"rtt": {"A": 0.020, "B": 0.020, "C": 0.200}},
        [("A", 0, 8), ("B", 8, 16)],
    ),
    # repairing [4, 12) between P and S: P->M 100 ms, P->N 5 ms; the client's own links are not on it
    "a repair counts the link from the hop before it": (
        view(
            16, P=pinging(0, 4, M=0.2, N=0.01), M=record(4, 12, 11.0), N=record(4, 12, 10.0), S=record(12, 16)
        ),
        {
            "start": 4,
            "end": 12,
            "previous_hop": "P",
            "next_hop": "S",
            "banned": {"P", "S"},
            "rtt": {"N": 0.3},
        },
        [("N", 4, 12)],
    ),
    "a repair counts the link to the hop after it": (
        view(
            16,
            P=record(0, 4),
            M=pinging(4, 12, 10.0, S=0.01),
            N=pinging(4, 12, 11.0, S=0.3),
            S=record(12, 16),
        ),
        {
            "start": 4,
            "end": 12,
            "previous_hop": "P",
            "next_hop": "S",
            "banned": {"P", "S"},
            "rtt": {"N": 0.001},
        },
        [("M", 4, 12)],
    ),
}


@pytest.mark.parametrize(("swarm", "options", "expected"), LATENCY_CASES.values(), ids=LATENCY_CASES)
def test_route_minimises_compute_plus_link_delays(swarm: SwarmView, options: dict, expected: list) -> None:
    assert hops(plan_inference_route(swarm, **options)) == expected
    assert hops(plan_inference_route(swarm, **options)) == expected  # deterministic


# A (honest) and H serve [0, 4) alike, H a little slower; B serves [4, 8). The true A->B and H->B round
# trip is 80 ms; H announces 0 ms (or nothing). The client measured A and H at 20 ms and B at 100 ms, so no
# link between H and B is shorter than 100 - 20 = 80 ms: the lie gains H nothing. Only where the client has
# not measured B does the lie win H the route: the client measures every usable peer it can for that reason.
LIAR = {
    "lying": pinging(0, 4, 9.9, B=0.0),
    "silent": record(0, 4, 9.9),
}
TRIANGLE_CASES = {
    "a zero ping is no shortcut": ("lying", {"A": 0.02, "H": 0.02, "B": 0.1}, [("A", 0, 4), ("B", 4, 8)]),
    "announcing nothing is no shortcut": (
        "silent",
        {"A": 0.02, "H": 0.02, "B": 0.1},
        [("A", 0, 4), ("B", 4, 8)],
    ),
    "a zero ping wins where the client has not measured": (
        "lying",
        {"A": 0.02, "H": 0.02},
        [("H", 0, 4), ("B", 4, 8)],
    ),
}


@pytest.mark.parametrize(("liar", "rtt", "expected"), TRIANGLE_CASES.values(), ids=TRIANGLE_CASES)
def test_a_peer_lying_about_its_pings_gains_at_most_what_the_client_measured_allows(
    liar: str, rtt: dict[str, float], expected: list
) -> None:
    swarm = view(8, A=pinging(0, 4, 10.0, B=0.080), H=LIAR[liar], B=record(4, 8))
    assert hops(plan_inference_route(swarm, rtt=rtt)) == expected


# the client measured p at 40 ms and q at 10 ms, not u or v; default_rtt is 10 ms (expected: round trips)
LINK_CASES = {
    "client to a measured peer": (None, "p", {}, 0.040),
    "a measured peer to the client": ("p", None, {}, 0.040),
    "client to an unmeasured peer": (None, "u", {}, 0.010),
    "announced by the sender": ("p", "q", {"p": {"q": 0.050}}, 0.050),
    "announced by the receiver": ("p", "q", {"q": {"p": 0.050}}, 0.050),
    "announced by both: the larger": ("p", "q", {"p": {"q": 0.050}, "q": {"p": 0.070}}, 0.070),
    "announced by neither": ("u", "v", {}, 0.010),
    "the triangle raises an announced ping": ("p", "q", {"p": {"q": 0.0}}, 0.030),
    "the triangle raises the default": ("p", "q", {}, 0.030),
    "no triangle with an unmeasured end": ("p", "u", {"p": {"u": 0.001}}, 0.001),
}


@pytest.mark.parametrize(("source", "target", "pings", "expected_rtt"), LINK_CASES.values(), ids=LINK_CASES)
def test_one_way_delay_of_a_link(source, target, pings: dict, expected_rtt: float) -> None:
    records = {name: pinging(0, 1, **pings.get(name, {})) for name in "pquv"}
    links = client.route._Links(records, {"p": 0.040, "q": 0.010}, 0.010)
    assert links.one_way(source, target) == pytest.approx(expected_rtt / 2)
    if source is not None and target is not None:  # what the sweep's pruning relies on
        assert links.lower_bound(source) <= links.one_way(source, target)
        assert links.lower_bound(target) <= links.one_way(source, target)


# ---- Sybil limits per address prefix (IPv4 /24, IPv6 /48, a name for itself; loopback exempt) ---------

PREFIX_CASES = {
    "IPv4 /24": ("203.0.113.77:8700", "203.0.113.0/24"),
    "IPv4 next /24": ("203.0.114.1:8700", "203.0.114.0/24"),
    "IPv6 /48": ("[2001:db8:1:ff::6]:8700", "2001:db8:1::/48"),
    "IPv4-mapped IPv6 counts as IPv4": ("[::ffff:203.0.113.9]:1", "203.0.113.0/24"),
    "a name is its own prefix": ("Peer.Example.org:443", "peer.example.org"),
    "loopback IPv4": ("127.0.0.1:8700", None),
    "loopback 127/8": ("127.3.2.1:8700", None),
    "loopback IPv6": ("[::1]:8700", None),
    "localhost": ("localhost:8700", None),
}


@pytest.mark.parametrize(("address", "prefix"), PREFIX_CASES.values(), ids=PREFIX_CASES)
def test_address_prefix(address: str, prefix: str | None) -> None:
    assert client.prefixes.address_prefix(address) == prefix


def at(address: str, start: int, end: int, throughput: float = 10.0) -> PeerRecord:
    return record(start, end, throughput, address=address)


SYBIL_HOST = "203.0.113"  # one /24 holding many records
HONEST = ["198.51.100.7:1", "192.0.2.9:1", "100.64.3.3:1"]  # three hosts in three prefixes

# 5 Sybil records of one /24 announce 1000 steps/s (16000 blocks/s); honest hosts 10, 20, 30 (160, 320,
# 480 blocks/s). Per record the median is 16000 and the Sybils win; per prefix the medians are 160, 320,
# 480, 16000 and their median 400 caps the Sybils below H3's 480.
SYBILS = {f"S{i}": at(f"{SYBIL_HOST}.{10 + i}:1", 0, 16, 1000.0) for i in range(5)}
MEDIAN_CASES = {
    "Sybils of one /24 count once": (
        view(
            16,
            H1=at(HONEST[0], 0, 16, 10),
            H2=at(HONEST[1], 0, 16, 20),
            H3=at(HONEST[2], 0, 16, 30),
            **SYBILS,
        ),
        [("H3", 0, 16)],
    ),
    # the same records on loopback: each counts alone, as before prefixes (median 16000: a Sybil wins)
    "loopback records count one each": (
        view(
            16,
            H1=at("127.0.0.1:1", 0, 16, 10),
            H2=at("127.0.0.1:2", 0, 16, 20),
            H3=at("127.0.0.1:3", 0, 16, 30),
            **{name: at(f"127.0.0.1:{10 + i}", 0, 16, 1000.0) for i, name in enumerate(SYBILS)},
        ),
        [("S0", 0, 16)],
    ),
    # one Sybil per prefix: as many votes as honest hosts would need more prefixes than the honest ones
    "Sybils in as many prefixes as honest hosts set the median": (
        view(
            16,
            H1=at(HONEST[0], 0, 16, 10),
            H2=at(HONEST[1], 0, 16, 20),
            S1=at("203.0.113.1:1", 0, 16, 1000.0),
            S2=at("203.0.114.1:1", 0, 16, 1000.0),
            S3=at("203.0.115.1:1", 0, 16, 1000.0),
        ),
        [("S1", 0, 16)],
    ),
}


@pytest.mark.parametrize(("swarm", "expected"), MEDIAN_CASES.values(), ids=MEDIAN_CASES)
def test_throughput_median_is_taken_over_prefixes(swarm: SwarmView, expected: list) -> None:
    assert hops(plan_inference_route(swarm, median_cap=True, rtt=ZERO_RTT)) == expected


SHARE_CASES = {
    # one prefix's full span beats the other's: at most 8 of 16 blocks from either
    "two full spans split at half": (
        view(16, A=at("203.0.113.1:1", 0, 16, 20), B=at(HONEST[0], 0, 16, 10)),
        {"max_prefix_share": 0.5},
        [("A", 0, 8), ("B", 8, 16)],
    ),
    "a share of 1 keeps the fastest route": (
        view(16, A=at("203.0.113.1:1", 0, 16, 20), B=at(HONEST[0], 0, 16, 10)),
        {"max_prefix_share": 1.0},
        [("A", 0, 16)],
    ),
    # four fast Sybil spans of one /24 against one slow honest host: the Sybils get 8 blocks
    "Sybil spans of one /24 are one prefix": (
        view(
            16,
            S1=at("203.0.113.1:1", 0, 4, 400),
            S2=at("203.0.113.2:1", 4, 8, 400),
            S3=at("203.0.113.3:1", 8, 12, 400),
            S4=at("203.0.113.4:1", 12, 16, 400),
            H=at(HONEST[0], 0, 16, 10),
        ),
        {"max_prefix_share": 0.5},
        [("S1", 0, 4), ("S2", 4, 8), ("H", 8, 16)],
    ),
    "a share of 0.75 gives 12 of 16": (
        view(16, A=at("203.0.113.1:1", 0, 16, 20), B=at(HONEST[0], 0, 16, 10)),
        {"max_prefix_share": 0.75},
        [("A", 0, 12), ("B", 12, 16)],
    ),
    # blocks 0..9 have no other server: A carries them (10 > 8), B the rest
    "blocks only one prefix serves are its own": (
        view(16, A=at("203.0.113.1:1", 0, 16, 20), B=at(HONEST[0], 10, 16, 1)),
        {"max_prefix_share": 0.5},
        [("A", 0, 10), ("B", 10, 16)],
    ),
    "nothing else serves the blocks: the prefix carries them all": (
        view(16, A=at("203.0.113.1:1", 0, 8, 20), A2=at("203.0.113.2:1", 8, 16, 20)),
        {"max_prefix_share": 0.5},
        [("A", 0, 8), ("A2", 8, 16)],
    ),
    # equal costs either way round: the tie goes to the route found first
    "an odd number of blocks rounds the share up": (
        view(5, A=at("203.0.113.1:1", 0, 5, 20), B=at(HONEST[0], 0, 5, 10)),
        {"max_prefix_share": 0.5},
        [("B", 0, 2), ("A", 2, 5)],
    ),
    "a one-block route takes the fastest": (
        view(16, A=at("203.0.113.1:1", 0, 16, 20), B=at(HONEST[0], 0, 16, 10)),
        {"max_prefix_share": 0.5, "start": 3, "end": 4},
        [("A", 3, 4)],
    ),
    # a route of three prefixes already within the share is left as it is
    "routes within the share are unchanged": (
        view(16, A=at(HONEST[0], 0, 6), B=at(HONEST[1], 6, 11), C=at(HONEST[2], 11, 16)),
        {"max_prefix_share": 0.5},
        [("A", 0, 6), ("B", 6, 11), ("C", 11, 16)],
    ),
    # loopback peers are not strangers: no limit between them, as before prefixes
    "loopback swarms keep the fastest route": (
        view(16, A=at("127.0.0.1:1", 0, 16, 20), B=at("127.0.0.1:2", 0, 16, 10)),
        {"max_prefix_share": 0.5},
        [("A", 0, 16)],
    ),
    # but a remote prefix is limited where a loopback peer can take over
    "a remote prefix is limited beside loopback peers": (
        view(16, A=at("203.0.113.1:1", 0, 16, 20), L=at("127.0.0.1:2", 0, 16, 10)),
        {"max_prefix_share": 0.5},
        [("A", 0, 8), ("L", 8, 16)],
    ),
    "names are prefixes": (
        view(16, A=at("a.example:1", 0, 16, 20), B=at("b.example:1", 0, 16, 10)),
        {"max_prefix_share": 0.5},
        [("A", 0, 8), ("B", 8, 16)],
    ),
    "IPv6 addresses in one /48 are one prefix": (
        view(
            16,
            A=at("[2001:db8:1::5]:1", 0, 8, 20),
            A2=at("[2001:db8:1:ff::6]:1", 8, 16, 20),
            B=at("[2001:db8:2::1]:1", 0, 16, 10),
        ),
        {"max_prefix_share": 0.5},
        [("A", 0, 8), ("B", 8, 16)],
    ),
}


@pytest.mark.parametrize(("swarm", "options", "expected"), SHARE_CASES.values(), ids=SHARE_CASES)
def test_one_prefix_carries_at_most_its_share_of_a_route(
    swarm: SwarmView, options: dict, expected: list
) -> None:
    options = {"rtt": dict.fromkeys(swarm.peers(), 0.0), **options}
    assert hops(plan_inference_route(swarm, **options)) == expected
    assert hops(plan_inference_route(swarm, **options)) == expected  # deterministic


@pytest.mark.parametrize("seed", range(12))
def test_random_swarms_keep_every_prefix_within_its_share(seed: int) -> None:
    """Random spans over 4 prefixes (one host each, many records) and one slow peer per 8 blocks in a prefix
    of its own: the route covers the blocks hop after hop, each peer once, and no prefix is over budget."""
    rng = random.Random(seed)
    num_blocks = rng.choice([8, 16, 32, 80])
    peers = {}
    for i in range(rng.choice([4, 10, 40])):
        start = rng.randrange(num_blocks)
        end = rng.randrange(start + 1, num_blocks + 1)
        peers[f"p{i:02d}"] = at(f"10.0.{rng.randrange(4)}.{i}:1", start, end, rng.uniform(1, 100))
    for i in range(num_blocks // 8):
        peers[f"c{i}"] = at(f"10.9.{i}.1:1", 8 * i, 8 * i + 8, 1.0)
    swarm = SwarmView.from_records(num_blocks, peers, fetched_at=0.0)
    route = hops(plan_inference_route(swarm, max_prefix_share=0.5, median_cap=True))
    assert [s for _, s, _ in route] == [0] + [e for _, _, e in route[:-1]] and route[-1][2] == num_blocks
    assert len({peer_id for peer_id, _, _ in route}) == len(route)
    prefix_of = client.prefixes.prefixes(swarm.peers())
    budgets = client.prefixes.prefix_budgets(swarm.peers(), prefix_of, 0, num_blocks, 0.5)
    assert all(n <= budgets[p] for p, n in client.prefixes.prefix_blocks(route, prefix_of).items())


@pytest.mark.parametrize(
    ("options", "expected"), [({}, [("B", 0, 8), ("A", 8, 16)]), ({"max_prefix_share": 1.0}, [("A", 0, 16)])]
)
def test_sessions_plan_with_the_prefix_share_of_their_config(options: dict, expected: list) -> None:
    """A session's route follows `ClientConfig.max_prefix_share` (0.5 by default): the faster host's /24
    gets half the blocks of a full span, the other host the rest (in the order found first: equal costs)."""
    from client.config import ClientConfig
    from client.discovery import InMemoryDiscovery
    from client.swarm import SwarmConnection

    swarm = view(16, A=at("203.0.113.1:1", 0, 16, 20), B=at(HONEST[0], 0, 16, 10))
    connection = SwarmConnection.from_discovery(
        InMemoryDiscovery(swarm), ClientConfig(insecure=True, **options)
    )
    try:
        session = connection.new_session(max_length=8)
        route = connection.runtime.run(session._plan(0, None, frozenset(), refresh=False), timeout=10)
    finally:
        connection.close()
    assert hops(route) == expected
