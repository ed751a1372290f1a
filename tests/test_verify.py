"""Spot checks (`verify_every`) against in-process peers (tests/fakes.py): a hop whose outputs are plausible
but wrong (off by 0.01) is caught by another peer's recomputation before its step is returned, banned, and
the generation equals the local one; without the checks the same hop goes unnoticed. Honest swarms ban
nobody, through rollbacks and beam reorders too, and a check that cannot be done is skipped, never failed."""

from __future__ import annotations

import itertools
import logging
import random
from types import SimpleNamespace

import pytest
import torch
from fakes import FakePeer, FakeSwarm, hidden_states
from records_factory import peer_record
from test_inprocess import ONE_PER_SPAN, STEP_LIMIT, TWO_PER_SPAN, assert_exact, hop, reference, run
from test_inprocess_model import _model, _prompt

from client.checks import spot_check_agrees
from client.config import ClientConfig
from client.discovery import BanList
from client.recompute import can_verify, order_verifiers
from client.session import InferenceSession
from client.verify import SpotChecker, SpotCheckStats

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
    """verify_every=3, at most 2 steps in a row unchecked: the middle hop starts lying at step 1 and is
    caught at a check by step 3. What it reported since is forgotten, so its replacement's replay is not held
    against those values (an honest replacement would be banned for a "replay differs") and the hops after
    it are rebuilt from the replay."""
    swarm, liar = _with_liar(fake_swarm, 1)
    liar.corrupt_outputs(False)
    connection = connect(swarm, verify_every=3, verify_max_gap=2)
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
        session.spot_checks.rng = random.Random(verify_every)
        out = _generate(model, prompt, 20)
        num_steps = len(session.history)
    assert torch.equal(out, _generate(local, prompt, 20))
    assert connection.bans.banned() == set() and session.num_failovers == 0
    schedule = random.Random(verify_every)  # the same draws: which steps were checked
    num_checked = sum(verify_every == 1 or schedule.random() * verify_every < 1 for _ in range(num_steps))
    assert 0 < num_checked < num_steps or verify_every == 1
    assert session.spot_checks.stats == SpotCheckStats(checked=3 * num_checked, skipped=0, mismatches=0)


def test_no_other_peer_for_the_blocks_skips_the_checks(fake_swarm, connect) -> None:
    swarm = fake_swarm(ONE_PER_SPAN)
    connection = connect(swarm, verify_every=1)
    session: list[InferenceSession] = []
    result = run(connection, {0: session.append})
    assert_exact(result.outputs, reference(swarm))
    assert result.num_failovers == 0 and connection.bans.banned() == set()
    assert session[0].spot_checks.stats == SpotCheckStats(checked=0, skipped=3 * len(result.outputs))


def test_an_unverifiable_hop_stays_when_no_other_peer_can_take_the_session(fake_swarm, connect) -> None:
    """The middle blocks' only other peer takes sessions of 16 positions and Forwards of 4 tokens: it can
    neither verify the hop (64 positions) nor replace it, so the hop is no suspect and stays unbanned."""
    swarm = fake_swarm(ONE_PER_SPAN)
    small = swarm.add(1, 3, throughput=1000.0, max_length=16, max_forward_tokens=4)
    connection = connect(swarm, verify_every=1)
    session: list[InferenceSession] = []
    result = run(connection, {0: session.append})
    assert_exact(result.outputs, reference(swarm))
    assert result.num_failovers == 0 and connection.bans.banned() == set()
    assert small.peer_id not in {peer_id for peer_id, *_ in result.route}
    stats = session[0].spot_checks.stats
    assert stats.unchecked == 0 and stats.skipped == 3 * len(result.outputs)


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
        current.spot_checks.recomputer.rng = random.Random(0)  # draws the liar at one of the first steps

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


# ---- checks a liar cannot dodge: chains of sub-spans, random steps, every position, the verifiers' dtype --


def _liar_without_twin(fake_swarm) -> tuple[FakeSwarm, FakePeer]:
    """A perturbing peer on [1, 3) that nobody else serves, or holds within a span: the route takes it
    (announced fast); [0, 2) and [2, 4) (slow) can recompute its blocks only together."""
    swarm = fake_swarm([])
    swarm.add(0, 1, throughput=100.0)
    liar = swarm.add(1, 3, throughput=100.0)
    swarm.add(3, 4, throughput=100.0)
    swarm.add(0, 2, throughput=1.0)
    swarm.add(2, 4, throughput=1.0)
    liar.corrupt_outputs(mode="perturb")
    return swarm, liar


def test_a_liar_on_a_span_nobody_else_serves_is_caught_by_a_chain_of_verifiers(
    fake_swarm, connect, local
) -> None:
    """[0, 2) recomputes block 1 and [2, 4) block 2 from its output: the chain refutes the liar, which is
    banned and replaced; before, its hop was never checked and the honest hop after it took the blame."""
    swarm, liar = _liar_without_twin(fake_swarm)
    connection = connect(swarm, verify_every=1)
    model = _model(swarm, connection)
    prompt = _prompt(seed=3)
    with model.inference_session(max_length=prompt.shape[1] + 12) as session:
        out = _generate(model, prompt, 12)
        route = [h.peer_id for h in session.route]
    assert torch.equal(out, _generate(local, prompt, 12))
    assert connection.bans.banned() == {liar.peer_id} and liar.peer_id not in route
    assert [failover.peer_id for failover in session.failovers] == [liar.peer_id]
    # the hop after it disagreed too: it ran on the liar's push (intact), its verifier on the liar's report
    assert session.spot_checks.stats.mismatches == 2


def test_default_settings_catch_a_liar_within_the_gap(fake_swarm, connect, local) -> None:
    """No spot-check option given: the checks are on, and a liar at every step is caught by a check within
    `verify_max_gap` + 1 steps, whichever steps the OS's random source picked."""
    swarm, liar = _liar_without_twin(fake_swarm)
    connection = connect(swarm)
    config = connection.config
    assert config.verify_every > 0 and config.verify_max_gap < 50
    model = _model(swarm, connection)
    prompt = _prompt(seed=4)
    new_tokens = config.verify_max_gap + 1
    with model.inference_session(max_length=prompt.shape[1] + new_tokens) as session:
        out = _generate(model, prompt, new_tokens)
    assert torch.equal(out, _generate(local, prompt, new_tokens))
    assert connection.bans.banned() == {liar.peer_id}
    (failover,) = session.failovers
    assert failover.peer_id == liar.peer_id
    assert failover.replay_positions < prompt.shape[1] + config.verify_max_gap  # caught at a step <= the gap


def test_a_lie_at_an_unchecked_step_is_caught_at_the_next_check(fake_swarm, connect) -> None:
    """The middle hop lies at step 1 only, a step the schedule leaves unchecked (seeded: steps 0 and 3 are
    checked): the check at step 3 compares all the positions of its cache, finds the lie at step 1's, and
    bans the liar. Before, a check compared only its own step's positions: with checks at 0, 2, 4, ...
    known in advance, this liar was never caught."""
    swarm, liar = _with_liar(fake_swarm, 1)
    liar.corrupt_outputs(False)
    connection = connect(swarm, verify_every=2)
    session: list[InferenceSession] = []

    def seed(current: InferenceSession) -> None:
        session.append(current)
        current.spot_checks.rng = random.Random(1)  # draws: step 0 checked, 1 and 2 not, 3 checked

    def lie(current: InferenceSession) -> None:
        assert hop(swarm, current, 1) is liar
        liar.corrupt_outputs(mode="perturb")

    result = run(connection, {0: seed, 1: lie, 2: lambda _: liar.corrupt_outputs(False)})
    assert_exact(result.outputs, reference(swarm))  # the liar's pushes were intact: only its reports lied
    assert connection.bans.banned() == {liar.peer_id} and result.num_failovers == 1
    assert session[0].failovers[0].replay_positions == 7 + 2  # caught at step 3 (a prefill of 7)
    stats = session[0].spot_checks.stats
    assert stats.mismatches == 1 and stats.checked == 2  # the twin recomputed the liar's blocks twice


def test_a_claimed_coarse_dtype_does_not_widen_the_tolerance(fake_swarm, connect) -> None:
    """The middle hop computes in float32 but announces bfloat16 and perturbs its outputs by ~3%: within
    bfloat16's 10%, far beyond float32's 0.1%. Its float32 twin computes more precisely than the claim, so
    it is no verifier for it (its tolerance would not cover an honest bfloat16 peer) and the checks are
    skipped; at `verify_max_skips` skips in a row the hop is replaced by the twin. Before, the twin checked
    it with the claimed dtype's 10% and let it pass."""
    swarm, liar = _with_liar(fake_swarm, 1)
    liar.announce_as(dtype="bfloat16")
    connection = connect(swarm, verify_every=1)
    session: list[InferenceSession] = []
    result = run(connection, {0: session.append})
    assert_exact(result.outputs, reference(swarm))
    assert connection.bans.banned() == {liar.peer_id} and result.num_failovers == 1
    stats = session[0].spot_checks.stats
    assert stats.unchecked == 1 and stats.mismatches == 0
    assert session[0].failovers[0].replay_positions == 7 + connection.config.verify_max_skips - 2


def test_the_schedule_is_random_with_rate_one_in_n_and_a_bounded_gap() -> None:
    swarm = SimpleNamespace(config=ClientConfig(verify_every=8, verify_max_gap=20), wire_dtype="float32")
    assert isinstance(SpotChecker(swarm).rng, random.SystemRandom)  # type: ignore[arg-type]
    schedules = []
    for seed in range(2):
        checker = SpotChecker(swarm, rng=random.Random(seed))  # type: ignore[arg-type]
        checked = [step for step in range(20_000) if checker.due()]
        gaps = [b - a - 1 for a, b in itertools.pairwise([-1, *checked])]
        assert max(gaps) == 20 and 0.9 / 8 < len(checked) / 20_000 < 1.1 / 8
        assert any(step % 8 for step in checked[:10])  # not 0, N, 2N, ...
        schedules.append(checked[:20])
    assert schedules[0] != schedules[1]
    off = SimpleNamespace(config=ClientConfig(verify_every=0), wire_dtype="float32")
    assert not any(SpotChecker(off).due() for _ in range(100))  # type: ignore[arg-type]


VERIFIER_CASES = [
    # (verifier dtype, quantization), (checked dtype, quantization), may verify
    (("float32", "none"), ("float32", "none"), True),
    (("bfloat16", "none"), ("float32", "none"), True),  # coarser: its own 10% covers the hop's noise
    (("float32", "none"), ("bfloat16", "none"), False),  # 0.1% would fail an honest bfloat16 peer
    (("bfloat16", "none"), ("bfloat16", "none"), True),
    (("float16", "none"), ("bfloat16", "none"), False),
    (("float32", "int8"), ("float32", "int8"), True),
    (("float32", "none"), ("float32", "int8"), False),  # other weights
    (("float32", "int8"), ("float32", "none"), False),
]


@pytest.mark.parametrize(("verifier", "checked", "may"), VERIFIER_CASES)
def test_verifiers_compute_at_most_as_precisely_as_the_hop_claims(verifier, checked, may: bool) -> None:
    records = [
        peer_record(0, 4, dtype=dtype, quantization=quantization)
        for dtype, quantization in (verifier, checked)
    ]
    assert can_verify(*records) is may


def test_verifiers_of_the_checked_peers_prefix_come_last() -> None:
    checked = peer_record(0, 4, address="203.0.113.5:1")
    serving = [(f"same{i}", peer_record(0, 4, address=f"203.0.113.{10 + i}:1")) for i in range(3)]
    serving += [(f"other{i}", peer_record(0, 4, address=f"198.51.{i}.1:1")) for i in range(3)]
    orders = set()
    for seed in range(20):
        ordered = [peer_id for peer_id, _ in order_verifiers(serving, checked, random.Random(seed))]
        assert {p[:5] for p in ordered[:3]} == {"other"}
        orders.add(tuple(ordered))
    assert len(orders) > 5  # random within each group
    on_loopback = [(f"p{i}", peer_record(0, 4, port=7000 + i)) for i in range(6)]
    loopback_orders = {
        tuple(p for p, _ in order_verifiers(on_loopback, peer_record(0, 4), random.Random(seed)))
        for seed in range(20)
    }
    assert len(loopback_orders) > 5


def test_unverified_checks_count_per_peer_across_sessions_until_one_agrees() -> None:
    bans = BanList(1.0, 2.0, 10.0)
    assert [bans.unverified("a") for _ in range(3)] == [1, 2, 3]
    assert bans.unverified("b") == 1
    bans.verified("a")
    assert bans.unverified("a") == 1 and bans.banned() == set()
