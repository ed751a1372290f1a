"""Push first, through real peer processes: a decode step's hop outputs travel with the step and come back
once, in the last hop's result (Step.carried), so the hops before it send the client nothing per token; a
long prefill is reported hop by hop; killing a hop mid-generation still fails over exactly."""

from __future__ import annotations

import pytest
import torch
from test_chaos import NEW_TOKENS, TWO_PER_SPAN, _Actions, _generate, _prompt, _Signal, dht, make_swarm

from client.config import ClientConfig

pytestmark = [pytest.mark.chaos, pytest.mark.swarm]
__all__ = ["dht", "make_swarm"]  # the chaos module's fixtures: one DHT, each test its own peers

THREE_HOPS = ["0:1", "1:3", "3:4"]


def _generate_counting(
    swarm, prompt: torch.Tensor, actions=None
) -> tuple[torch.Tensor, list[int], list[str]]:
    """Greedy tokens through the swarm, the StepResults each hop of the final route sent the client, and
    the peers failed over."""
    model = swarm.client()
    try:
        with model.inference_session(max_length=prompt.shape[1] + NEW_TOKENS) as session:
            tokens = _generate(model, prompt, streamer=_Actions(session, actions or {}))
            results = [stream.num_results for stream in session.streams]
            failed = [failover.peer_id for failover in session.failovers]
    finally:
        model.shutdown()
    return tokens, results, failed


@pytest.mark.parametrize(("length", "reported"), [(10, 0), (80, 1)], ids=["short", "long-prefill"])
def test_hops_send_no_per_token_reports(make_swarm, local, length: int, reported: int) -> None:
    """Every step of a generation (the prefill too when it is short) reaches the client as one message from
    the last hop; a prefill longer than max_carried_tokens is reported by each hop instead."""
    assert (length > ClientConfig().max_carried_tokens) == bool(reported)
    swarm = make_swarm(THREE_HOPS)
    prompt = _prompt(length, seed=20 + length)
    tokens, results, failed = _generate_counting(swarm, prompt)
    assert torch.equal(tokens, _generate(local, prompt))
    # NEW_TOKENS forwards (the prefill and NEW_TOKENS - 1 decode steps), each ending at the last hop
    assert results == [reported, reported, NEW_TOKENS] and failed == []


@pytest.mark.parametrize("index", [1, 2])
def test_killed_hop_fails_over_exactly_with_carried_outputs(make_swarm, local, index: int) -> None:
    """The client holds only the embeddings of the step in flight: it restarts from the first hop, whose
    cache already took the step, cropped back (rollback_to) instead of reopened; nobody but the killed peer
    is failed over, and the hop before it never reports a step, not even around the failover."""
    swarm = make_swarm(TWO_PER_SPAN)
    prompt = _prompt(seed=30 + index)
    kill = _Signal(swarm, index)
    tokens, results, failed = _generate_counting(swarm, prompt, {5: kill})
    assert torch.equal(tokens, _generate(local, prompt))
    assert kill.peer is not None and kill.peer.popen.poll() is not None
    assert failed == [kill.peer.peer_id]
    assert results[0] == 0  # the first hop pushed every step; the replacement's replay is reported
