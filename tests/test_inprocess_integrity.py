"""What the client believes of a hostile or broken hop, against in-process peers (tests/fakes.py): results
of the wrong shape, dtype or with NaNs, replays that do not reproduce the session, StepErrors framing
other peers, refusals relayed from a push, a crashing reply decoder; and the per-hop session ids and push
tokens a session hands out. In each case the generation still equals the local one."""

from __future__ import annotations

import time
from typing import Any

import grpc
import pytest
import torch
from fakes import FakePeer, FakeSwarm
from test_inprocess import ONE_PER_SPAN, TWO_PER_SPAN, assert_exact, hop, reference, run
from test_inprocess_model import _forward_backward

import client.streams
from client.session import InferenceSession
from protos import peer_pb2


@pytest.mark.parametrize(
    ("mode", "index"), [("nan", 1), ("nan", 2), ("shape", 1), ("dtype", 2), ("bytes", 0), ("nan", 0)]
)
def test_bad_results_get_the_peer_banned(fake_swarm, connect, mode: str, index: int) -> None:
    swarm = fake_swarm(TWO_PER_SPAN)
    connection = connect(swarm)
    corrupt: list[FakePeer] = []

    def garble(session: InferenceSession) -> None:
        corrupt.append(hop(swarm, session, index))
        corrupt[0].corrupt_outputs(mode=mode)

    result = run(connection, {3: garble})
    assert_exact(result.outputs, reference(swarm))
    assert connection.bans.banned() == {corrupt[0].peer_id}
    assert result.route[index][0] != corrupt[0].peer_id
    # a hop that pushed its good output on before its bad report arrived leaves each later hop a step
    # ahead, which may answer FAILED_PRECONDITION once and be reopened
    assert 1 <= result.num_failovers <= len(result.route) - index


def test_replay_that_differs_bans_the_replaying_peer(fake_swarm, connect) -> None:
    """The middle hop dies; the next-best peer for its blocks replays the history wrong (off by 0.01): it is
    banned, and an honest one replays the session instead."""
    swarm = fake_swarm([])
    swarm.add(0, 1, throughput=1000.0)
    first = swarm.add(1, 3, throughput=500.0)  # 1000 blocks/s, the route's choice
    liar = swarm.add(1, 3, throughput=400.0)  # 800 blocks/s: the first replacement
    honest = swarm.add(1, 3, throughput=1.0)
    swarm.add(3, 4, throughput=1000.0)
    liar.corrupt_outputs(mode="perturb")
    connection = connect(swarm, verify_every=0)  # the replay alone decides: a spot check may catch it first

    def kill(session: InferenceSession) -> None:
        assert hop(swarm, session, 1) is first
        first.kill()

    result = run(connection, {4: kill})
    assert_exact(result.outputs, reference(swarm))
    assert connection.bans.banned() == {first.peer_id, liar.peer_id}
    assert result.route[1][0] == honest.peer_id and result.num_failovers == 2


@pytest.mark.parametrize(
    ("reporter", "named", "culprit"),
    [
        (0, "off-route", 0),  # an honest peer not on the route: the reporter takes the blame
        (2, 0, 2),  # an earlier hop cannot have failed this hop's push: the reporter takes the blame
        (0, 2, 2),  # a later hop (a failed push) is believed
    ],
)
def test_step_error_may_blame_only_the_reporter_or_a_later_hop(
    fake_swarm, connect, reporter: int, named: Any, culprit: int
) -> None:
    swarm = fake_swarm(TWO_PER_SPAN)
    connection = connect(swarm)
    blamed: list[FakePeer] = []

    def frame(session: InferenceSession) -> None:
        on_route = {hop.peer_id for hop in session.route}
        if named == "off-route":
            target = next(peer for peer in swarm.peers if peer.peer_id not in on_route)
        else:
            target = hop(swarm, session, named)
        blamed.append(hop(swarm, session, culprit))
        hop(swarm, session, reporter).blame_next(target.peer_id)

    result = run(connection, {3: frame})
    assert_exact(result.outputs, reference(swarm))
    assert connection.bans.banned() == {blamed[0].peer_id}
    assert result.route[culprit][0] != blamed[0].peer_id


def test_invalid_argument_relayed_from_a_push_fails_over(fake_swarm, connect) -> None:
    """The middle hop refuses the first hop's push: the step was valid (the first hop took it), so the
    refusing peer is banned and replaced; nothing is raised to the caller."""
    swarm = fake_swarm(TWO_PER_SPAN)
    connection = connect(swarm)
    refusing: list[FakePeer] = []

    def refuse(session: InferenceSession) -> None:
        refusing.append(hop(swarm, session, 1))
        refusing[0].fail_next(grpc.StatusCode.INVALID_ARGUMENT, on=("push",))

    result = run(connection, {3: refuse})
    assert_exact(result.outputs, reference(swarm))
    assert connection.bans.banned() == {refusing[0].peer_id}
    assert result.route[1][0] != refusing[0].peer_id and result.num_failovers == 1


def test_a_crashing_reply_decoder_fails_over_within_connect_timeout(
    fake_swarm, connect, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Any exception while reading a hop's stream ends that hop at once (not after forward_timeout)."""
    swarm = fake_swarm(TWO_PER_SPAN)
    connection = connect(swarm, forward_timeout=60.0)
    crashes = [False]
    decode = client.streams.from_message

    def crashing(*args: Any, **kwargs: Any) -> torch.Tensor:
        if crashes[0]:
            crashes[0] = False
            raise RuntimeError("decoder crashed")
        return decode(*args, **kwargs)

    monkeypatch.setattr(client.streams, "from_message", crashing)
    result = run(connection, {3: lambda session: crashes.__setitem__(0, True)})
    assert_exact(result.outputs, reference(swarm))
    (banned,) = connection.bans.banned()  # whichever hop's reply came in first
    assert banned not in [peer_id for peer_id, _, _ in result.route]
    assert result.seconds[3] < connection.config.connect_timeout + 1.0


def _opens(peer: FakePeer) -> list[peer_pb2.OpenSession]:
    return [request.open for request in peer.faults.received if request.WhichOneof("kind") == "open"]


def _reroutes(peer: FakePeer) -> list[peer_pb2.Reroute]:
    return [request.reroute for request in peer.faults.received if request.WhichOneof("kind") == "reroute"]


def _check_chain(swarm: FakeSwarm, route: list[tuple[str, int, int]]) -> list[peer_pb2.OpenSession]:
    """Each hop's latest OpenSession: random 128-bit ids, a token for every hop but the first, and each
    hop's next_hops naming the following hops' own ids and tokens."""
    opens = [_opens(swarm[peer_id])[-1] for peer_id, _, _ in route]
    assert opens[0].push_token == b""
    assert all(len(o.push_token) == 16 for o in opens[1:])
    assert all(len(o.session_id) == 32 and int(o.session_id, 16) >= 0 for o in opens)
    assert len({o.session_id for o in opens}) == len(opens)
    assert len({o.push_token for o in opens}) == len(opens)
    for index, opened in enumerate(opens[:-1]):
        following = [(o.session_id, o.push_token) for o in opens[index + 1 :]]
        named = [(h.session_id, h.push_token) for h in opened.next_hops]
        reroutes = _reroutes(swarm[route[index][0]])
        if reroutes:  # the hop's successors were replaced since it opened
            named = [(h.session_id, h.push_token) for h in reroutes[-1].next_hops]
        assert named == following
    return opens


def test_every_hop_gets_its_own_session_id_and_push_token(fake_swarm, connect) -> None:
    swarm = fake_swarm(TWO_PER_SPAN)
    connection = connect(swarm)
    killed: list[FakePeer] = []

    def kill(session: InferenceSession) -> None:
        killed.append(hop(swarm, session, 1))
        _check_chain(swarm, [(h.peer_id, h.start, h.end) for h in session.route])
        killed[0].kill()

    result = run(connection, {4: kill})
    assert_exact(result.outputs, reference(swarm))
    opens = _check_chain(swarm, result.route)
    # the replacement's id and token are fresh, not derived from the killed hop's
    (old,) = _opens(killed[0])
    assert opens[1].session_id != old.session_id and opens[1].push_token != old.push_token
    assert not any(o.session_id.startswith(old.session_id[:8]) for o in opens)
    assert len(_reroutes(swarm[result.route[0][0]])) == 1


def test_a_new_first_hop_takes_no_pushes(fake_swarm, connect) -> None:
    swarm = fake_swarm(TWO_PER_SPAN)
    connection = connect(swarm)
    result = run(connection, {2: lambda session: hop(swarm, session, 0).kill()})
    assert_exact(result.outputs, reference(swarm))
    _check_chain(swarm, result.route)


def test_served_steps_shorten_an_old_peer_ban(fake_swarm, connect) -> None:
    """A peer banned long ago that now serves steps correctly gets its next ban back to the first length."""
    swarm = fake_swarm(ONE_PER_SPAN)
    connection = connect(swarm, ban_timeout=0.01, ban_backoff=2.0, max_ban_timeout=10.0)
    middle = swarm.peers[1]
    for _ in range(4):  # the next ban would last 0.16 s
        connection.bans.ban(middle.peer_id, "test")
    time.sleep(0.1)
    result = run(connection)
    assert_exact(result.outputs, reference(swarm))
    assert connection.bans.ban(middle.peer_id, "test") == 0.01


@pytest.mark.parametrize("mode", ["nan", "shape", "dtype"])
def test_bad_forward_and_backward_replies_are_retried_elsewhere(fake_swarm, connect, mode: str) -> None:
    """Fine-tuning: the peers that ran the forward garble their backward replies; each hop's backward is
    retried on the other peer of its span, and the gradients equal a clean run's."""
    clean_output, clean_grad = _forward_backward(connect(fake_swarm(TWO_PER_SPAN)))
    swarm = fake_swarm(TWO_PER_SPAN)
    connection = connect(swarm)
    failed: list[FakePeer] = []

    def garble_the_forward_peers() -> None:
        failed.extend(peer for peer in swarm.peers if peer.num_computes)
        for peer in failed:
            peer.corrupt_outputs(mode=mode)

    output, grad = _forward_backward(connection, garble_the_forward_peers)
    assert torch.equal(output, clean_output) and torch.equal(grad, clean_grad)
    assert len(failed) == 3 and connection.bans.banned() == {peer.peer_id for peer in failed}
    output, grad = _forward_backward(connection)  # a forward on a garbling peer would have failed over too
    assert torch.equal(output, clean_output) and torch.equal(grad, clean_grad)


def test_a_hop_dropping_carried_outputs_switches_the_session_to_reports(fake_swarm, connect) -> None:
    """The middle hop drops the outputs a step carries: the last hop's result comes back short, which any hop
    of the chain may have caused, so nobody is banned; the step is resent with each hop reporting its own
    output (what the client keeps doing for the session), and the outputs stay exact."""
    swarm = fake_swarm(ONE_PER_SPAN)
    connection = connect(swarm)
    middle = swarm.peers[1].service
    honest = middle._push

    def dropping(session, runtime, pushed: peer_pb2.Step, next_hop) -> None:
        del pushed.carried[:]
        del pushed.carried_seconds[:]
        honest(session, runtime, pushed, next_hop)

    streams: list[list[Any]] = []
    result = run(
        connection,
        {
            3: lambda session: setattr(middle, "_push", dropping),
            5: lambda session: streams.append([s.num_results for s in session.streams]),
        },
    )
    assert_exact(result.outputs, reference(swarm))
    assert result.num_failovers == 0 and connection.bans.banned() == set()
    # steps 0-2 carried (the last hop's results only), step 3's short result, then step 3 resent and step 4
    # reported by every hop
    assert streams == [[2, 2, 3 + 1 + 2]]
