"""Routing respects what peers announce: a fast peer with small limits (`--max-length 64`,
`--max-forward-tokens 64`) next to a slower one with the defaults; requests that do not fit the first go to
the second, with no error and no failover, and the output equals transformers'."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from families import VOCAB, without_eos
from swarm import Process, running

from client import AutoDistributedModelForCausalLM

pytestmark = pytest.mark.swarm


@pytest.fixture(scope="module")
def peers(checkpoint, tmp_path_factory) -> Iterator[dict[str, Process]]:
    """The DHT ("dht"), a fast "small" peer with small limits and a slower "large" one, both on [0,4)."""
    with running(tmp_path_factory.mktemp("limits-swarm"), checkpoint("llama"), []) as swarm:
        limits = ("--max-length", "64", "--max-forward-tokens", "64")
        [small] = swarm.start_peers(["0:4"], "--model-id", "limits", *limits, "--throughput", "1000")
        [large] = swarm.start_peers(["0:4"], "--model-id", "limits", "--throughput", "10")
        yield {"dht": swarm.dht, "small": small, "large": large}


@pytest.fixture(scope="module")
def remote(checkpoint, peers):
    model = AutoDistributedModelForCausalLM.from_pretrained(
        checkpoint("llama"), initial_peers=peers["dht"].maddrs, model_id="limits"
    )
    yield without_eos(model)
    model.shutdown()


def _generate(model, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    return model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
    )


def _prompt(length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("new_tokens", "chosen"), [(16, "small"), (200, "large")])
def test_sessions_go_to_a_peer_whose_max_length_fits(remote, local, peers, new_tokens, chosen) -> None:
    prompt = _prompt(10)
    with remote.inference_session(max_length=prompt.shape[1] + new_tokens) as session:
        out = _generate(remote, prompt, new_tokens)
        route = [hop.peer_id for hop in session.route]
        assert session.num_failovers == 0
    assert route == [peers[chosen].peer_id]  # the fast peer when it can, never a refusal
    assert torch.equal(out, _generate(local, prompt, new_tokens))
    assert not remote.swarm.bans.banned()


def test_a_generation_without_a_session_plans_its_own_length(remote, local) -> None:
    prompt = _prompt(10, seed=1)
    assert torch.equal(_generate(remote, prompt, 200), _generate(local, prompt, 200))
    assert not remote.swarm.bans.banned()


def test_forwards_larger_than_a_peer_takes_go_elsewhere(remote, local) -> None:
    prompt = torch.randint(3, VOCAB, (3, 40), generator=torch.Generator().manual_seed(2))  # 120 > 64 tokens
    with torch.no_grad():
        torch.testing.assert_close(remote(prompt).logits, local(prompt).logits, atol=1e-5, rtol=0)
    assert not remote.swarm.bans.banned()
