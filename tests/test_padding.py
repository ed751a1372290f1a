"""Padded batches through the swarm (in-process peers of tiny models of several families): the attention mask
reaches the peers, whose family code applies it, so logits of left- and right-padded batches, batched greedy
and seeded-sampling `generate()` on prompts of different lengths, gradients, and a failover in the middle of a
padded generation all equal transformers' own model on the same batch; bad masks get INVALID_ARGUMENT."""

from __future__ import annotations

import grpc
import pytest
import torch
from conftest import FAST_CLIENT
from fakes import FakePeer, FakeSwarm
from families import VOCAB, without_eos
from test_inprocess_model import _Actions
from transformers import AutoModelForCausalLM

from client.config import ClientConfig
from client.model import AutoDistributedModelForCausalLM
from client.session import InferenceSession
from client.swarm import SwarmConnection
from peer.requests import attention_mask, session_mask
from protos import peer_pb2, peer_pb2_grpc
from protos.errors import InvalidInputError
from protos.tensors import to_message

# sliding windows (mistral, gemma2/3: layer types), ALiBi (bloom, falcon_alibi), learned positions (gpt2)
FAMILIES = ["llama", "mistral", "gemma3", "gpt2", "bloom", "falcon_alibi", "qwen3"]
SPANS = [(0, 1), (1, 3), (3, 4)]
LENGTHS = [9, 4, 12, 6]  # rows of different lengths: most are padded
NEW_TOKENS = 10


def _batch(side: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ids and mask [4, 12] padded on `side` with pad id 0 (as a tokenizer with padding=True)."""
    generator = torch.Generator().manual_seed(seed)
    width = max(LENGTHS)
    ids = torch.zeros(len(LENGTHS), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(LENGTHS):
        real = slice(width - length, width) if side == "left" else slice(0, length)
        ids[row, real] = torch.randint(3, VOCAB, (length,), generator=generator)
        mask[row, real] = 1
    return ids, mask


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, checkpoint):
    """(distributed model over in-process peers of one family, the local transformers model)."""
    folder = checkpoint(request.param)
    swarm = FakeSwarm(folder)
    swarm.add_many(SPANS + SPANS)  # two peers per span: room for a failover
    connection = SwarmConnection.from_discovery(swarm.discovery, ClientConfig(**FAST_CLIENT))
    model = without_eos(AutoDistributedModelForCausalLM.from_pretrained(folder, swarm=connection))
    local = without_eos(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval())
    yield model, local, swarm
    connection.close()
    swarm.close()


@pytest.mark.parametrize("side", ["left", "right"])
def test_logits_of_a_padded_batch_equal_transformers_at_the_real_positions(pair, side) -> None:
    model, local, _ = pair
    ids, mask = _batch(side)
    with torch.no_grad():
        expected = local(ids, attention_mask=mask).logits
        got = model(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("sampling", [False, True], ids=["greedy", "sampling"])
def test_batched_generate_on_prompts_of_different_lengths_equals_transformers(pair, sampling) -> None:
    model, local, _ = pair
    ids, mask = _batch("left", seed=1)
    options = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=sampling)
    if sampling:
        options |= dict(top_k=20, temperature=0.9)
    torch.manual_seed(5)
    expected = local.generate(ids, attention_mask=mask, **options)
    torch.manual_seed(5)
    got = model.generate(ids, attention_mask=mask, **options)
    assert torch.equal(got, expected)


def test_beam_search_on_a_padded_batch_equals_transformers(pair) -> None:
    model, local, _ = pair
    ids, mask = _batch("left", seed=3)
    options = dict(max_new_tokens=8, min_new_tokens=8, num_beams=3, do_sample=False)
    assert torch.equal(
        model.generate(ids, attention_mask=mask, **options),
        local.generate(ids, attention_mask=mask, **options),
    )


def test_assisted_generation_of_a_padded_row_equals_transformers(
    fake_swarm, connect, checkpoint, tmp_path
) -> None:
    """transformers' assisted generation (a local draft model proposes, the swarm verifies and rolls back)
    takes one row; here a row with padding in front."""
    from families import save

    swarm = fake_swarm(SPANS)
    model = without_eos(AutoDistributedModelForCausalLM.from_pretrained(swarm.folder, swarm=connect(swarm)))
    local = without_eos(AutoModelForCausalLM.from_pretrained(swarm.folder, dtype=torch.float32).eval())
    draft = without_eos(
        AutoModelForCausalLM.from_pretrained(save("llama", tmp_path / "draft", seed=1)).eval()
    )
    ids, mask = _batch("left", seed=8)
    row, row_mask = ids[1:2], mask[1:2]  # 8 positions of padding, then 4 real ones
    options = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False)
    expected = local.generate(row, attention_mask=row_mask, **options)
    assert torch.equal(
        model.generate(row, attention_mask=row_mask, assistant_model=draft, **options), expected
    )


def test_gradients_of_a_padded_batch_equal_local_autograd(pair) -> None:
    model, local, _ = pair
    ids, mask = _batch("right", seed=2)
    target = torch.randn(*ids.shape, VOCAB, generator=torch.Generator().manual_seed(3))

    def gradient(which) -> torch.Tensor:
        embeds = which.get_input_embeddings()(ids).detach().requires_grad_(True)
        logits = which(inputs_embeds=embeds, attention_mask=mask).logits
        ((logits - target) ** 2 * mask[..., None]).sum().backward()
        return embeds.grad

    torch.testing.assert_close(gradient(model), gradient(local), atol=1e-5, rtol=0)


def test_a_hop_killed_mid_generation_of_a_padded_batch_gives_the_same_tokens(pair) -> None:
    model, local, swarm = pair
    ids, mask = _batch("left", seed=4)
    options = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    expected = local.generate(ids, attention_mask=mask, **options)
    killed: list[FakePeer] = []

    def kill(session: InferenceSession) -> None:
        killed.append(swarm[session.route[1].peer_id])
        killed[0].kill()

    try:
        with model.inference_session(max_length=ids.shape[1] + NEW_TOKENS) as session:
            got = model.generate(ids, attention_mask=mask, streamer=_Actions(session, {4: kill}), **options)
            assert session.num_failovers == 1
        assert torch.equal(got, expected)
    finally:
        if killed:  # the next test of this family gets a whole swarm again
            swarm.peers.remove(killed[0])
            swarm.add(killed[0].start, killed[0].end)
            swarm.unlist(killed[0])


def test_a_session_continues_a_padded_batch(pair) -> None:
    """`inference_session`: a second generate() continues the padded batch from the peers' caches (and
    their masks), as one longer generate() would."""
    model, local, _ = pair
    ids, mask = _batch("left", seed=6)
    options = dict(do_sample=False)
    whole = local.generate(ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, **options)
    with model.inference_session(max_length=ids.shape[1] + 8) as session:
        first = model.generate(ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, **options)
        longer = torch.cat([mask, torch.ones(mask.shape[0], 4, dtype=mask.dtype)], dim=1)
        second = model.generate(first, attention_mask=longer, max_new_tokens=4, min_new_tokens=4, **options)
        assert session.position == ids.shape[1] + 7
    assert torch.equal(second, whole)


def test_a_classifier_pools_each_rows_last_real_token_as_transformers(
    fake_swarm, connect, checkpoint
) -> None:
    from transformers import AutoModelForSequenceClassification

    from client.model import AutoDistributedModelForSequenceClassification

    swarm = fake_swarm(SPANS)
    model = AutoDistributedModelForSequenceClassification.from_pretrained(
        checkpoint("llama"), swarm=connect(swarm), num_labels=3
    )
    reference = AutoModelForSequenceClassification.from_pretrained(
        checkpoint("llama"), num_labels=3, pad_token_id=0, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        reference.score.weight.copy_(model.score.weight)
    for side in ("right", "left"):
        ids, mask = _batch(side, seed=7)
        labels = torch.tensor([0, 2, 1, 2])
        output = model(input_ids=ids, attention_mask=mask, labels=labels)
        expected = reference(input_ids=ids, attention_mask=mask, labels=labels)
        torch.testing.assert_close(output.logits, expected.logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(output.loss, expected.loss, atol=1e-5, rtol=0)


# ---- the peer's checks ---------------------------------------------------------------------------------


def _mask_message(values) -> peer_pb2.Tensor:
    return to_message(torch.tensor(values, dtype=torch.int64))


@pytest.mark.parametrize(
    ("values", "problem"),
    [
        ([[1, 1, 1]], "must be [2, 3]"),
        ([[1, 1], [1, 1], [1, 1]], "must be [2, 3]"),
        ([[1, 2, 1], [1, 1, 1]], "values other than 0 and 1"),
        ([[1, -1, 1], [1, 1, 1]], "values other than 0 and 1"),
        ([[0, 0, 0], [0, 1, 1]], "rows [0] are all padding"),
    ],
)
def test_a_bad_mask_is_refused(values, problem) -> None:
    with pytest.raises(InvalidInputError, match=problem.replace("[", r"\[").replace("]", r"\]")):
        attention_mask(_mask_message(values), 2, 3, max_bytes=2**20)


def test_a_float_mask_is_refused() -> None:
    with pytest.raises(InvalidInputError, match="not allowed"):
        attention_mask(to_message(torch.ones(2, 3)), 2, 3, max_bytes=2**20)


def test_a_session_mask_follows_rollback_and_beams() -> None:
    held = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    assert session_mask(None, 4, None, None, 1) is None  # nothing padded: nothing kept
    grown = session_mask(held, 3, torch.tensor([1, 0]), None, 2)
    assert grown.tolist() == [[True] * 5, [False, True, True, True, True]]
    with pytest.raises(InvalidInputError, match="all padding"):
        session_mask(None, 0, None, torch.tensor([[False, False], [True, True]]), 2)


def test_a_peer_answers_a_bad_mask_with_invalid_argument_and_serves_on(fake_swarm) -> None:
    swarm = fake_swarm([(0, 4)])
    (peer,) = swarm.peers
    hidden = torch.randn(2, 3, 64)
    with grpc.insecure_channel(peer.address) as channel:
        stub = peer_pb2_grpc.PeerStub(channel)
        for values in ([[0, 0, 0], [1, 1, 1]], [[1, 3, 1], [1, 1, 1]], [[1, 1], [1, 1]]):
            request = peer_pb2.ForwardRequest(
                start=0, end=4, hidden=to_message(hidden), attention_mask=_mask_message(values)
            )
            with pytest.raises(grpc.RpcError) as refused:
                stub.Forward(request, timeout=10)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        good = peer_pb2.ForwardRequest(
            start=0, end=4, hidden=to_message(hidden), attention_mask=_mask_message([[0, 1, 1], [1, 1, 1]])
        )
        assert list(stub.Forward(good, timeout=10).hidden.shape) == [2, 3, 64]
    assert isinstance(peer, FakePeer) and peer.alive
