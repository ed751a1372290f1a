"""Kept training forwards (`peer.gradients`): a Backward that names the kept graph of its very forward only
backpropagates, and gives bit for bit the gradients a recomputing Backward gives; any other Backward (a
different input, LoRA, prompts or mask, a token spent, dropped, expired or forged) recomputes. The kept
graphs stay within their byte budget and time."""

from __future__ import annotations

import grpc
import pytest
import torch
from fakes import hidden_states

from client.finetune import RemoteSpans
from peer.adapters import Lora, LoraWeights
from peer.gradients import TOKEN_BYTES, KeptGraphs, record
from peer.requests import backward_bytes
from protos import peer_pb2, peer_pb2_grpc
from protos.tensors import from_message, to_message

MODULE = (1, "self_attn.q_proj")


def _lora(seed: int) -> Lora:
    generator = torch.Generator().manual_seed(seed)
    a, b = torch.randn(2, 64, generator=generator), torch.randn(64, 2, generator=generator)
    return Lora({MODULE: LoraWeights(a, b, 0.5)})


def _graph(span, hidden: torch.Tensor, lora: Lora | None = None, *, trainable: bool = True):
    return record(span, hidden, 0, 4, None, None, lora, trainable=trainable and lora is not None)


# ---- the store ----------------------------------------------------------------------------------------


def test_a_token_gives_its_graph_once(fake_swarm) -> None:
    span = fake_swarm([]).local_span()
    kept = KeptGraphs(max_bytes=100, timeout=10.0)
    graph = _graph(span, hidden_states(1, 3, seed=0))
    token = kept.keep(graph, 10, now=0.0)
    assert len(token) == TOKEN_BYTES and kept.nbytes == 10
    assert kept.take(b"\0" * TOKEN_BYTES, now=1.0) is None  # a forged token: nothing
    assert kept.take(token[:8], now=1.0) is None
    assert kept.take(token, now=1.0) is graph
    assert kept.take(token, now=1.0) is None and kept.nbytes == 0  # spent


def test_graphs_stay_within_the_budget_and_their_time(fake_swarm) -> None:
    span = fake_swarm([]).local_span()
    kept = KeptGraphs(max_bytes=100, timeout=10.0)
    graphs = [_graph(span, hidden_states(1, 2, seed=i)) for i in range(4)]
    tokens = [kept.keep(graph, 40, now=float(i)) for i, graph in enumerate(graphs[:3])]
    assert kept.nbytes == 80 and len(kept) == 2 and kept.dropped == 1  # the oldest made room
    assert kept.take(tokens[0], now=3.0) is None
    assert kept.keep(graphs[3], 101, now=3.0) == b"" and kept.nbytes == 80  # alone over the budget
    assert kept.take(tokens[1], now=11.5) is None  # kept at 1.0 for 10 s
    assert kept.take(tokens[2], now=11.5) is graphs[2]
    assert kept.nbytes == 0


# ---- exactness ----------------------------------------------------------------------------------------


def test_a_kept_graph_matches_only_its_own_inputs(fake_swarm) -> None:
    span = fake_swarm([]).local_span()
    hidden, lora = hidden_states(2, 3, seed=0), _lora(0)
    graph = _graph(span, hidden, lora)
    assert graph.matches(0, 4, hidden.clone(), None, None, _lora(0), True)
    assert not graph.matches(0, 4, hidden + 1e-6, None, None, _lora(0), True)
    assert not graph.matches(1, 4, hidden, None, None, _lora(0), True)
    assert not graph.matches(0, 4, hidden, None, None, _lora(1), True)
    assert not graph.matches(0, 4, hidden, None, None, None, False)
    assert not graph.matches(0, 4, hidden, torch.zeros(4, 1, 1, 64), None, _lora(0), True)
    assert not graph.matches(0, 4, hidden, None, torch.ones(2, 3, dtype=torch.int64), _lora(0), True)
    served = Lora(_lora(0).modules, "served")
    frozen = _graph(span, hidden, served, trainable=False)
    assert frozen.matches(0, 4, hidden, None, None, served, False)
    assert not frozen.matches(0, 4, hidden, None, None, Lora(_lora(0).modules, "served"), False)


def test_backprop_of_a_kept_graph_equals_a_recomputed_backward(fake_swarm) -> None:
    span = fake_swarm([]).local_span()
    hidden, grad, lora = hidden_states(2, 3, seed=0), hidden_states(2, 3, seed=1), _lora(0)
    graph = span.record(hidden, lora=lora, trainable=True)
    assert torch.equal(graph.output.detach(), span.forward(hidden, lora=lora))
    kept_input, _, kept_lora = span.backprop(graph, grad)
    again_input, _, again_lora = span.lora_backward(hidden, grad, lora)
    assert torch.equal(kept_input, again_input)
    for kept_grad, again_grad in zip(kept_lora, again_lora, strict=True):
        assert torch.equal(kept_grad, again_grad)


# ---- through a peer -----------------------------------------------------------------------------------


def _stub(peer) -> peer_pb2_grpc.PeerStub:
    return peer_pb2_grpc.PeerStub(grpc.insecure_channel(peer.address))


def _lora_messages(lora: Lora) -> list[peer_pb2.LoraModule]:
    return [
        peer_pb2.LoraModule(
            block=b, module=m, lora_a=to_message(w.a), lora_b=to_message(w.b), scaling=w.scaling
        )
        for (b, m), w in lora.modules.items()
    ]


def _grads(reply: peer_pb2.BackwardReply) -> list[torch.Tensor]:
    grads = [from_message(reply.grad_input, max_bytes=1 << 20)]
    for module in reply.grad_lora:
        grads += [
            from_message(module.lora_a, max_bytes=1 << 20),
            from_message(module.lora_b, max_bytes=1 << 20),
        ]
    return grads


@pytest.mark.parametrize("second", ["same", "other hidden", "forged token", "dropped"])
def test_a_peer_backpropagates_its_kept_forward_or_recomputes(fake_swarm, second: str) -> None:
    swarm = fake_swarm([(0, 4)])
    peer = swarm.peers[0]
    stub = _stub(peer)
    hidden, grad, lora = hidden_states(2, 3, seed=0), hidden_states(2, 3, seed=1), _lora(0)
    messages = _lora_messages(lora)
    forward = peer_pb2.ForwardRequest(start=0, end=4, hidden=to_message(hidden), keep_for_backward=True)
    forward.lora.extend(messages)
    reply = stub.Forward(forward)
    assert len(reply.backward_token) == TOKEN_BYTES and len(peer.service.kept) == 1
    assert torch.equal(
        from_message(reply.hidden, max_bytes=1 << 20), swarm.local_span().forward(hidden, lora=lora)
    )

    sent = hidden_states(2, 3, seed=7) if second == "other hidden" else hidden
    token = bytes(TOKEN_BYTES) if second == "forged token" else reply.backward_token
    if second == "dropped":
        peer.service.kept.clear()
    backward = peer_pb2.BackwardRequest(
        start=0, end=4, hidden=to_message(sent), grad_output=to_message(grad), forward_token=token
    )
    backward.lora.extend(messages)
    computes, backprops = peer.num_computes, []
    original = peer.span.backprop
    peer.span.backprop = lambda *args, **kwargs: backprops.append(1) or original(*args, **kwargs)
    got = _grads(stub.Backward(backward))
    # with its own forward's token the peer only backpropagates; otherwise it recomputes
    assert peer.num_computes == computes + 1 and len(backprops) == (second == "same")
    expected_input, _, expected_lora = swarm.local_span().lora_backward(sent, grad, lora)
    for actual, expected in zip(got, [expected_input, *expected_lora], strict=True):
        assert torch.equal(actual, expected)
    assert len(peer.service.kept) == (1 if second == "forged token" else 0)


def test_a_bad_token_is_invalid_argument(fake_swarm) -> None:
    peer = fake_swarm([(0, 4)]).peers[0]
    hidden = hidden_states(1, 2, seed=0)
    request = peer_pb2.BackwardRequest(
        start=0, end=4, hidden=to_message(hidden), grad_output=to_message(hidden), forward_token=b"short"
    )
    with pytest.raises(grpc.RpcError) as error:
        _stub(peer).Backward(request)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_peer_without_a_budget_keeps_nothing(fake_swarm) -> None:
    peer = fake_swarm([(0, 4)], max_kept_bytes=0).peers[0]
    request = peer_pb2.ForwardRequest(
        start=0, end=4, hidden=to_message(hidden_states(1, 2, seed=0)), keep_for_backward=True
    )
    assert _stub(peer).Forward(request).backward_token == b"" and len(peer.service.kept) == 0


def test_training_passes_keep_their_graphs_and_inference_keeps_none(fake_swarm, connect) -> None:
    swarm = fake_swarm([(0, 2), (2, 4)])
    remote: RemoteSpans = connect(swarm).remote
    with torch.no_grad():
        remote(hidden_states(2, 3, seed=0))
    assert all(len(peer.service.kept) == 0 for peer in swarm.peers)
    hidden = hidden_states(2, 3, seed=0).requires_grad_(True)
    output = remote(hidden)
    assert [len(peer.service.kept) for peer in swarm.peers] == [1, 1]
    output.backward(hidden_states(2, 3, seed=1))
    assert [len(peer.service.kept) for peer in swarm.peers] == [0, 0]  # each Backward took its graph
    expected, _ = swarm.local_span().backward(hidden.detach(), hidden_states(2, 3, seed=1))
    assert torch.equal(hidden.grad, expected)


def test_a_kept_graph_counts_its_copies_of_the_clients_lora(fake_swarm) -> None:
    """A short forward carrying large LoRA weights holds those weights while kept: the budget counts them, so
    a client cannot keep gigabytes of weights under an estimate of a few activations."""
    hidden, lora = hidden_states(2, 3, seed=0), _lora(0)
    activations = backward_bytes(hidden.shape, 4, itemsize=4)
    graph = _graph(fake_swarm([]).local_span(), hidden, lora)
    weights = sum(w.a.nbytes + w.b.nbytes for w in lora.modules.values())
    assert graph.held_bytes() == hidden.nbytes + weights
    # room for the activations but not for the weights and input too: the peer keeps nothing
    peer = fake_swarm([(0, 4)], max_kept_bytes=activations + weights).peers[0]
    forward = peer_pb2.ForwardRequest(start=0, end=4, hidden=to_message(hidden), keep_for_backward=True)
    forward.lora.extend(_lora_messages(lora))
    assert _stub(peer).Forward(forward).backward_token == b"" and len(peer.service.kept) == 0
