"""Swarm balance in simulation: records only, no weights, no processes.

Peers with random speeds and span lengths join one by one (each takes the span `choose_span` gives it),
then the swarm churns: at each event a random peer leaves or a new one joins, and every peer runs its
rebalancing check (`plan_move`, the same code a real peer runs) in random order until a round moves nobody.
Prints JSON per swarm size: the bottleneck throughput reached (the weakest block's summed steps/s), the
best possible placement's bound, their ratio, and the moves made.

The bound: no placement beats the swarm's total capacity spread evenly, sum(c_i * K_i) / B, nor the
placement a slow offline search finds (every peer re-placed greedily from the fastest down, then improved
with plan_move at margin 0); `best` is the larger of the search and the reached value, `upper_bound` the
even spread.

    python bench/balance.py [--sizes 10 100 1000] [--blocks 80] [--events 20] [--seeds 5] [--margin 0.2]
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import time
from dataclasses import dataclass, field

from peer.placement import choose_span, plan_move

MAX_ROUNDS = 20


_names = itertools.count()


@dataclass
class SimPeer:
    speed: float  # steps per second through its whole span (its contribution to each block it serves)
    length: int
    span: tuple[int, int] = (0, 0)
    name: str = field(default_factory=lambda: f"peer{next(_names):06d}")  # a stable id, as peers have


class Swarm:
    """Summed contributions per block, kept up to date as peers join, leave and move."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.peers: list[SimPeer] = []
        self.totals = [0.0] * num_blocks

    def _add(self, peer: SimPeer, sign: float) -> None:
        for block in range(*peer.span):
            self.totals[block] += sign * peer.speed

    def others(self, peer: SimPeer) -> list[float]:
        return [t - peer.speed * (peer.span[0] <= b < peer.span[1]) for b, t in enumerate(self.totals)]

    def join(self, peer: SimPeer) -> None:
        peer.span = choose_span(self.totals, peer.length)
        self.peers.append(peer)
        self._add(peer, 1.0)

    def leave(self, peer: SimPeer) -> None:
        self.peers.remove(peer)
        self._add(peer, -1.0)

    def move(self, peer: SimPeer, span: tuple[int, int]) -> None:
        self._add(peer, -1.0)
        peer.span = span
        self._add(peer, 1.0)

    def placement(self) -> dict[str, tuple[int, int, float]]:
        return {peer.name: (*peer.span, peer.speed) for peer in self.peers}

    def rebalance(self, rng: random.Random, margin: float) -> int:
        """Rounds of every peer's check until one moves nobody; returns the moves."""
        moves = 0
        for _ in range(MAX_ROUNDS):
            moved = 0
            for peer in rng.sample(self.peers, len(self.peers)):
                target = plan_move(
                    self.others(peer),
                    peer.span,
                    peer.speed,
                    margin,
                    placement=self.placement(),
                    me=peer.name,
                )
                if target is not None:
                    self.move(peer, target)
                    moved += 1
            moves += moved
            if not moved:
                break
        return moves

    def bottleneck(self) -> float:
        return min(self.totals)


def _random_peer(rng: random.Random, num_blocks: int) -> SimPeer:
    per_block = rng.lognormvariate(4.0, 0.7)  # decode steps/s through one block: a wide spread of hardware
    length = rng.randint(max(1, num_blocks // 8), max(1, num_blocks // 3))
    return SimPeer(speed=per_block / length, length=length)


def offline_best(peers: list[SimPeer], num_blocks: int, seed: int, restarts: int) -> float:
    """A strong placement found with hindsight: peers placed fastest first (then in random orders, for
    small swarms), each placement improved by moves at margin 0; the best bottleneck of all."""
    rng = random.Random(seed)
    orders = [sorted(peers, key=lambda p: -p.speed * p.length)]
    orders += [rng.sample(peers, len(peers)) for _ in range(restarts if len(peers) <= 50 else 0)]
    best = 0.0
    for order in orders:
        swarm = Swarm(num_blocks)
        for peer in order:
            swarm.join(SimPeer(peer.speed, peer.length))
        swarm.rebalance(rng, margin=0.0)
        best = max(best, swarm.bottleneck())
    return best


def simulate(size: int, num_blocks: int, events: int, margin: float, seed: int) -> dict[str, float | int]:
    rng = random.Random(seed)
    swarm = Swarm(num_blocks)
    started = time.perf_counter()
    for _ in range(size):
        swarm.join(_random_peer(rng, num_blocks))
    moves = swarm.rebalance(rng, margin)
    joined_moves = moves
    for _ in range(events):
        if rng.random() < 0.5 and len(swarm.peers) > 1:
            swarm.leave(rng.choice(swarm.peers))
        else:
            swarm.join(_random_peer(rng, num_blocks))
        moves += swarm.rebalance(rng, margin)
    reached = swarm.bottleneck()
    best = max(offline_best(swarm.peers, num_blocks, seed, restarts=20), reached)
    upper = sum(p.speed * p.length for p in swarm.peers) / num_blocks
    return {
        "peers": len(swarm.peers),
        "blocks": num_blocks,
        "events": events,
        "bottleneck": round(reached, 4),
        "best": round(best, 4),
        "ratio_to_best": round(reached / best, 4) if best > 0 else 1.0,
        "upper_bound": round(upper, 4),
        "ratio_to_upper_bound": round(reached / upper, 4),
        "moves": moves,
        "moves_after_joining": joined_moves,
        "moves_per_event": round((moves - joined_moves) / max(events, 1), 3),
        "seconds": round(time.perf_counter() - started, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000], help="peers per swarm")
    parser.add_argument("--blocks", type=int, default=80, help="blocks of the simulated model")
    parser.add_argument("--events", type=int, default=20, help="peers leaving or joining after the start")
    parser.add_argument("--margin", type=float, default=0.2, help="the peers' --balance-margin")
    parser.add_argument("--seeds", type=int, default=5, help="random swarms per size (medians are reported)")
    args = parser.parse_args()
    summary = []
    for size in args.sizes:
        runs = [simulate(size, args.blocks, args.events, args.margin, seed) for seed in range(args.seeds)]
        summary.append(
            {
                "size": size,
                "median_ratio_to_best": statistics.median(r["ratio_to_best"] for r in runs),
                "min_ratio_to_best": min(r["ratio_to_best"] for r in runs),
                "median_ratio_to_upper_bound": statistics.median(r["ratio_to_upper_bound"] for r in runs),
                "median_moves_per_event": statistics.median(r["moves_per_event"] for r in runs),
                "median_moves_after_joining": statistics.median(r["moves_after_joining"] for r in runs),
                "runs": runs,
            }
        )
    print(json.dumps({"margin": args.margin, "blocks": args.blocks, "swarms": summary}, indent=2))


if __name__ == "__main__":
    main()
