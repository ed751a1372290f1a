"""Spot checks (`verify_every`) against in-process peers (tests/fakes.py): a hop whose outputs are plausible
but wrong (off by 0.01) is caught by another peer's recomputation before its step is returned, banned, and
the generation equals the local one; without the checks the same hop goes unnoticed. Honest swarms ban
nobody, through rollbacks and beam reorders too, and a check that cannot be done is skipped, never failed."""

from __future__ import annotations

import logging
import random

import pytest
import torch
from fakes import FakePeer, FakeSwarm, hidden_states
from test_inprocess import ONE_PER_SPAN, STEP_LIMIT, TWO_PER_SPAN, assert_exact, hop, reference, run
from test_inprocess_model import _model, _prompt

from client.checks import spot_check_agrees
from client.session import InferenceSession
from client.verify import SpotCheckStats

SPANS = [(0, 1), (1, 3), (3, 4)]


@pytest.fixture(autouse=True)
def _no_diverging_replay(caplog: pytest.LogCaptureFixture):
    """A replay that recomputes a different cache is a bug even when the final output looks right."""
    with caplog.at_level(logging.WARNING, logger="client.session"):
        yield
    assert "replay differs" not in caplog.text


def _with_liar(fake_swarm, index: int, *, honest: int = 1) -> tuple[FakeSwarm, FakePeer]:
    """One peer per span of SPANS, except span `index`: a perturbing peer the route prefers (announced
    faster) and `honest` slower honest ones."""
    swarm = fake_swarm([])
    liar = None
    for number, (start, end) in enumerate(SPANS):
        if number == index:
            liar = swarm.add(start, end, throughput=100.0)
            for _ in range(honest):
                swarm.add(start, end, throughput=1.0)
        else:
            swarm.add(start, end, throughput=100.0)
    assert liar is not None
    liar.corrupt_outputs(mode="perturb")
    return swarm, liar


def _generate(model, prompt: torch.Tensor, new_tokens: int, **options) -> torch.Tensor:
    return model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        **options,
    )


@pytest.mark.parametrize(("index", "honest"), [(0, 1), (1, 1), (2, 1), (1, 2)])
def test_perturbing_hop_is_banned_and_the_generation_equals_transformers(
    fake_swarm, connect, local, index: int, honest: int
) -> None:
    """The liar is on the route from the first step, which is checked: it is banned before any token is
    out, the route from its hop on is replaced, and every token equals local transformers'. With a third
    peer for the blocks, it settles the disagreement the same way."""
    swarm, liar = _with_liar(fake_swarm, index, honest=honest)
    connection = connect(swarm, verify_every=1)
    model = _model(swarm, connection)
    prompt = _prompt(seed=index)
    with model.inference_session(max_length=prompt.shape[1] + 12) as session:
        out = _generate(model, prompt, 12)
        assert session.route[index].peer_id != liar.peer_id
    assert torch.equal(out, _generate(local, prompt, 12))
    assert connection.bans.banned() == {liar.peer_id}
    assert session.num_failovers == 1 and session.failovers[0].peer_id == liar.peer_id
    assert session.spot_checks.stats.mismatches == 1


@pytest.mark.parametrize("verify_every", [0, 1])
def test_spot_checks_are_what_catches_a_perturbing_last_hop(fake_swarm, connect, verify_every: int) -> None:
    swarm, liar = _with_liar(fake_swarm, 2)
    connection = connect(swarm, verify_every=verify_every)
    result = run(connection)
    expected = reference(swarm)
    if verify_every:
        assert_exact(result.outputs, expected)
        assert connection.bans.banned() == {liar.peer_id}
    else:  # wrong by 0.01 at every step, and nobody noticed
        assert all(not torch.equal(out, want) for out, want in zip(result.outputs, expected, strict=True))
        assert (result.outputs[-1] - expected[-1]).abs().max() == pytest.approx(0.01, rel=1e-3)
        assert connection.bans.banned() == set() and result.num_failovers == 0


def test_a_later_check_forgets_what_the_liar_reported_since_the_last_one(fake_swarm, connect) -> None:
    """verify_every=3: the middle hop starts lying at step 1 and is caught at step 3. What it reported at
    steps 1 and 2 is forgotten, so its replacement's replay is not held against those values (an honest
    replacement would be banned for a "replay differs") and the hops after it are rebuilt from the replay."""
    swarm, liar = _with_liar(fake_swarm, 1)
    liar.corrupt_outputs(False)
    connection = connect(swarm, verify_every=3)
    session: list[InferenceSession] = []

    def lie(current: InferenceSession) -> None:
        session.append(current)
        assert hop(swarm, current, 1) is liar
        liar.corrupt_outputs(mode="perturb")

    result = run(connection, {1: lie})
    assert_exact(result.outputs, reference(swarm))  # the liar's pushes were intact: only its reports lied
    assert connection.bans.banned() == {liar.peer_id} and result.num_failovers == 1
    (failover,) = session[0].failovers
    assert failover.replacement[-1].start == 3  # replaced to the end of the route
    assert session[0].spot_checks.stats.mismatches == 1


@pytest.mark.parametrize("verify_every", [1, 3])
def test_honest_swarm_bans_nobody_over_20_tokens(fake_swarm, connect, local, verify_every: int) -> None:
    swarm = fake_swarm(TWO_PER_SPAN)
    connection = connect(swarm, verify_every=verify_every)
    model = _model(swarm, connection)
    prompt = _prompt(seed=7)
    with model.inference_session(max_length=prompt.shape[1] + 20) as session:
        out = _generate(model, prompt, 20)
        num_steps = len(session.history)
    assert torch.equal(out, _generate(local, prompt, 20))
    assert connection.bans.banned() == set() and session.num_failovers == 0
    num_checked = -(-num_steps // verify_every)  # steps 0, N, 2N, ...
    assert session.spot_checks.stats == SpotCheckStats(checked=3 * num_checked, skipped=0, mismatches=0)


def test_no_other_peer_for_the_blocks_skips_the_checks(fake_swarm, connect) -> None:
    swarm = fake_swarm(ONE_PER_SPAN)
    connection = connect(swarm, verify_every=1)
    session: list[InferenceSession] = []
    result = run(connection, {0: session.append})
    assert_exact(result.outputs, reference(swarm))
    assert result.num_failovers == 0 and connection.bans.banned() == set()
    assert session[0].spot_checks.stats == SpotCheckStats(checked=0, skipped=3 * len(result.outputs))


@pytest.mark.parametrize("fault", ["kill", "freeze"])
def test_a_verifier_that_is_down_never_fails_the_step(fake_swarm, connect, fault: str) -> None:
    """After the first (checked) step every peer off the route dies or freezes: the checks are skipped (a
    frozen verifier after `verify_timeout`), the steps go on, and nobody is banned."""
    swarm = fake_swarm(TWO_PER_SPAN)
    connection = connect(swarm, verify_every=1, verify_timeout=0.3)
    session: list[InferenceSession] = []
    off_route: list[FakePeer] = []

    def fail_verifiers(current: InferenceSession) -> None:
        session.append(current)
        on_route = {h.peer_id for h in current.route}
        off_route.extend(peer for peer in swarm.peers if peer.peer_id not in on_route)
        for peer in off_route:
            peer.kill() if fault == "kill" else peer.freeze()

    result = run(connection, {1: fail_verifiers})
    assert_exact(result.outputs, reference(swarm))
    assert result.num_failovers == 0 and connection.bans.banned() == set()
    stats = session[0].spot_checks.stats
    assert stats.checked == 3 and stats.skipped == 3 * (len(result.outputs) - 1) and stats.mismatches == 0
    assert max(result.seconds[1:]) < STEP_LIMIT / 3


def test_a_lying_verifier_is_outvoted_by_a_third_peer(fake_swarm, connect) -> None:
    """The middle hop is honest; of the two peers that may verify it one perturbs its Forward replies. When
    it is drawn, the third peer sides with the hop: the liar is banned and the route stays as it was."""
    swarm = fake_swarm([])
    swarm.add(0, 1)
    checked = swarm.add(1, 3, throughput=100.0)
    liar = swarm.add(1, 3, throughput=1.0)
    swarm.add(1, 3, throughput=1.0)
    swarm.add(3, 4)
    liar.corrupt_outputs(mode="perturb")
    connection = connect(swarm, verify_every=1)
    session: list[InferenceSession] = []

    def seed(current: InferenceSession) -> None:
        session.append(current)
        current.spot_checks.rng = random.Random(0)  # draws the liar at one of the first steps

    result = run(connection, {0: seed})
    assert_exact(result.outputs, reference(swarm))
    assert connection.bans.banned() == {liar.peer_id}
    assert result.num_failovers == 0 and result.route[1][0] == checked.peer_id
    assert session[0].spot_checks.stats.mismatches == 1


# (positions, rollback_to, beam_indices) of each step of a batch of 2: a beam reorder, a speculative
# rollback of one position, both at once
EDITS: list[tuple[int, int | None, list[int] | None]] = [
    (7, None, None),
    (1, None, None),
    (1, None, [1, 0]),
    (2, 8, None),
    (1, None, [1, 1]),
    (1, 9, [0, 0]),
    (1, None, None),
]


def _edited_reference(swarm: FakeSwarm) -> list[torch.Tensor]:
    """The steps of EDITS through the same blocks locally, with the cache edited as the peers edit it."""
    span = swarm.local_span()
    cache = span.new_cache()
    outputs, position = [], 0
    for index, (seq, rollback_to, beam) in enumerate(EDITS):
        base = position if rollback_to is None else rollback_to
        if base != position:
            cache.crop(base - position)
        if beam is not None:
            cache.reorder_cache(torch.tensor(beam))
        positions = torch.arange(base, base + seq).expand(2, -1)
        outputs.append(span.forward(hidden_states(2, seq, seed=index), cache, positions))
        position = base + seq
    return outputs


@pytest.mark.parametrize("lie_at", [None, 5])
def test_checks_follow_rollbacks_and_beam_reorders(fake_swarm, connect, lie_at: int | None) -> None:
    """The verifier's sequence is the hop's cache as edited by rollbacks and reorders: honest hops agree at
    every step; a hop that starts lying after both edits is caught, and its replacement replays them."""
    swarm = fake_swarm(TWO_PER_SPAN)
    connection = connect(swarm, verify_every=1)
    session = connection.new_session(max_length=64)
    outputs, position, liar = [], 0, None
    try:
        for index, (seq, rollback_to, beam) in enumerate(EDITS):
            if index == lie_at:
                liar = hop(swarm, session, 1)
                liar.corrupt_outputs(mode="perturb")
            base = position if rollback_to is None else rollback_to
            step = session.astep(
                hidden_states(2, seq, seed=index),
                torch.arange(base, base + seq).expand(2, -1),
                rollback_to=rollback_to,
                beam_indices=None if beam is None else torch.tensor(beam),
            )
            outputs.append(connection.runtime.run(step, timeout=STEP_LIMIT))
            position = base + seq
        route = [h.peer_id for h in session.route]
    finally:
        connection.runtime.run(session.aclose(), timeout=STEP_LIMIT)
    assert_exact(outputs, _edited_reference(swarm))
    stats = session.spot_checks.stats
    if liar is None:
        assert connection.bans.banned() == set() and session.num_failovers == 0
        assert stats == SpotCheckStats(checked=3 * len(EDITS), skipped=0, mismatches=0)
    else:
        assert connection.bans.banned() == {liar.peer_id} and session.num_failovers == 1
        assert route[1] != liar.peer_id
        # the next hop disagreed too: it ran on the liar's push (intact), its verifier on the liar's report
        assert stats.mismatches == 2


@pytest.mark.parametrize(
    ("dtypes", "relative", "agrees"),
    [
        ([torch.float32], 5e-4, True),
        ([torch.float32], 2e-3, False),
        ([torch.float32, torch.bfloat16, torch.float32], 5e-2, True),  # a peer computing in bfloat16
        ([torch.float32, torch.float16], 5e-2, False),
        ([torch.bfloat16], 0.2, False),
    ],
)
def test_spot_check_tolerance_is_relative_per_position_and_the_loosest_dtypes(
    dtypes: list[torch.dtype], relative: float, agrees: bool
) -> None:
    held = hidden_states(2, 3, seed=0)
    held[0, 0] *= 1000.0  # one position's scale does not excuse another's difference
    computed = held.clone()
    computed[1, 2] *= 1.0 + relative
    assert spot_check_agrees(computed, held, dtypes=dtypes) is agrees
    assert not spot_check_agrees(computed[:, :2], held, dtypes=dtypes)
