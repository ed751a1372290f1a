"""The distributed model and stateless passes against in-process peers (tests/fakes.py): `generate()` equals
transformers token for token across a failover, and Forward/Backward through `RemoteSpans` give the same
outputs and gradients when the peers that served them die or garble their replies."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from fakes import FakePeer, FakeSwarm, hidden_states
from families import VOCAB

from client.model import AutoDistributedModelForCausalLM
from client.session import InferenceSession
from client.swarm import SwarmConnection

TWO_PER_SPAN = [(0, 1), (0, 1), (1, 3), (1, 3), (3, 4), (3, 4)]
NEW_TOKENS = 12


def _prompt(length: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


def _generate(model, prompt: torch.Tensor, *, streamer=None, seed: int = 0, **options) -> torch.Tensor:
    torch.manual_seed(seed)
    return model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        streamer=streamer,
        **(dict(do_sample=False) | options),
    )


class _Actions:
    """A streamer that runs `actions[n](session)` when the n-th new token is out."""

    def __init__(self, session: InferenceSession, actions: dict[int, Callable[[InferenceSession], None]]):
        self.session, self.actions, self.seen = session, actions, -1  # the first put is the prompt

    def put(self, value: torch.Tensor) -> None:
        self.seen += 1
        if self.seen in self.actions:
            self.actions[self.seen](self.session)

    def end(self) -> None:
        pass


def _model(swarm: FakeSwarm, connection: SwarmConnection):
    model = AutoDistributedModelForCausalLM.from_pretrained(swarm.folder, swarm=connection)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


@pytest.mark.parametrize(
    "options", [{}, dict(do_sample=True, top_k=30, temperature=0.8, seed=123)], ids=["greedy", "sampling"]
)
def test_generate_across_a_killed_hop_matches_transformers(fake_swarm, connect, local, options) -> None:
    swarm = fake_swarm(TWO_PER_SPAN)
    connection = connect(swarm)
    model = _model(swarm, connection)
    prompt = _prompt(seed=len(options))
    killed: list[FakePeer] = []

    def kill(session: InferenceSession) -> None:
        killed.append(swarm[session.route[1].peer_id])
        killed[0].kill()

    with model.inference_session(max_length=prompt.shape[1] + NEW_TOKENS) as session:
        out = _generate(model, prompt, streamer=_Actions(session, {5: kill}), **options)
        assert session.num_failovers == 1 and session.route[1].peer_id != killed[0].peer_id
    assert torch.equal(out, _generate(local, prompt, **options))
    assert connection.bans.banned() == {killed[0].peer_id}


def test_plain_forward_is_retried_on_other_peers(fake_swarm, connect, local) -> None:
    swarm = fake_swarm(TWO_PER_SPAN)
    model = _model(swarm, connect(swarm))
    prompt = _prompt(12, seed=9)
    with torch.no_grad():
        expected = local(prompt).logits
        first = model(prompt).logits
        torch.testing.assert_close(first, expected, atol=1e-5, rtol=0)
        served = [peer for peer in swarm.peers if peer.num_computes]
        assert len(served) == 3  # one peer per span
        for peer in served:
            peer.kill()
        assert torch.equal(model(prompt).logits, first)


def _forward_backward(connection: SwarmConnection, between: Callable[[], None] = lambda: None):
    """Output and input gradient of a pass through every block; `between` runs after the forward."""
    hidden = hidden_states(2, 5, seed=1).requires_grad_(True)
    output = connection.remote(hidden)
    between()
    output.backward(hidden_states(2, 5, seed=2))
    return output.detach(), hidden.grad


def test_forward_backward_match_local_autograd(fake_swarm, connect) -> None:
    swarm = fake_swarm(TWO_PER_SPAN)
    output, grad = _forward_backward(connect(swarm))
    span = swarm.local_span()
    hidden = hidden_states(2, 5, seed=1)
    torch.testing.assert_close(output, span.forward(hidden), atol=1e-6, rtol=0)
    expected_grad, _ = span.backward(hidden, hidden_states(2, 5, seed=2))
    torch.testing.assert_close(grad, expected_grad, atol=1e-6, rtol=0)


@pytest.mark.parametrize("fault", ["kill", "corrupt"])
def test_backward_after_the_forward_peers_failed_gives_the_same_gradients(fake_swarm, connect, fault) -> None:
    """Each hop's backward goes first to the peer that ran its forward; here every one of them has died
    (or garbles its replies) in between, so every hop is retried on the other peer of its span."""
    clean_output, clean_grad = _forward_backward(connect(fake_swarm(TWO_PER_SPAN)))
    swarm = fake_swarm(TWO_PER_SPAN)
    connection = connect(swarm)
    failed: list[FakePeer] = []

    def fail_the_forward_peers() -> None:
        failed.extend(peer for peer in swarm.peers if peer.num_computes)
        for peer in failed:
            peer.kill() if fault == "kill" else peer.corrupt_outputs(True)

    output, grad = _forward_backward(connection, fail_the_forward_peers)
    assert torch.equal(output, clean_output) and torch.equal(grad, clean_grad)
    assert len(failed) == 3 and connection.bans.banned() == {peer.peer_id for peer in failed}
    assert all(peer.num_computes for peer in swarm.peers)  # the others ran the backward
    output, grad = _forward_backward(connection)  # later passes avoid the banned peers from the start
    assert torch.equal(output, clean_output) and torch.equal(grad, clean_grad)
