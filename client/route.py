"""Route planning from a `SwarmView`: the fastest chain of hops for inference (compute plus the one-way delay
of every link: client to first hop, hop to hop, last hop to client), a throughput-weighted random one for
forward/backward. Pure bookkeeping: no I/O, no clocks; only ONLINE peers that are not banned.
Sybil limits count peers per address prefix (`client/prefixes.py`): one vote each in the throughput
median, and at most `max_prefix_share` of an inference route's blocks where other prefixes serve them."""

from __future__ import annotations

import functools
import heapq
import itertools
import math
import random
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass

from client.discovery import SwarmView
from client.errors import NoRouteError
from client.prefixes import median_per_prefix, prefix_blocks, prefix_budgets, prefixes
from protos.errors import InvalidInputError
from protos.records import PeerRecord, PeerState

__all__ = [
    "Hop",
    "Needs",
    "NoRouteError",
    "PeerStats",
    "block_ranges",
    "missing_blocks",
    "plan_forward_route",
    "plan_inference_route",
    "usable_peers",
]

MIN_THROUGHPUT = 1e-6  # a peer announcing 0 counts as very slow, not as unusable
_REL_TOLERANCE = 1e-9  # sums of equal costs may differ in the last bits; fewer hops decide those ties
MAX_LABELS = 8  # partial routes kept per state when no peer may appear twice or prefixes have budgets
MAX_OPENING = 4 * MAX_LABELS  # of those, routes a new hop may follow at one point (over all last peers)


@dataclass(frozen=True)
class Hop:
    """One peer carrying blocks `[start, end)` of a route (a sub-span of the span it announces)."""

    peer_id: str
    address: str
    start: int
    end: int
    certificate: bytes | None = None  # the TLS certificate its record announces (PEM); None: plaintext
    relay_maddrs: tuple[str, ...] = ()  # its relays when nobody can dial `address` (`protos.relay`)

    @property
    def relay(self) -> tuple[str, tuple[str, ...]] | None:
        """What `ChannelPool.stub` needs to reach a relayed peer; None for one dialed at its address."""
        return (self.peer_id, self.relay_maddrs) if self.relay_maddrs else None


def _hop(peer_id: str, record: PeerRecord, start: int, end: int) -> Hop:
    certificate = record.certificate.encode() if record.certificate is not None else None
    return Hop(peer_id, record.address, start, end, certificate, record.relay_maddrs)


@dataclass(frozen=True)
class Needs:
    """What a request asks of a peer's announced limits; peers that cannot take it are not planned.

    `max_length` > 0 is a session of that many positions (it needs `max_length` on the peer and, with
    `free_cache`, `batch_size * cached` free cache tokens: peers take cache pages as a session grows, so
    only what the session holds now, at least one position, must fit); `forward_tokens` > 0 is a stateless
    pass of that many batch x positions. Limits a record leaves unset (older peers) are not checked."""

    batch_size: int = 1
    max_length: int = 0
    cached: int = 0  # positions the session's cache holds now (replayed into a new hop)
    forward_tokens: int = 0
    free_cache: bool = True
    adapter: str = ""  # a LoRA adapter the peer must serve; "": the base model

    def admits(self, record: PeerRecord) -> bool:
        if self.adapter and self.adapter not in record.adapters:
            return False
        if record.max_batch_size is not None and self.batch_size > record.max_batch_size:
            return False
        if self.max_length > record.max_length:
            return False
        if (
            self.free_cache
            and self.max_length
            and self.batch_size * max(self.cached, 1) > record.free_cache_tokens
        ):
            return False
        limit = record.max_forward_tokens
        return limit is None or self.forward_tokens <= limit


class PeerStats:
    """What this client measured of each peer: seconds per block of one decode step, hop delivery included,
    and the round trip of a call from this client (`client/latency.py` measures it).

    Exponential moving averages (weight `alpha` for each new sample) over the client's own steps and pings;
    planning uses them in place of the announced throughput, which stays the prior for peers not measured
    yet, and of the default round trip.
    """

    def __init__(self, alpha: float = 0.3) -> None:
        if not 0 < alpha <= 1:
            raise InvalidInputError(f"alpha must be in (0, 1], got {alpha}")
        self.alpha = alpha
        self._block_time: dict[str, float] = {}
        self._rtt: dict[str, float] = {}
        self.samples: dict[str, int] = {}
        self.rtt_samples: dict[str, int] = {}

    def observe_step(self, peer_id: str, blocks: int, seconds: float) -> None:
        if blocks < 1 or not (math.isfinite(seconds) and seconds >= 0):
            return
        self._average(self._block_time, self.samples, peer_id, seconds / blocks)

    def observe_rtt(self, peer_id: str, seconds: float) -> None:
        """One round trip from this client to the peer (a call answered at once), in seconds."""
        if math.isfinite(seconds) and seconds >= 0:
            self._average(self._rtt, self.rtt_samples, peer_id, seconds)

    def block_times(self) -> dict[str, float]:
        """peer_id -> measured seconds per block of a decode step."""
        return dict(self._block_time)

    def rtts(self) -> dict[str, float]:
        """peer_id -> measured seconds of a round trip from this client."""
        return dict(self._rtt)

    def _average(
        self, averages: dict[str, float], counts: dict[str, int], peer_id: str, sample: float
    ) -> None:
        previous = averages.get(peer_id)
        averages[peer_id] = sample if previous is None else previous + self.alpha * (sample - previous)
        counts[peer_id] = counts.get(peer_id, 0) + 1


def usable_peers(
    view: SwarmView, *, banned: Collection[str] = frozenset(), needs: Needs | None = None
) -> dict[str, PeerRecord]:
    """ONLINE peers that are not banned and whose announced limits admit `needs`, sorted by peer_id."""
    return {
        peer_id: record
        for peer_id, record in view.peers().items()
        if record.state is PeerState.ONLINE
        and peer_id not in banned
        and (needs is None or needs.admits(record))
    }


def missing_blocks(
    view: SwarmView,
    *,
    start: int = 0,
    end: int | None = None,
    banned: Collection[str] = frozenset(),
    needs: Needs | None = None,
) -> list[tuple[int, int]]:
    """Maximal half-open ranges of `[start, end)` that no usable peer serves."""
    start, end = _bounds(view, start, end)
    served = [False] * (end - start)
    for record in usable_peers(view, banned=banned, needs=needs).values():
        for block in range(max(record.start, start), min(record.end, end)):
            served[block - start] = True
    return block_ranges(start + offset for offset, is_served in enumerate(served) if not is_served)


def block_ranges(blocks: Iterable[int]) -> list[tuple[int, int]]:
    """Ascending block numbers as maximal half-open ranges: [2, 3, 7] -> [(2, 4), (7, 8)]."""
    ranges: list[tuple[int, int]] = []
    for block in blocks:
        if ranges and ranges[-1][1] == block:
            ranges[-1] = (ranges[-1][0], block + 1)
        else:
            ranges.append((block, block + 1))
    return ranges


def plan_inference_route(
    view: SwarmView,
    *,
    start: int = 0,
    end: int | None = None,
    banned: Collection[str] = frozenset(),
    rtt: Mapping[str, float] | None = None,
    default_rtt: float = 0.005,
    block_time: Mapping[str, float] | None = None,
    needs: Needs | None = None,
    median_cap: bool = False,
    max_prefix_share: float = 1.0,
    previous_hop: str | None = None,
    next_hop: str | None = None,
) -> list[Hop]:
    """The route over `[start, end)` with the least expected time of one decode step, fewest hops on ties.
    With `median_cap` (what sessions use), an unmeasured peer's announcement counts at most as the median
    over address prefixes (see `_block_costs`). With `max_prefix_share` < 1, the peers of one address prefix
    carry at most `ceil(max_prefix_share * blocks)` of the route's blocks, more only where no other prefix
    (nor a loopback peer) serves them (`prefix_budgets`); hops may then end inside spans.

    A step is pushed along the chain and its result returns from the last hop, so a route p_1 .. p_k costs

        d(source, p_1) + sum_i n_i * t_i + sum_i d(p_i, p_i+1) + d(p_k, sink)

    where hop i carries n_i blocks at t_i seconds per block (what this client measured, `block_time`, see
    `PeerStats`, or else the announced prior `1 / (throughput_i * len(span_i))`: the announced throughput is
    steps per second through the whole span) and d is a one-way delay, half a round trip (`_Links`): to
    and from the client, `rtt[p]` as this client measured it (`default_rtt` unmeasured); between peers,
    what the two announce in their records' `pings`, never less than the client's own round trips allow.
    The source is the client, or `previous_hop` (the peer that pushes into the route: a repair of part of
    a route); the sink is the client, or `next_hop` (the peer the route's last hop pushes on to).

    Hops may use any sub-span of an announced span, but each peer appears at most once (a peer keys its
    caches by session id). Only peers whose announced limits admit `needs` are used. Deterministic for equal
    inputs; raises `NoRouteError` when some block has no usable peer.
    """
    start, end = _bounds(view, start, end)
    if not 0 < max_prefix_share <= 1:
        raise InvalidInputError(f"max_prefix_share must be in (0, 1], got {max_prefix_share}")
    peers = _require_route(view, start, end, banned, needs)
    prefix_of = prefixes(peers)
    links = _Links(view.peers(), rtt or {}, default_rtt)
    costs = _Costs(
        per_block=_block_costs(peers, block_time or {}, median_cap=median_cap),
        enter={p: links.one_way(previous_hop, p) for p in peers},
        leave={p: links.one_way(p, next_hop) for p in peers},
        link=links.one_way,
        lower={p: links.lower_bound(p) for p in peers},
    )
    # Hop boundaries are span boundaries or start/end: moving a boundary between two hops changes the cost
    # linearly (links do not depend on where a hop ends), so it goes to a span boundary or to where a hop
    # empties; dropping the empty hop is no dearer while link delays obey the triangle inequality. Where
    # estimates do not (an unannounced link at `default_rtt`), a one-block relay hop inside a span might
    # look cheaper: the planner does not look for those.
    points = sorted({start, end} | {b for r in peers.values() for b in (r.start, r.end) if start < b < end})
    fastest = _sweep(points, peers, costs, distinct=False)
    if fastest is None:  # every block is served, so this cannot happen
        raise NoRouteError([(start, end)], num_blocks=view.num_blocks)
    hops = fastest
    if len({peer_id for peer_id, _, _ in fastest}) < len(fastest):  # rare: a fast span nested in a slow one
        # the capped search may miss a route; merging the repeats always gives one
        hops = _merge_repeats(fastest)
        distinct = _sweep(points, peers, costs, distinct=True)
        if distinct is not None and _cheaper(
            (_route_cost(distinct, costs), len(distinct)), (_route_cost(hops, costs), len(hops))
        ):
            hops = distinct
    if max_prefix_share < 1:
        hops = _within_prefix_budgets(hops, peers, costs, prefix_of, start, end, max_prefix_share)
    return [_hop(peer_id, peers[peer_id], hop_start, hop_end) for peer_id, hop_start, hop_end in hops]


def _within_prefix_budgets(
    hops: list[tuple[str, int, int]],
    peers: Mapping[str, PeerRecord],
    costs: _Costs,
    prefix_of: Mapping[str, str | None],
    start: int,
    end: int,
    share: float,
) -> list[tuple[str, int, int]]:
    """`hops` if no prefix carries more than its budget (`prefix_budgets`), else the cheapest route found
    in which none does: every prefix that serves more blocks than its budget is held to it, and hop
    boundaries may fall on any block. When the search finds none (it keeps `MAX_LABELS` partial
    routes per state), `hops` stand."""
    budgets = prefix_budgets(peers, prefix_of, start, end, share)
    if all(blocks <= budgets[p] for p, blocks in prefix_blocks(hops, prefix_of).items()):
        return hops
    served: dict[str, set[int]] = {}
    for peer_id, record in peers.items():
        prefix = prefix_of[peer_id]
        if prefix is not None:
            served.setdefault(prefix, set()).update(range(max(start, record.start), min(end, record.end)))
    limited = {
        prefix: budgets[prefix] for prefix, blocks in sorted(served.items()) if len(blocks) > budgets[prefix]
    }
    every_block = list(range(start, end + 1))
    found = _sweep(every_block, peers, costs, distinct=False, budgets=limited, prefix_of=prefix_of)
    if found is not None and len({peer_id for peer_id, _, _ in found}) < len(found):
        # a peer twice: search again among routes without repeats (slower: labels keep the peers used)
        found = _sweep(every_block, peers, costs, distinct=True, budgets=limited, prefix_of=prefix_of)
    return hops if found is None else found


def plan_forward_route(
    view: SwarmView,
    *,
    start: int = 0,
    end: int | None = None,
    banned: Collection[str] = frozenset(),
    rng: random.Random | None = None,
    needs: Needs | None = None,
) -> list[Hop]:
    """A route over `[start, end)` that spreads load: from each block, a usable peer serving it is drawn
    with probability proportional to its throughput and carries the blocks up to the end of its span."""
    start, end = _bounds(view, start, end)
    peers = _require_route(view, start, end, banned, needs)
    rng = rng or random.Random()
    route: list[Hop] = []
    block = start
    while block < end:
        candidates = [(peer_id, r) for peer_id, r in peers.items() if r.start <= block < r.end]
        # forward speed where the peer measured it, else its decode speed
        weights = [
            max(record.forward_throughput or record.throughput, MIN_THROUGHPUT) for _, record in candidates
        ]
        peer_id, record = rng.choices(candidates, weights=weights)[0]
        hop_end = min(record.end, end)
        route.append(_hop(peer_id, record, block, hop_end))
        block = hop_end
    return route


def _bounds(view: SwarmView, start: int, end: int | None) -> tuple[int, int]:
    end = view.num_blocks if end is None else end
    if not 0 <= start < end <= view.num_blocks:
        raise InvalidInputError(f"blocks [{start}, {end}) are not a non-empty range of 0..{view.num_blocks}")
    return start, end


def _require_route(
    view: SwarmView, start: int, end: int, banned: Collection[str], needs: Needs | None
) -> dict[str, PeerRecord]:
    """The usable peers, or `NoRouteError` naming the blocks they leave unserved (and any banned peers
    that would have served part of the range)."""
    missing = missing_blocks(view, start=start, end=end, banned=banned, needs=needs)
    if missing:
        overlapping = {
            peer_id: record
            for peer_id, record in view.peers().items()
            if record.state is PeerState.ONLINE and record.start < end and start < record.end
        }
        excluded = [peer_id for peer_id in overlapping if peer_id in banned]
        too_small = [
            peer_id
            for peer_id, record in overlapping.items()
            if peer_id not in banned and needs is not None and not needs.admits(record)
        ]
        adapter = needs.adapter if needs is not None else ""
        if adapter:  # say which adapters the swarm does serve, and leave out peers lacking the adapter only
            records = view.peers()
            served = {name for record in records.values() for name in record.adapters}
            too_small = [p for p in too_small if adapter in records[p].adapters]
            raise NoRouteError(
                missing,
                num_blocks=view.num_blocks,
                banned=excluded,
                too_small=too_small,
                adapter=adapter,
                adapters=served,
            )
        raise NoRouteError(missing, num_blocks=view.num_blocks, banned=excluded, too_small=too_small)
    return usable_peers(view, banned=banned, needs=needs)


@dataclass(frozen=True)
class _Label:
    """A route from the planning start to some point: its cost, hop count, the peers it used that could
    still serve later blocks, the blocks it gave each budgeted prefix, and its last hop (`peer_id` from
    block `start`, reached from `previous`)."""

    cost: float
    hops: int
    used: frozenset[str]
    previous: _Label | None
    peer_id: str
    start: int
    spent: tuple[int, ...] = ()  # per budgeted prefix, in the order of `_sweep`'s `budgets`

    def extended(self, cost: float, spent: tuple[int, ...]) -> _Label:
        return _Label(self.cost + cost, self.hops, self.used, self.previous, self.peer_id, self.start, spent)


def _sweep(
    points: list[int],
    peers: Mapping[str, PeerRecord],
    costs: _Costs,
    *,
    distinct: bool,
    budgets: Mapping[str, int] | None = None,
    prefix_of: Mapping[str, str | None] | None = None,
) -> list[tuple[str, int, int]] | None:
    """The cheapest route from points[0] to points[-1] as (peer_id, start, end) hops; with `distinct`, no peer
    twice (labels of one state then differ in the peers they used; the caps bound the work, so this may find
    nothing); with `budgets` (prefix -> blocks), the peers of those prefixes (`prefix_of`) carry at most
    that many blocks. A state is a point and the last hop's peer."""
    budgets, prefix_of = budgets or {}, prefix_of or {}
    limits = list(budgets.values())
    order = {prefix: index for index, prefix in enumerate(budgets)}
    slot = {peer_id: order[p] for peer_id, p in prefix_of.items() if p is not None and p in order}

    def spend(label: _Label, peer_id: str, blocks: int) -> tuple[int, ...] | None:
        """`label`'s budgets after `peer_id` carries `blocks` more; None when over a budget."""
        index = slot.get(peer_id)
        if index is None:
            return label.spent
        spent = list(label.spent)
        spent[index] += blocks
        return tuple(spent) if spent[index] <= limits[index] else None

    def price(label: _Label, peer_id: str, blocks: int) -> float | None:
        """`label`'s cost with a hop through `peer_id` over `blocks` blocks after it; None if not allowed."""
        if peer_id in label.used or spend(label, peer_id, blocks) is None:
            return None
        link = costs.enter[peer_id] if label.previous is None else costs.link(label.peer_id, peer_id)
        return label.cost + link + blocks * costs.per_block[peer_id]

    def open_hop(label: _Label, cost: float, peer_id: str, point: int, blocks: int) -> _Label:
        spent = spend(label, peer_id, blocks)
        assert spent is not None  # `price` said it is allowed
        used = label.used | {peer_id} if distinct else label.used
        return _Label(cost, label.hops + 1, used, label, peer_id, point, spent)

    # Left to right: `closed` holds routes whose last hop ends at the point, `inside[q]` routes in the
    # middle of a hop through q. The next link's cost depends on the last hop's peer, so labels compete
    # (`_select`) only with labels that share it: per q in `inside`, per last peer in `closed`.
    closed = [_Label(0.0, 0, frozenset(), None, "", points[0], (0,) * len(limits))]
    inside: dict[str, list[_Label]] = {}
    for point, next_point in itertools.pairwise(points):
        blocks = next_point - point
        advanced: dict[str, list[_Label]] = {}
        for peer_id, labels in inside.items():
            if peers[peer_id].end >= next_point:
                step = blocks * costs.per_block[peer_id]
                advanced[peer_id] = [
                    label.extended(step, spent)
                    for label in labels
                    if (spent := spend(label, peer_id, blocks)) is not None
                ]
        # closed routes by the least their next hop's link can cost: `_cheapest` opens hops from them only
        # while that bound could beat what it already holds; where labels differ in more than cost, only the
        # most promising go on
        bounded = sorted(
            (
                (label.cost + (costs.lower[label.peer_id] if label.previous is not None else 0.0), label)
                for label in closed
            ),
            key=lambda item: item[0],
        )
        if distinct or limits:
            bounded = bounded[:MAX_OPENING]
        # hops under way first: equal routes go to the one found first
        serving = [
            *advanced,
            *(p for p, r in peers.items() if r.start <= point < r.end and p not in advanced),
        ]
        inside = {
            peer_id: _cheapest(
                advanced.get(peer_id, []),
                bounded,
                functools.partial(price, peer_id=peer_id, blocks=blocks),
                functools.partial(open_hop, peer_id=peer_id, point=point, blocks=blocks),
            )
            for peer_id in serving
        }
        # a peer whose span ends here cannot serve a later hop: forget it
        ending = [
            _select(
                [
                    _Label(label.cost, label.hops, used, label.previous, peer_id, label.start, label.spent)
                    for label in labels
                    for used in [frozenset(q for q in label.used if peers[q].end > next_point)]
                ]
            )
            for peer_id, labels in inside.items()
        ]
        closed = sorted(itertools.chain.from_iterable(ending), key=lambda label: (label.cost, label.hops))
    hops: list[tuple[str, int, int]] = []
    best: tuple[float, int, _Label] | None = None
    for label in closed:  # the result travels on from the last hop to the sink
        total = label.cost + costs.leave[label.peer_id]
        if best is None or _cheaper((total, label.hops), best[:2]):
            best = (total, label.hops, label)
    last = best[2] if best is not None else None
    stop = points[-1]
    while last is not None and last.previous is not None:
        hops.append((last.peer_id, last.start, stop))
        stop, last = last.start, last.previous
    return hops[::-1] or None


def _merge_repeats(hops: list[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
    """A peer's hops and everything between them become one hop of that peer (its span covers them all)."""
    merged: list[tuple[str, int, int]] = []
    for peer_id, start, end in hops:
        earlier = next((i for i, hop in enumerate(merged) if hop[0] == peer_id), None)
        if earlier is not None:
            start = merged[earlier][1]
            del merged[earlier:]
        merged.append((peer_id, start, end))
    return merged


def _route_cost(hops: list[tuple[str, int, int]], costs: _Costs) -> float:
    links = sum(costs.link(a[0], b[0]) for a, b in itertools.pairwise(hops))
    compute = sum((end - start) * costs.per_block[peer_id] for peer_id, start, end in hops)
    return costs.enter[hops[0][0]] + compute + links + costs.leave[hops[-1][0]]


@dataclass(frozen=True)
class _Costs:
    """Seconds of one decode step spent on each part of a route (see `plan_inference_route`)."""

    per_block: Mapping[str, float]  # peer_id -> compute per block
    enter: Mapping[str, float]  # peer_id -> one way from the route's source to it
    leave: Mapping[str, float]  # peer_id -> one way from it to the route's sink
    link: Callable[[str, str], float]  # one way from one hop to the next
    lower: Mapping[str, float]  # peer_id -> a lower bound of `link` from it to any peer


class _Links:
    """One-way delays, half a round trip. Between the client and p: the client's own measurement `rtt[p]`,
    `default_rtt` when it has none. Between peers p and q: the larger of p's `pings[q]` and q's `pings[p]`
    (either end's announcement can only raise the estimate), `default_rtt` when neither announces it, and
    never less than `|rtt[p] - rtt[q]|` when the client measured both (the triangle inequality).

    Peers announce their own pings, and a hostile one may announce 0 to every peer after it. The client
    measures its links to the first and last hops itself, and a peer's announcement touches only links
    that end at that peer; the triangle bound keeps such a lie from gaining more than the difference
    between the link's true delay and what the client's own round trips imply. Unmeasured peers escape
    that bound, which is one reason the client measures every usable peer it can (`client/latency.py`).
    """

    def __init__(
        self, records: Mapping[str, PeerRecord], rtt: Mapping[str, float], default_rtt: float
    ) -> None:
        for peer_id, seconds in [*rtt.items(), ("(default)", default_rtt)]:
            if not (math.isfinite(seconds) and seconds >= 0):
                raise InvalidInputError(f"rtt of peer {peer_id} must be finite and >= 0, got {seconds}")
        self._pings = {peer_id: record.pings for peer_id, record in records.items()}
        self._rtt = rtt
        self._default = default_rtt
        self._known: dict[tuple[str, str], float] = {}  # the sweep asks for a link once per point
        self._least = dict.fromkeys(records, default_rtt)  # peer_id -> least round trip of a link of it
        for peer_id, pings in self._pings.items():
            for other, seconds in pings.items():
                self._least[peer_id] = min(self._least[peer_id], seconds)
                if other in self._least:
                    self._least[other] = min(self._least[other], seconds)

    def one_way(self, source: str | None, target: str | None) -> float:
        """Seconds from `source` to `target`, one of them a peer; None is the client."""
        if source is None or target is None:
            peer_id = target if source is None else source
            if peer_id is None:
                raise InvalidInputError("a link joins at least one peer")
            return self._rtt.get(peer_id, self._default) / 2
        known = self._known.get((source, target))
        if known is not None:
            return known
        announced = [
            seconds
            for seconds in (self._pings.get(source, {}).get(target), self._pings.get(target, {}).get(source))
            if seconds is not None
        ]
        estimate = max(announced) if announced else self._default
        if source in self._rtt and target in self._rtt:
            estimate = max(estimate, abs(self._rtt[source] - self._rtt[target]))
        self._known[source, target] = estimate / 2
        return estimate / 2

    def lower_bound(self, peer_id: str) -> float:
        """At most `one_way(peer_id, q)` for any peer q: a link is announced, or at `default_rtt`."""
        return self._least.get(peer_id, self._default) / 2


def _block_costs(
    peers: Mapping[str, PeerRecord], block_time: Mapping[str, float], *, median_cap: bool
) -> dict[str, float]:
    """peer_id -> seconds per block. A peer the client has not measured counts with its announced speed
    (blocks per second), with `median_cap` at most the median over address prefixes of the announcements
    (`median_per_prefix`): records claiming a huge throughput cannot pull routes onto themselves, however
    many of them one host or subnet announces."""
    costs = {}
    speeds = {peer_id: max(r.throughput, MIN_THROUGHPUT) * (r.end - r.start) for peer_id, r in peers.items()}
    cap = median_per_prefix(speeds, prefixes(peers)) if speeds and median_cap else math.inf
    for peer_id in peers:
        measured = block_time.get(peer_id)
        if measured is not None and math.isfinite(measured) and measured >= 0:
            costs[peer_id] = measured
        else:
            costs[peer_id] = 1.0 / min(speeds[peer_id], cap)
    return costs


def _select(labels: list[_Label], cap: int = MAX_LABELS) -> list[_Label]:
    """Up to `cap` labels, cheapest first, dropping each that a kept one dominates (no more expensive, used
    no more peers and spent no more of any budget); stable, so ties go to the label found first."""
    kept: list[_Label] = []
    for label in sorted(labels, key=lambda label: (label.cost, label.hops)):
        if len(kept) == cap:
            break
        if not any(not _better(label, old) and _covers(label, old) for old in kept):
            # costs equal up to rounding sort either way; the one with fewer hops dominates
            kept = [old for old in kept if _better(old, label) or not _covers(old, label)]
            kept.append(label)
    return kept


def _cheapest(
    ready: list[_Label],
    bounded: list[tuple[float, _Label]],
    price: Callable[[_Label], float | None],
    make: Callable[[_Label, float], _Label],
    cap: int = MAX_LABELS,
) -> list[_Label]:
    """What `_select` keeps of `ready` and of a hop opened from each label of `bounded` (`price` is its cost,
    None when not allowed; `make` builds it), pricing and building only what it could keep: `bounded` pairs
    labels with a lower bound of their price, ascending. Labels leave a heap cheapest first once no bound
    left is below them; a kept label that used no peer and spent no budget (every label, in the plain
    sweep) dominates all that are not as cheap, which ends the search."""
    heap: list[tuple[float, int, int, _Label | None, _Label]] = [
        (label.cost, label.hops, index, label, label) for index, label in enumerate(ready)
    ]
    heapq.heapify(heap)
    order = itertools.count(len(heap))
    kept: list[_Label] = []
    bare: _Label | None = None
    position = 0
    while len(kept) < cap:
        while position < len(bounded) and (not heap or _at_most(bounded[position][0], heap[0][0])):
            parent = bounded[position][1]
            position += 1
            cost = price(parent)
            if cost is not None and (bare is None or _at_most(cost, bare.cost)):
                heapq.heappush(heap, (cost, parent.hops + 1, next(order), None, parent))
        if not heap or (bare is not None and not _at_most(heap[0][0], bare.cost)):
            break
        cost, _, _, built, parent = heapq.heappop(heap)
        label = built if built is not None else make(parent, cost)
        if not any(not _better(label, old) and _covers(label, old) for old in kept):
            kept = [old for old in kept if _better(old, label) or not _covers(old, label)]
            kept.append(label)
            if not label.used and not any(label.spent):
                bare = label
    return kept


def _at_most(value: float, limit: float) -> bool:
    """`value` <= `limit`, or equal up to float rounding (as `_cheaper` counts ties)."""
    return value <= limit or math.isclose(value, limit, rel_tol=_REL_TOLERANCE, abs_tol=1e-12)


def _covers(label: _Label, other: _Label) -> bool:
    """Whether `label` used every peer `other` used and spent at least as much of every budget."""
    if not other.used <= label.used:
        return False
    return other.spent == label.spent or all(o <= s for o, s in zip(other.spent, label.spent, strict=True))


def _better(candidate: _Label, incumbent: _Label) -> bool:
    return _cheaper((candidate.cost, candidate.hops), (incumbent.cost, incumbent.hops))


def _cheaper(candidate: tuple[float, int], incumbent: tuple[float, int]) -> bool:
    """(cost, hops): cheaper, or as cheap up to float rounding with fewer hops."""
    if math.isclose(candidate[0], incumbent[0], rel_tol=_REL_TOLERANCE, abs_tol=1e-12):
        return candidate[1] < incumbent[1]
    return candidate[0] < incumbent[0]
