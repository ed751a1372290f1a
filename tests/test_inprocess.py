"""Inference sessions against in-process peers (tests/fakes.py) with faults switched on mid-session: every
step's output is bit for bit what the same blocks compute locally, and each failure is handled as the one
failure policy says (DESIGN.md "Failure handling")."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import torch
from fakes import FakePeer, FakeSwarm, hidden_states

from client.errors import NoRouteError
from client.session import InferenceSession
from client.swarm import SwarmConnection
from protos import peer_pb2, peer_pb2_grpc
from protos.errors import InvalidInputError

TWO_PER_SPAN = [(0, 1), (0, 1), (1, 3), (1, 3), (3, 4), (3, 4)]
ONE_PER_SPAN = [(0, 1), (1, 3), (3, 4)]
STEPS = [7, 1, 1, 1, 1, 1, 1, 1]  # a prefill of 7 positions, then decode steps
STEP_LIMIT = 30.0  # seconds: no step may hang a test
Action = Callable[[InferenceSession], None]


@dataclass
class Run:
    outputs: list[torch.Tensor]  # each step's output [batch, seq, hidden]
    route: list[tuple[str, int, int]]  # (peer_id, start, end) of every hop at the end
    num_failovers: int
    seconds: list[float]  # each step's wall time


def steps(batch: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(hidden [batch, seq, 64], positions [batch, seq]) of every step of STEPS."""
    out, position = [], 0
    for index, seq in enumerate(STEPS):
        out.append(
            (hidden_states(batch, seq, seed=index), torch.arange(position, position + seq).expand(batch, -1))
        )
        position += seq
    return out


def reference(swarm: FakeSwarm, batch: int = 1) -> list[torch.Tensor]:
    span = swarm.local_span()
    cache = span.new_cache()
    return [span.forward(hidden, cache, positions) for hidden, positions in steps(batch)]


def run(connection: SwarmConnection, actions: dict[int, Action] | None = None, *, batch: int = 1) -> Run:
    """STEPS through one session; `actions[i](session)` runs just before step i."""
    session = connection.new_session(max_length=64)
    outputs, seconds = [], []
    try:
        for index, (hidden, positions) in enumerate(steps(batch)):
            if actions and index in actions:
                actions[index](session)
            started = time.monotonic()
            outputs.append(connection.runtime.run(session.astep(hidden, positions), timeout=STEP_LIMIT))
            seconds.append(time.monotonic() - started)
        route = [(hop.peer_id, hop.start, hop.end) for hop in session.route]
        return Run(outputs, route, session.num_failovers, seconds)
    finally:
        connection.runtime.run(session.aclose(), timeout=STEP_LIMIT)


def submit(connection: SwarmConnection, coroutine: Coroutine[Any, Any, torch.Tensor]) -> Future[torch.Tensor]:
    """Start `coroutine` on the client's loop without waiting for it."""
    return asyncio.run_coroutine_threadsafe(coroutine, connection.runtime.loop)


def hop(swarm: FakeSwarm, session: InferenceSession, index: int) -> FakePeer:
    return swarm[session.route[index].peer_id]


def assert_exact(outputs: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(outputs) == len(expected)
    for index, (output, want) in enumerate(zip(outputs, expected, strict=True)):
        assert torch.equal(output, want), f"step {index} differs by {(output - want).abs().max()}"


@pytest.fixture(autouse=True)
def _no_diverging_replay(caplog: pytest.LogCaptureFixture):
    """A replay that recomputes a different cache is a bug even when the final output looks right."""
    with caplog.at_level(logging.WARNING, logger="client.session"):
        yield
    assert "replay differs" not in caplog.text


def test_fake_peer_switches_as_seen_by_a_ping(fake_swarm) -> None:
    """The fake itself: frozen, a peer answers nothing until thawed; killed, it refuses connections."""
    swarm = fake_swarm([(0, 4)])
    (peer,) = swarm.peers
    with grpc.insecure_channel(peer.address) as channel:
        stub = peer_pb2_grpc.PeerStub(channel)
        assert stub.Info(peer_pb2.InfoRequest(), timeout=5).peer_id == peer.peer_id
        peer.freeze()
        with pytest.raises(grpc.RpcError) as frozen:
            stub.Info(peer_pb2.InfoRequest(), timeout=0.3)
        assert frozen.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        peer.thaw()
        assert stub.Info(peer_pb2.InfoRequest(), timeout=5).end == 4
        peer.kill()
        with pytest.raises(grpc.RpcError) as killed:
            stub.Info(peer_pb2.InfoRequest(), timeout=5)
        assert killed.value.code() == grpc.StatusCode.UNAVAILABLE


def test_fault_free_session_matches_local_blocks(fake_swarm, connect) -> None:
    swarm = fake_swarm(ONE_PER_SPAN)
    result = run(connect(swarm), batch=2)
    assert_exact(result.outputs, reference(swarm, batch=2))
    assert [hop[1:] for hop in result.route] == ONE_PER_SPAN and result.num_failovers == 0


@pytest.mark.parametrize("index", [0, 1, 2])
def test_killed_hop_is_banned_replaced_and_replayed(fake_swarm, connect, index: int) -> None:
    swarm = fake_swarm(TWO_PER_SPAN)
    connection = connect(swarm)
    killed: list[FakePeer] = []

    def kill(session: InferenceSession) -> None:
        killed.append(hop(swarm, session, index))
        killed[0].kill()

    result = run(connection, {4: kill})
    assert_exact(result.outputs, reference(swarm))
    assert result.num_failovers == 1
    assert connection.bans.banned() == {killed[0].peer_id}
    replacement = result.route[index]
    assert replacement[0] != killed[0].peer_id and replacement[1:] == (killed[0].start, killed[0].end)


def test_first_hop_killed_during_the_first_prefill(fake_swarm, connect) -> None:
    """No step has reached the client yet: the route is rebuilt from the embeddings alone."""
    swarm = fake_swarm(TWO_PER_SPAN)
    firsts = [peer for peer in swarm.peers if peer.start == 0]
    for peer in firsts:
        peer.slow(1.0, at_least=0.5)
    connection = connect(swarm)
    session = connection.new_session(max_length=64)
    hidden, positions = steps()[0]
    pending = submit(connection, session.astep(hidden, positions))
    deadline = time.monotonic() + STEP_LIMIT
    while not any(peer.num_computes for peer in firsts) and time.monotonic() < deadline:
        time.sleep(0.005)
    (computing,) = [peer for peer in firsts if peer.num_computes]
    computing.kill()
    output = pending.result(STEP_LIMIT)
    assert torch.equal(output, reference(swarm)[0])
    assert session.num_failovers == 1 and session.route[0].peer_id != computing.peer_id
    connection.runtime.run(session.aclose())


def test_frozen_hop_is_detected_and_replaced(fake_swarm, connect) -> None:
    swarm = fake_swarm(TWO_PER_SPAN)
    connection = connect(swarm)
    frozen: list[FakePeer] = []

    def freeze(session: InferenceSession) -> None:
        frozen.append(hop(swarm, session, 1))
        frozen[0].freeze()

    result = run(connection, {3: freeze})
    assert_exact(result.outputs, reference(swarm))
    assert result.num_failovers == 1 and connection.bans.banned() == {frozen[0].peer_id}
    assert frozen[0].peer_id not in [peer_id for peer_id, _, _ in result.route]
    # min_hop_timeout 0.2 s, then one unanswered ping of ping_timeout 1 s: not a forward_timeout
    assert result.seconds[3] < 5.0


@pytest.mark.parametrize("dropping", [[1], [0, 1, 2]])
def test_dropped_sessions_are_reopened_and_replayed_without_a_ban(fake_swarm, connect, dropping) -> None:
    """NOT_FOUND (a peer restarted or expired the session): the same peers open it again and replay."""
    swarm = fake_swarm(ONE_PER_SPAN)
    connection = connect(swarm)

    def drop(session: InferenceSession) -> None:
        for index in dropping:
            hop(swarm, session, index).drop_sessions()

    result = run(connection, {4: drop})
    assert_exact(result.outputs, reference(swarm))
    assert result.num_failovers == len(dropping)
    assert connection.bans.banned() == set()
    assert [peer_id for peer_id, _, _ in result.route] == [peer.peer_id for peer in swarm.peers]


@pytest.mark.parametrize(
    ("code", "banned", "replaced"),
    [
        (grpc.StatusCode.UNAVAILABLE, True, True),
        (grpc.StatusCode.DEADLINE_EXCEEDED, True, True),
        (grpc.StatusCode.INTERNAL, True, True),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, False, True),  # avoided by this session, not banned
        (grpc.StatusCode.NOT_FOUND, False, False),  # reopened on the same peer
        (grpc.StatusCode.FAILED_PRECONDITION, False, False),
    ],
)
def test_step_failure_policy(
    fake_swarm, connect, code: grpc.StatusCode, banned: bool, replaced: bool
) -> None:
    """One failed step on the middle hop. A peer that is reopened is the only one for its span, so a ban
    or an avoidance there would end in NoRouteError."""
    swarm = fake_swarm(TWO_PER_SPAN if replaced else ONE_PER_SPAN)
    connection = connect(swarm)
    failing: list[FakePeer] = []

    def fail(session: InferenceSession) -> None:
        failing.append(hop(swarm, session, 1))
        failing[0].fail_next(code, on=("step",))

    result = run(connection, {3: fail})
    assert_exact(result.outputs, reference(swarm))
    assert result.num_failovers == 1
    assert connection.bans.banned() == ({failing[0].peer_id} if banned else set())
    assert (result.route[1][0] != failing[0].peer_id) is replaced


@pytest.mark.parametrize("injected", [True, False])
def test_full_peer_on_open_is_avoided_for_another(fake_swarm, connect, injected: bool) -> None:
    """RESOURCE_EXHAUSTED on open: the announced-fastest peer has no room (injected, or a real full cache
    behind a stale announcement); the slower one serves, and the full one is not banned."""
    swarm = fake_swarm([])
    full = swarm.add(0, 4, throughput=1000.0, max_cache_tokens=16 if not injected else 16384)
    roomy = swarm.add(0, 4, throughput=10.0)
    if injected:
        full.fail_next(grpc.StatusCode.RESOURCE_EXHAUSTED, on=("open",))
    else:
        full.announce_as(free_cache_tokens=10**6)
    connection = connect(swarm)
    result = run(connection)
    assert_exact(result.outputs, reference(swarm))
    assert [peer_id for peer_id, _, _ in result.route] == [roomy.peer_id]
    assert result.num_failovers == 1 and connection.bans.banned() == set()


@pytest.mark.parametrize(
    ("bad_step", "message"),
    [
        ("injected", r"INVALID_ARGUMENT from peer .*injected INVALID_ARGUMENT on step"),
        ("width", r"INVALID_ARGUMENT from peer .*hidden size 65 does not match the model's 64"),
    ],
)
def test_invalid_argument_is_raised_to_the_caller(fake_swarm, connect, bad_step: str, message: str) -> None:
    swarm = fake_swarm(ONE_PER_SPAN)
    connection = connect(swarm)
    session = connection.new_session(max_length=64)
    all_steps, expected = steps(), reference(swarm)
    for index in range(3):
        assert torch.equal(connection.runtime.run(session.astep(*all_steps[index])), expected[index])
    hidden, positions = all_steps[3]
    if bad_step == "injected":
        swarm.peers[1].fail_next(grpc.StatusCode.INVALID_ARGUMENT, on=("step",))
    else:
        hidden = torch.zeros(1, 1, 65)
    with pytest.raises(InvalidInputError, match=message):
        connection.runtime.run(session.astep(hidden, positions))
    assert session.num_failovers == 0 and connection.bans.banned() == set()
    # nothing changed: the session goes on where it was
    for index in range(3, len(STEPS)):
        assert torch.equal(connection.runtime.run(session.astep(*all_steps[index])), expected[index])
    connection.runtime.run(session.aclose())


@pytest.mark.parametrize("index", [1, 2])
def test_garbled_outputs_get_the_peer_replaced(fake_swarm, connect, index: int) -> None:
    swarm = fake_swarm(TWO_PER_SPAN)
    connection = connect(swarm)
    corrupt: list[FakePeer] = []

    def garble(session: InferenceSession) -> None:
        corrupt.append(hop(swarm, session, index))
        corrupt[0].corrupt_outputs(True)

    result = run(connection, {3: garble})
    assert_exact(result.outputs, reference(swarm))
    assert connection.bans.banned() == {corrupt[0].peer_id}
    assert result.route[index][0] != corrupt[0].peer_id
    # a middle hop pushed its good output on before its garbled report reached the client: the next hop
    # has run the step and answers the resent one with FAILED_PRECONDITION, and is reopened
    assert result.num_failovers == 1 if index == 2 else 1 <= result.num_failovers <= 2


def test_every_peer_of_a_span_gone_is_a_clear_error_after_finite_retries(fake_swarm, connect) -> None:
    swarm = fake_swarm(TWO_PER_SPAN)
    connection = connect(swarm)

    def kill_both_last(session: InferenceSession) -> None:
        for peer in swarm.peers[4:]:
            peer.kill()

    started = time.monotonic()
    with pytest.raises(NoRouteError, match=r"no peer serves blocks 3 \(of 4\)") as error:
        run(connection, {4: kill_both_last})
    assert error.value.missing == [(3, 4)]
    assert set(error.value.banned) == {peer.peer_id for peer in swarm.peers[4:]}
    assert time.monotonic() - started < 10  # max_retries 4 with backoff capped at 0.2 s


def test_replacement_with_other_span_boundaries(fake_swarm, connect) -> None:
    """[0,3) + [3,4) is the fast route; when [0,3) dies, [0,2) and [2,4) (used as [2,3)) replace it."""
    swarm = fake_swarm([])
    first = swarm.add(0, 3, throughput=1000.0)
    swarm.add(3, 4, throughput=1000.0)
    swarm.add(0, 2, throughput=1.0)
    swarm.add(2, 4, throughput=1.0)
    result = run(connect(swarm), {4: lambda session: first.kill()})
    assert_exact(result.outputs, reference(swarm))
    assert [hop[1:] for hop in result.route] == [(0, 2), (2, 3), (3, 4)]


def test_two_failures_in_one_session(fake_swarm, connect) -> None:
    swarm = fake_swarm(TWO_PER_SPAN)
    connection = connect(swarm)
    actions = {2: lambda s: hop(swarm, s, 1).kill(), 5: lambda s: hop(swarm, s, 2).freeze()}
    result = run(connection, actions)
    assert_exact(result.outputs, reference(swarm))
    assert result.num_failovers == 2 and len(connection.bans.banned()) == 2


def test_slow_hop_is_waited_on_not_banned(fake_swarm, connect) -> None:
    """A hop that computes for 5 x min_hop_timeout but answers pings is busy, not stuck."""
    swarm = fake_swarm(ONE_PER_SPAN)
    connection = connect(swarm)
    actions = {3: lambda s: hop(swarm, s, 1).slow(1.0, at_least=1.0), 4: lambda s: hop(swarm, s, 1).slow(1.0)}
    result = run(connection, actions)
    assert_exact(result.outputs, reference(swarm))
    assert result.num_failovers == 0 and connection.bans.banned() == set()
    assert result.seconds[3] >= 1.0


def test_draining_peer_finishes_its_step_then_is_replaced(fake_swarm, connect) -> None:
    swarm = fake_swarm(TWO_PER_SPAN)
    connection = connect(swarm)
    session = connection.new_session(max_length=64)
    all_steps, expected = steps(), reference(swarm)
    outputs = [connection.runtime.run(session.astep(*all_steps[index])) for index in range(3)]
    draining = hop(swarm, session, 1)
    draining.slow(1.0, at_least=0.5)
    computes = draining.num_computes
    pending = submit(connection, session.astep(*all_steps[3]))
    deadline = time.monotonic() + STEP_LIMIT
    while draining.num_computes == computes and time.monotonic() < deadline:
        time.sleep(0.005)
    draining.drain()  # returns once the step under way is computed and the server has stopped
    outputs.append(pending.result(STEP_LIMIT))
    assert session.num_failovers == 0  # the step under way was finished, not failed over
    outputs += [connection.runtime.run(session.astep(*all_steps[index])) for index in range(4, len(STEPS))]
    assert_exact(outputs, expected)
    assert session.num_failovers == 1 and session.route[1].peer_id != draining.peer_id
    assert swarm.view().peers()[draining.peer_id].state.value == "offline"
    connection.runtime.run(session.aclose())
