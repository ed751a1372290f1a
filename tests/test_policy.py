"""The client's one failure policy (status code -> action, backoff, retry budget), the announced limits
routing respects, and the hop deadlines: pure tables, no network."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch

from client.config import ClientConfig
from client.deadlines import HopDeadlines
from client.discovery import BanList, SwarmView
from client.errors import (
    Action,
    NoRouteError,
    PeerFailure,
    Retries,
    SwarmError,
    SwarmUnavailableError,
    action,
    backoff_delay,
)
from client.route import Hop, Needs, PeerStats, plan_forward_route, plan_inference_route
from protos.errors import InvalidInputError
from protos.records import PeerRecord, PeerState

Code = grpc.StatusCode


@pytest.mark.parametrize(
    ("code", "limit", "expected"),
    [
        (Code.UNAVAILABLE, None, Action.BAN),
        (Code.DEADLINE_EXCEEDED, None, Action.BAN),
        (Code.INTERNAL, None, Action.BAN),
        (Code.UNKNOWN, None, Action.BAN),
        (Code.CANCELLED, None, Action.BAN),
        (Code.PERMISSION_DENIED, None, Action.BAN),  # not in the table: treated like UNAVAILABLE
        (Code.RESOURCE_EXHAUSTED, None, Action.AVOID),
        (Code.NOT_FOUND, None, Action.REOPEN),
        (Code.FAILED_PRECONDITION, None, Action.REOPEN),
        (Code.INVALID_ARGUMENT, None, Action.RAISE),
        (Code.INVALID_ARGUMENT, "max_length", Action.AVOID),  # the peer's own limit: another may take it
    ],
)
def test_failure_policy_table(code: grpc.StatusCode, limit: str | None, expected: Action) -> None:
    assert action(PeerFailure(code, "x", "peer-a", limit=limit)) is expected


@pytest.mark.parametrize(
    ("attempt", "expected"), [(1, 0.25), (2, 0.5), (3, 1.0), (4, 2.0), (5, 4.0), (6, 4.0), (40, 4.0)]
)
def test_backoff_doubles_up_to_the_cap(attempt: int, expected: float) -> None:
    config = ClientConfig()
    delay = backoff_delay(attempt, retry_delay=config.retry_delay, max_retry_delay=config.max_retry_delay)
    assert delay == expected


def _retries(max_retries: int = 2) -> tuple[Retries, BanList]:
    config = ClientConfig(max_retries=max_retries, retry_delay=0.001, max_retry_delay=0.002)
    bans = BanList(config.ban_timeout, config.ban_backoff, config.max_ban_timeout)
    return Retries(config, bans, what="test"), bans


def test_retries_ban_avoid_reopen_and_raise() -> None:
    retries, bans = _retries(max_retries=5)

    async def run() -> None:
        assert await retries.failed(PeerFailure(Code.UNAVAILABLE, "down", "a")) is Action.BAN
        assert await retries.failed(PeerFailure(Code.RESOURCE_EXHAUSTED, "full", "b")) is Action.AVOID
        assert await retries.failed(PeerFailure(Code.NOT_FOUND, "gone", "c")) is Action.REOPEN
        with pytest.raises(InvalidInputError, match="bad shape"):
            await retries.failed(PeerFailure(Code.INVALID_ARGUMENT, "bad shape", "d"))

    asyncio.run(run())
    assert bans.banned() == {"a"}  # avoiding a full peer is for this request only
    assert retries.avoided == {"b"}
    assert retries.excluded() == frozenset({"a", "b"})
    assert len(retries.failures) == 3  # the caller's error is not a retry


def test_retries_give_up_after_the_budget() -> None:
    retries, _ = _retries(max_retries=2)

    async def run() -> None:
        await retries.failed(PeerFailure(Code.UNAVAILABLE, "down", "a"))
        await retries.failed(PeerFailure(Code.UNAVAILABLE, "down", "b"))
        with pytest.raises(SwarmUnavailableError, match="gave up after 3 failures"):
            await retries.failed(PeerFailure(Code.UNAVAILABLE, "down", "c"))

    asyncio.run(run())


def test_retries_end_with_the_swarm_error_itself() -> None:
    """A swarm that cannot be routed is waited for; the last error says which blocks are missing."""
    retries, _ = _retries(max_retries=1)
    missing = NoRouteError([(3, 4)], num_blocks=4)

    async def run() -> None:
        assert await retries.failed(SwarmError("no view yet")) is None
        with pytest.raises(NoRouteError, match="blocks 3 "):
            await retries.failed(missing)

    asyncio.run(run())


def _record(port: int, start: int, end: int, **fields) -> PeerRecord:
    values = dict(
        state=PeerState.ONLINE,
        address=f"127.0.0.1:{port}",
        start=start,
        end=end,
        throughput=10.0,
        free_cache_tokens=16384,
        max_length=8192,
        dtype="float32",
        version="test",
    )
    return PeerRecord(**(values | fields))


@pytest.mark.parametrize(
    ("needs", "fields", "admitted"),
    [
        (Needs(max_length=200), {}, True),
        (Needs(max_length=200), {"max_length": 64}, False),
        (Needs(max_length=64), {"max_length": 64}, True),
        (Needs(batch_size=4, max_length=100), {"free_cache_tokens": 399}, False),
        (Needs(batch_size=4, max_length=100, free_cache=False), {"free_cache_tokens": 399}, True),
        (Needs(batch_size=4, max_length=100), {"free_cache_tokens": 400}, True),
        (Needs(batch_size=17), {"max_batch_size": 16}, False),
        (Needs(batch_size=17), {}, True),  # an older peer that announces no batch limit
        (Needs(forward_tokens=5000), {"max_forward_tokens": 4096}, False),
        (Needs(forward_tokens=4096), {"max_forward_tokens": 4096}, True),
        (Needs(forward_tokens=5000), {"free_cache_tokens": 0}, True),  # a stateless pass needs no cache
    ],
)
def test_needs_against_announced_limits(needs: Needs, fields: dict, admitted: bool) -> None:
    assert needs.admits(_record(5000, 0, 2, **fields)) is admitted


def test_routes_skip_peers_whose_limits_are_too_small() -> None:
    view = SwarmView.from_records(
        2,
        {
            "short": _record(5001, 0, 2, max_length=64, throughput=1000.0),
            "long": _record(5002, 0, 2, throughput=1.0),
        },
    )
    assert [hop.peer_id for hop in plan_inference_route(view)] == ["short"]  # faster when it fits
    route = plan_inference_route(view, needs=Needs(max_length=200))
    assert [(hop.peer_id, hop.start, hop.end) for hop in route] == [("long", 0, 2)]
    assert [hop.peer_id for hop in plan_forward_route(view, needs=Needs(forward_tokens=10))] in (
        ["short"],
        ["long"],
    )
    with pytest.raises(NoRouteError, match="1 peer\\(s\\) announce limits") as error:
        plan_inference_route(view, banned={"long"}, needs=Needs(max_length=200))
    assert error.value.too_small == ["short"] and error.value.banned == ["long"]


class _Swarm:
    """What `HopDeadlines` reads of a swarm connection."""

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self.stats = PeerStats()


@pytest.mark.parametrize(
    ("measured", "positions", "expected"),
    [
        (None, 1, 5.0),  # nothing known about the peer: the longest wait before a ping
        (0.001, 1, 0.5),  # 4 x (2 blocks x 1 ms) is under the floor
        (0.1, 1, 0.8),  # 4 x (2 blocks x 100 ms)
        (0.2, 1, 1.6),
        (0.05, 8, 3.2),  # a prefill of 8 positions expects 8 decode steps' time
        (0.1, 8, 5.0),  # capped
    ],
)
def test_hop_timeout_follows_what_the_client_measured(
    measured: float | None, positions: int, expected: float
) -> None:
    swarm = _Swarm(ClientConfig())
    deadlines = HopDeadlines(swarm)  # type: ignore[arg-type]
    if measured is not None:
        swarm.stats.observe_step("a", 2, measured * 2)
    hop = Hop("a", "127.0.0.1:1", 0, 2)
    assert deadlines.hop_timeout(hop, positions) == pytest.approx(expected)


def test_hop_timeout_uses_the_announced_throughput_before_measuring() -> None:
    swarm = _Swarm(ClientConfig())
    deadlines = HopDeadlines(swarm)  # type: ignore[arg-type]
    view = SwarmView.from_records(4, {"a": _record(5001, 0, 4, throughput=2.5)})  # 0.4 s per step
    deadlines.expect(view, [Hop("a", "127.0.0.1:5001", 0, 2)])
    assert deadlines.hop_timeout(Hop("a", "127.0.0.1:5001", 0, 2), 1) == pytest.approx(4 * 0.2)


def test_config_rejects_inverted_limits() -> None:
    with pytest.raises(ValueError, match="max_hop_timeout"):
        ClientConfig(min_hop_timeout=2.0, max_hop_timeout=1.0)
    with pytest.raises(ValueError, match="max_retry_delay"):
        ClientConfig(retry_delay=5.0)
    assert torch.tensor(ClientConfig().hop_timeout_factor) >= 1
