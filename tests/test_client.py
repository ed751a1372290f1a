"""The client library against real peer processes: `generate()` through the swarm equals transformers."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest
import torch
from families import VOCAB, without_eos
from swarm import Process, running, start_peer
from transformers import AutoModelForCausalLM

from client.errors import short_id
from client.model import AutoDistributedModelForCausalLM
from client.route import NoRouteError

SPANS = ["0:1", "1:3", "3:4"]
PEER_OPTIONS = ("--model-id", "llama", "--throughput", "100")  # the name the clients and `health` use

pytestmark = pytest.mark.swarm  # real DHT and peer processes


@pytest.fixture(scope="module")
def swarm(checkpoint, tmp_path_factory) -> Iterator[dict[str, Process]]:
    """The DHT ("dht") and one peer per span of SPANS (keyed by it)."""
    with running(tmp_path_factory.mktemp("client-swarm"), checkpoint("llama"), SPANS, *PEER_OPTIONS) as swarm:
        yield {"dht": swarm.dht, **dict(zip(SPANS, swarm.peers, strict=True))}


@pytest.fixture(scope="module")
def remote(checkpoint, swarm):
    model = AutoDistributedModelForCausalLM.from_pretrained(
        checkpoint("llama"), initial_peers=swarm["dht"].maddrs, model_id="llama"
    )
    yield without_eos(model)
    model.shutdown()


def _prompt(length: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _both(local, remote, prompt: torch.Tensor, seed: int = 0, **options):
    common = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=16, min_new_tokens=16, **options)
    torch.manual_seed(seed)
    expected = local.generate(prompt, **common)
    torch.manual_seed(seed)
    return remote.generate(prompt, **common), expected


@pytest.mark.parametrize(
    "options",
    [
        dict(do_sample=False),
        dict(do_sample=True, temperature=0.9, top_k=20, top_p=0.9),
        dict(do_sample=False, num_beams=2),
        dict(do_sample=False, repetition_penalty=1.3),
    ],
    ids=["greedy", "sampling", "beam2", "repetition-penalty"],
)
def test_generate_matches_local_transformers(local, remote, options) -> None:
    out, expected = _both(local, remote, _prompt(10), seed=7, **options)
    assert torch.equal(out, expected)


def test_batch_of_two(local, remote) -> None:
    out, expected = _both(local, remote, _prompt(10, seed=3, batch=2), do_sample=False)
    assert torch.equal(out, expected)


def test_long_prompt(local, remote) -> None:
    out, expected = _both(local, remote, _prompt(300, seed=1), do_sample=False)
    assert torch.equal(out, expected)


def test_logits_of_a_plain_forward(local, remote) -> None:
    prompt = _prompt(12, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(remote(prompt).logits, local(prompt).logits, atol=1e-5, rtol=0)


def test_assisted_generation_with_a_local_assistant(local, remote, checkpoint) -> None:
    assistant = AutoModelForCausalLM.from_pretrained(checkpoint("llama"), dtype=torch.float32).eval()
    out, expected = _both(local, remote, _prompt(10, seed=5), do_sample=False, assistant_model=assistant)
    assert torch.equal(out, expected)


def test_two_clients_at_once(local, checkpoint, swarm) -> None:
    results: dict[int, bool] = {}

    def run(seed: int) -> None:
        model = AutoDistributedModelForCausalLM.from_pretrained(
            checkpoint("llama"), initial_peers=swarm["dht"].maddrs, model_id="llama"
        )
        without_eos(model)
        try:
            out, expected = _both(local, model, _prompt(10, seed=seed), do_sample=False)
            results[seed] = torch.equal(out, expected)
        finally:
            model.shutdown()

    threads = [threading.Thread(target=run, args=(seed,)) for seed in (11, 12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert results == {11: True, 12: True}


def test_inference_session_keeps_peer_caches(local, remote) -> None:
    prompt = _prompt(8, seed=9)
    with remote.inference_session(max_length=64) as session:
        first = remote.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False
        )
        sent_before = session.position
        follow_up = torch.cat([first, _prompt(3, seed=10)], dim=1)
        second = remote.generate(
            follow_up, attention_mask=torch.ones_like(follow_up), max_new_tokens=6, do_sample=False
        )
        # the second call sent only the positions the peers did not hold yet
        assert (
            session.history[len(session.history) - 6].positions.shape[1] == follow_up.shape[1] - sent_before
        )
    expected = local.generate(
        follow_up, attention_mask=torch.ones_like(follow_up), max_new_tokens=6, do_sample=False
    )
    assert torch.equal(second, expected)


def test_no_route_names_the_missing_blocks(checkpoint, swarm, tmp_path) -> None:
    lonely = start_peer(tmp_path, checkpoint("llama"), "0:2", swarm["dht"].maddrs, "--model-id", "gappy")
    try:
        model = AutoDistributedModelForCausalLM.from_pretrained(
            checkpoint("llama"), initial_peers=swarm["dht"].maddrs, model_id="gappy"
        )
        try:
            with pytest.raises(NoRouteError, match=r"blocks 2\.\.3"):
                model.generate(_prompt(5), max_new_tokens=2)
        finally:
            model.shutdown()
    finally:
        lonely.stop()


def test_health_lists_every_peer(checkpoint, swarm) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "protos.cli", "health", "llama", "--initial-peers", *swarm["dht"].maddrs],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    for blocks in SPANS:
        assert short_id(swarm[blocks].peer_id) in result.stdout
        assert swarm[blocks].address in result.stdout
