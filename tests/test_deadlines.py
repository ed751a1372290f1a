"""Hop deadlines with the client's DEFAULT settings, against in-process peers: a frozen hop is found by
its missed ping and replaced (the session's step limit of 30 s is far below the old 30 s step timeout +
ping), while a hop that turns 5x slower but keeps answering pings is waited on, never banned."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import FAST_CLIENT
from test_inprocess import ONE_PER_SPAN, TWO_PER_SPAN, assert_exact, hop, reference, run

from client.config import ClientConfig
from client.deadlines import HopDeadlines, Waiting
from client.route import Hop

DEFAULTS = {name: ClientConfig.model_fields[name].default for name in FAST_CLIENT if name != "insecure"}


def test_defaults_are_what_this_test_relies_on() -> None:
    config = ClientConfig()
    assert (config.min_hop_timeout, config.hop_timeout_factor, config.ping_timeout) == (0.5, 4.0, 1.0)


@pytest.mark.parametrize("index", [1, 2])
def test_frozen_hop_is_replaced_with_default_settings(fake_swarm, connect, index: int) -> None:
    swarm = fake_swarm(TWO_PER_SPAN)
    connection = connect(swarm, **DEFAULTS)
    frozen = []

    def freeze(session) -> None:
        frozen.append(hop(swarm, session, index))
        frozen[0].freeze()

    result = run(connection, {4: freeze})  # each step must end within 30 s
    frozen[0].thaw()
    assert_exact(result.outputs, reference(swarm))
    assert connection.bans.banned() == {frozen[0].peer_id}
    assert result.num_failovers == 1
    assert frozen[0].peer_id not in {peer_id for peer_id, _, _ in result.route}


def test_five_times_slower_hop_is_not_banned_with_default_settings(fake_swarm, connect) -> None:
    swarm = fake_swarm(ONE_PER_SPAN)
    connection = connect(swarm, **DEFAULTS)
    middle = swarm.peers[1]
    middle.slow(1.0, at_least=0.2)  # a peer whose steps take 0.2 s
    slowed = []

    def slow_down(session) -> None:
        # the client expects about 0.2 s of this hop, so its deadline is 4 x that: a 1 s step crosses it
        measured = connection.stats.block_times()[middle.peer_id] * (middle.end - middle.start)
        slowed.append(measured)
        middle.slow(1.0, at_least=1.0)  # 5x slower, alive: it answers pings

    result = run(connection, {5: slow_down})
    assert_exact(result.outputs, reference(swarm))
    assert result.num_failovers == 0 and not connection.bans.banned()
    assert ClientConfig().hop_timeout_factor * slowed[0] < 1.0  # the slow steps did outlast their deadline
    assert min(result.seconds[5:]) >= 1.0


@pytest.mark.parametrize(("carried", "expected"), [(False, 0.5), (True, 0.5 + 1.6 + 4.0)])
def test_a_carried_step_waits_for_the_whole_chain_before_pinging(carried: bool, expected: float) -> None:
    """Hops of a carried step report nothing until the last one returns every output: the client waits for
    the sum of the pending hops' deadlines, not the first one's, before it pings them."""
    config = ClientConfig(min_hop_timeout=0.5, hop_timeout_factor=4.0, max_hop_timeout=30.0)
    deadlines = HopDeadlines(SimpleNamespace(config=config, stats=SimpleNamespace(block_times=dict)))  # type: ignore[arg-type]
    spans = [(0, 1, 0.1), (1, 3, 0.2), (3, 4, 1.0)]  # seconds per block each peer announces
    hops = [Hop(f"p{start}", "127.0.0.1:1", start, end) for start, end, _ in spans]
    deadlines.prior = {hop.peer_id: seconds for hop, (_, _, seconds) in zip(hops, spans, strict=True)}
    streams = [SimpleNamespace(hop=hop) for hop in hops]
    log = SimpleNamespace(positions=torch.zeros(1, 1), inputs={0: torch.zeros(1, 1, 4)})
    waiting = Waiting(log, streams, None, carried=carried)  # type: ignore[arg-type]
    timeout = deadlines.chain_timeout(waiting, waiting.pending(), positions=1)
    assert timeout == pytest.approx(expected)
