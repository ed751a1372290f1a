"""The client's one failure policy (status code -> action, backoff, retry budget), the announced limits
routing respects, and the hop deadlines: pure tables, no network."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch
from records_factory import peer_record

from client.checks import agrees, result_problem
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
    ("code", "expected"),
    [
        (Code.INVALID_ARGUMENT, Action.BAN),  # the first hop accepted the step: the refusal is the next hop's
        (Code.NOT_FOUND, Action.REOPEN),  # the next hop lost the session
        (Code.PERMISSION_DENIED, Action.REOPEN),  # the next hop holds no session with that id and token
        (Code.RESOURCE_EXHAUSTED, Action.AVOID),
    ],
)
def test_failure_relayed_from_a_push(code: grpc.StatusCode, expected: Action) -> None:
    assert action(PeerFailure(code, "push failed", "peer-b", relayed=True)) is expected


def test_retries_ban_a_relayed_invalid_argument_instead_of_raising() -> None:
    retries, bans = _retries()
    failure = PeerFailure(Code.INVALID_ARGUMENT, "push failed", "peer-b", relayed=True)
    assert asyncio.run(retries.failed(failure)) is Action.BAN
    assert bans.banned() == {"peer-b"}


@pytest.mark.parametrize(
    ("tensor", "problem"),
    [
        (torch.zeros(2, 3, 4), None),
        (torch.zeros(2, 1, 4), "shape [2, 1, 4], expected [2, 3, 4]"),
        (torch.zeros(2, 3, 4, dtype=torch.float16), "dtype torch.float16, expected torch.float32"),
        (torch.zeros(2, 3, 4, dtype=torch.int64), "dtype torch.int64, expected torch.float32"),
        (torch.full((2, 3, 4), float("nan")), "non-finite values"),
        (torch.zeros(2, 3, 4).index_fill_(2, torch.tensor([1]), float("-inf")), "non-finite values"),
    ],
)
def test_result_checks(tensor: torch.Tensor, problem: str | None) -> None:
    assert result_problem(tensor, shape=(2, 3, 4), dtype=torch.float32) == problem


@pytest.mark.parametrize(
    ("dtype", "delta", "expected"),
    [
        (torch.float32, 0.0, True),
        (torch.float32, 1e-6, True),
        (torch.float32, 1e-3, False),
        (torch.bfloat16, 1e-3, True),  # under bfloat16's resolution at 1.0
        (torch.bfloat16, 0.1, False),
    ],
)
def test_recomputation_tolerance(dtype: torch.dtype, delta: float, expected: bool) -> None:
    held = torch.ones(1, 2, 8, dtype=dtype)
    assert agrees((held.float() + delta).to(dtype), held) is expected
    assert not agrees(held[:, :1], held)


def test_bans_decay_after_successes() -> None:
    now = [0.0]
    bans = BanList(10.0, 2.0, 80.0, clock=lambda: now[0])
    assert [bans.ban("bad", "x") for _ in range(3)] == [10.0, 20.0, 40.0]  # next one would last 80 s
    bans.served("bad")  # a success while banned (another session's stream) changes nothing
    now[0] += 40.0
    bans.served("bad")  # next ban 40 s
    assert bans.ban("bad", "x") == 40.0
    now[0] += 40.0
    for _ in range(3):  # 80 -> 40 -> 20 -> forgotten
        bans.served("bad")
    assert bans.ban("bad", "x") == 10.0
    bans.served("never-banned")
    assert bans.banned() == {"bad"}


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


@pytest.mark.parametrize(
    ("needs", "fields", "admitted"),
    [
        (Needs(max_length=200), {}, True),
        (Needs(max_length=200), {"max_length": 64}, False),
        (Needs(max_length=64), {"max_length": 64}, True),
        (Needs(batch_size=4, max_length=100, cached=100), {"free_cache_tokens": 399}, False),
        (Needs(batch_size=4, max_length=100, cached=100, free_cache=False), {"free_cache_tokens": 399}, True),
        (Needs(batch_size=4, max_length=100, cached=100), {"free_cache_tokens": 400}, True),
        (Needs(batch_size=4, max_length=2048), {"free_cache_tokens": 400}, True),  # a limit only
        (Needs(batch_size=4, max_length=2048), {"free_cache_tokens": 3}, False),  # not even one position
        (Needs(batch_size=17), {"max_batch_size": 16}, False),
        (Needs(batch_size=17), {}, True),  # an older peer that announces no batch limit
        (Needs(forward_tokens=5000), {"max_forward_tokens": 4096}, False),
        (Needs(forward_tokens=4096), {"max_forward_tokens": 4096}, True),
        (Needs(forward_tokens=5000), {"free_cache_tokens": 0}, True),  # a stateless pass needs no cache
    ],
)
def test_needs_against_announced_limits(needs: Needs, fields: dict, admitted: bool) -> None:
    assert needs.admits(peer_record(0, 2, port=5000, **fields)) is admitted


def test_routes_skip_peers_whose_limits_are_too_small() -> None:
    view = SwarmView.from_records(
        2,
        {
            "short": peer_record(0, 2, 1000.0, port=5001, max_length=64),
            "long": peer_record(0, 2, 1.0, port=5002),
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
    view = SwarmView.from_records(4, {"a": peer_record(0, 4, 2.5, port=5001)})  # 0.4 s per step
    deadlines.expect(view, [Hop("a", "127.0.0.1:5001", 0, 2)])
    assert deadlines.hop_timeout(Hop("a", "127.0.0.1:5001", 0, 2), 1) == pytest.approx(4 * 0.2)


def test_config_rejects_inverted_limits() -> None:
    with pytest.raises(ValueError, match="max_hop_timeout"):
        ClientConfig(min_hop_timeout=2.0, max_hop_timeout=1.0)
    with pytest.raises(ValueError, match="max_retry_delay"):
        ClientConfig(retry_delay=5.0)
    assert torch.tensor(ClientConfig().hop_timeout_factor) >= 1


@pytest.mark.parametrize(
    ("sybil_throughput", "measured", "expected"),
    [
        # honest peers announce 10 steps/s over 2 blocks (20 blocks/s) and run at 100 blocks/s: the
        # Sybil's 10^9 counts as the median 20 blocks/s, slower than what was measured
        (1e9, {"honest-a": 0.01, "honest-b": 0.01}, ["honest-a"]),
        # measured slower than the median announcement: the capped Sybil is still a fair candidate
        (1e9, {"honest-a": 0.1, "honest-b": 0.1}, ["sybil"]),
        # nothing measured: the Sybil ties with the median, and the tie goes to the first peer
        (1e9, {}, ["honest-a"]),
        (5.0, {}, ["honest-a"]),  # announcing less than the median is taken at its word
    ],
)
def test_unmeasured_throughput_is_capped_at_the_median(
    sybil_throughput: float, measured: dict[str, float], expected: list[str]
) -> None:
    """Sessions plan with `median_cap`; without it, the Sybil's claim would win every case but the last."""
    view = SwarmView.from_records(
        2,
        {
            "honest-a": peer_record(0, 2, 10.0, port=5001),
            "honest-b": peer_record(0, 2, 10.0, port=5002),
            "sybil": peer_record(0, 2, sybil_throughput, port=5003),
        },
    )
    route = plan_inference_route(view, block_time=measured, median_cap=True)
    assert [hop.peer_id for hop in route] == expected
    uncapped = plan_inference_route(view, block_time=measured)
    assert [hop.peer_id for hop in uncapped] == (["sybil"] if sybil_throughput > 10.0 else expected)
