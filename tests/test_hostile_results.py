"""A lying peer process (tests/hostile_peer.py) in a real swarm, preferred by the route over the honest peer
for the same blocks: its NaNs or wrong shapes, or (spot checks) its plausible but perturbed values, get it
banned, and the greedy generation equals local transformers' token for token. With the default spot-check
settings, a liar on a span no other peer serves is caught by a chain of verifiers within 50 steps."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import torch
from families import VOCAB, without_eos
from hostile_peer import start_peers
from swarm import LocalSwarm, running, stop_all

from client.model import AutoDistributedModelForCausalLM

pytestmark = pytest.mark.swarm  # real DHT and peer processes

NEW_TOKENS = 12
FAST, SLOW = ("--throughput", "100"), ("--throughput", "10")  # the route takes the fast peer of a span
PEER_OPTIONS = ("--announce-period", "2", "--step-timeout", "2")
CLIENT_OPTIONS = dict(connect_timeout=2.0, max_retries=6, refresh_period=1.0)

# mode -> (the hostile peer's blocks, honest fast spans, the honest slow peer's blocks, verify_every).
# NaNs and wrong shapes come from the last hop (a garbled push would make the next hop fail on its own);
# the perturbing peer is a middle hop that pushes its perturbed outputs on: the hop after it is replaced too
CASES = {
    "nan": ("2:4", ["0:2"], "2:4", 0),
    "shape": ("2:4", ["0:2"], "2:4", 0),
    "perturb": ("1:3", ["0:1", "3:4"], "1:3", 1),
}


@pytest.fixture(scope="module")
def dht(checkpoint, tmp_path_factory) -> Iterator[LocalSwarm]:
    """One DHT for the module (no peers): each test starts its own peers under its own model id."""
    with running(tmp_path_factory.mktemp("hostile-results"), checkpoint("llama"), []) as swarm:
        yield swarm


def _prompt(length: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


def _generate(model, prompt: torch.Tensor, new_tokens: int = NEW_TOKENS) -> torch.Tensor:
    return model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
    )


@pytest.mark.parametrize("mode", list(CASES))
def test_hostile_peer_is_banned_and_the_generation_equals_transformers(dht, local, tmp_path, mode) -> None:
    started_at = time.monotonic()
    hostile_blocks, fast_spans, slow_blocks, verify_every = CASES[mode]
    model_id = f"hostile-results-{mode}"
    options = ("--model-id", model_id, *PEER_OPTIONS)
    peers = [(hostile_blocks, mode, (*options, *FAST)), (slow_blocks, None, (*options, *SLOW))]
    peers += [(blocks, None, (*options, *FAST)) for blocks in fast_spans]
    processes = start_peers(tmp_path, dht.model, dht.initial_peers, peers, env=dht.env)
    hostile = processes[0]
    try:
        model = without_eos(
            AutoDistributedModelForCausalLM.from_pretrained(
                dht.model,
                initial_peers=dht.initial_peers,
                model_id=model_id,
                verify_every=verify_every,
                **CLIENT_OPTIONS,
            )
        )
        try:
            prompt = _prompt(seed=len(mode))
            with model.inference_session(max_length=prompt.shape[1] + NEW_TOKENS) as session:
                out = _generate(model, prompt)
                route = [hop.peer_id for hop in session.route]
            assert model.swarm.bans.banned() == {hostile.peer_id}
        finally:
            model.shutdown()
        assert torch.equal(out, _generate(local, prompt))
        assert hostile.peer_id not in route
        assert [failover.peer_id for failover in session.failovers] == [hostile.peer_id]
        if verify_every:
            assert session.spot_checks.stats.mismatches >= 1
    finally:
        stop_all(processes)
    assert time.monotonic() - started_at < 60


CHAIN_NEW_TOKENS = 50  # a prefill and 49 decode steps
CHAIN_PROMPT_SEED = 5  # a prompt whose greedy tokens this tiny model keeps with outputs of [1, 3) off by 0.01


def test_default_spot_checks_catch_a_liar_whose_span_nobody_else_serves(dht, local, tmp_path) -> None:
    """The perturbing peer serves [1, 3) (announced fast, so routes take it); no other peer serves those
    blocks exactly or within a span: [0, 2) and [2, 4) can recompute them only together, as a chain. With the
    client's default spot-check settings (no verify option given) it is caught, banned and replaced within
    the 50 steps of the generation, which equals local transformers' token for token. Before, the checks
    were off by default, and a hop was checked only by a peer whose span held it whole."""
    started_at = time.monotonic()
    model_id = "hostile-results-chain"
    options = ("--model-id", model_id, *PEER_OPTIONS)
    peers = [("1:3", "perturb", (*options, *FAST))]
    peers += [(blocks, None, (*options, *FAST)) for blocks in ("0:1", "3:4")]
    peers += [(blocks, None, (*options, *SLOW)) for blocks in ("0:2", "2:4")]
    processes = start_peers(tmp_path, dht.model, dht.initial_peers, peers, env=dht.env)
    hostile = processes[0]
    prompt = _prompt(seed=CHAIN_PROMPT_SEED)
    try:
        model = without_eos(
            AutoDistributedModelForCausalLM.from_pretrained(
                dht.model, initial_peers=dht.initial_peers, model_id=model_id, **CLIENT_OPTIONS
            )
        )
        try:
            with model.inference_session(max_length=prompt.shape[1] + CHAIN_NEW_TOKENS) as session:
                out = _generate(model, prompt, CHAIN_NEW_TOKENS)
                route = [hop.peer_id for hop in session.route]
            assert model.swarm.bans.banned() == {hostile.peer_id}
        finally:
            model.shutdown()
        assert torch.equal(out, _generate(local, prompt, CHAIN_NEW_TOKENS))
        assert hostile.peer_id not in route
        (failover,) = session.failovers
        assert failover.peer_id == hostile.peer_id
        assert failover.replay_positions < prompt.shape[1] + CHAIN_NEW_TOKENS  # caught at one of the 50 steps
        assert session.spot_checks.stats.mismatches >= 1
    finally:
        stop_all(processes)
    assert time.monotonic() - started_at < 90
