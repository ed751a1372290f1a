"""Fine-tuning through the swarm on a tiny Llama served by real peer processes: gradients of the trainable
client parts equal local autograd on transformers' own model; Backward validates its input; a peer killed in
the middle of a training step changes nothing."""

from __future__ import annotations

import re
import signal
from collections.abc import Iterator

import grpc
import pytest
import torch
from families import HIDDEN, VOCAB, without_eos
from swarm import Process, channel, running, start_peers, stop_all
from transformers import AutoModelForSequenceClassification

from client.model import AutoDistributedModelForCausalLM, AutoDistributedModelForSequenceClassification
from protos import peer_pb2, peer_pb2_grpc
from protos.tensors import from_message, to_message

SPANS = ["0:1", "1:3", "3:4"]
PRE_SEQ_LEN = 3
MAX_MESSAGE = 1 << 20
PEER_OPTIONS = ("--throughput", "100", "--max-message-bytes", str(MAX_MESSAGE), "--announce-period", "2")

pytestmark = pytest.mark.swarm  # real DHT and peer processes


@pytest.fixture(scope="module")
def swarm(checkpoint, tmp_path_factory) -> Iterator[dict[str, Process]]:
    """The DHT ("dht") and one peer per span of SPANS (keyed by it)."""
    logs = tmp_path_factory.mktemp("finetune-swarm")
    with running(logs, checkpoint("llama"), SPANS, "--model-id", "ft", *PEER_OPTIONS) as swarm:
        yield {"dht": swarm.dht, **dict(zip(SPANS, swarm.peers, strict=True))}


def _ids(batch: int, seq: int, seed: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _reference_logits(local, ids: torch.Tensor, prompts: torch.Tensor, deep: torch.Tensor | None):
    """Prompt tuning written directly on transformers' own model: prompts before the input embeddings, deep
    prompts added to the first positions entering each block by forward pre-hooks. Logits of all positions."""
    hooks = []
    if deep is not None:
        for index, layer in enumerate(local.model.layers):

            def add(module, args, kwargs, index=index):
                hidden = args[0] if args else kwargs["hidden_states"]
                hidden = torch.cat([hidden[:, :PRE_SEQ_LEN] + deep[index], hidden[:, PRE_SEQ_LEN:]], dim=1)
                return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})

            hooks.append(layer.register_forward_pre_hook(add, with_kwargs=True))
    try:
        embeds = local.get_input_embeddings()(ids)
        embeds = torch.cat([prompts.expand(ids.shape[0], -1, -1), embeds], dim=1)
        return local(inputs_embeds=embeds).logits
    finally:
        for hook in hooks:
            hook.remove()


def _reference_loss(
    local, ids: torch.Tensor, prompts: torch.Tensor, deep: torch.Tensor | None
) -> torch.Tensor:
    logits = _reference_logits(local, ids, prompts, deep)
    labels = torch.cat([torch.full((ids.shape[0], PRE_SEQ_LEN), -100), ids], dim=1)
    return local.loss_function(logits, labels, vocab_size=VOCAB)


@pytest.mark.parametrize("mode", ["ptune", "deep_ptune"])
def test_prompt_gradients_match_local_autograd(checkpoint, swarm, local, mode) -> None:
    torch.manual_seed(0)
    model = AutoDistributedModelForCausalLM.from_pretrained(
        checkpoint("llama"),
        initial_peers=swarm["dht"].maddrs,
        model_id="ft",
        tuning_mode=mode,
        pre_seq_len=PRE_SEQ_LEN,
    )
    try:
        tuning = model.prompt_tuning
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        expected_names = {"prompt_tuning.input_prompts"} | (
            {"prompt_tuning.deep_prompts"} if mode == "deep_ptune" else set()
        )
        assert trainable == expected_names
        if tuning.deep_prompts is not None:
            with torch.no_grad():  # not zeros, so the forward through the peers depends on them
                tuning.deep_prompts.normal_(generator=torch.Generator().manual_seed(1))
        ids = _ids(2, 9, seed=2)
        output = model(input_ids=ids, labels=ids)
        output.loss.backward()
        assert output.logits.shape == (2, 9, VOCAB)

        prompts = tuning.input_prompts.detach().clone().requires_grad_(True)
        deep = (
            None if tuning.deep_prompts is None else tuning.deep_prompts.detach().clone().requires_grad_(True)
        )
        reference = _reference_loss(local, ids, prompts, deep)
        grads = torch.autograd.grad(reference, [prompts] if deep is None else [prompts, deep])
        torch.testing.assert_close(output.loss, reference, atol=1e-5, rtol=0)
        torch.testing.assert_close(tuning.input_prompts.grad, grads[0], atol=1e-5, rtol=0)
        if deep is not None:
            torch.testing.assert_close(tuning.deep_prompts.grad, grads[1], atol=1e-5, rtol=0)
            assert grads[1].abs().sum() > 0
    finally:
        model.shutdown()


@pytest.mark.parametrize("mode", [None, "deep_ptune"])
def test_classifier_head_gradients_match_local_autograd(checkpoint, swarm, mode) -> None:
    torch.manual_seed(0)
    model = AutoDistributedModelForSequenceClassification.from_pretrained(
        checkpoint("llama"),
        initial_peers=swarm["dht"].maddrs,
        model_id="ft",
        num_labels=3,
        tuning_mode=mode,
        pre_seq_len=PRE_SEQ_LEN if mode else 0,
    )
    try:
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        tuned = {"prompt_tuning.input_prompts", "prompt_tuning.deep_prompts"} if mode else set()
        assert trainable == {"score.weight"} | tuned
        assert model.score.weight.dtype == torch.float32
        reference = AutoModelForSequenceClassification.from_pretrained(
            checkpoint("llama"), num_labels=3, pad_token_id=0, dtype=torch.float32
        ).eval()
        score = reference.score.weight
        with torch.no_grad():
            score.copy_(model.score.weight)
        ids, labels = _ids(4, 7, seed=3), torch.tensor([0, 2, 1, 2])
        output = model(input_ids=ids, labels=labels)
        output.loss.backward()
        if mode is None:
            expected = reference(input_ids=ids).logits
            torch.testing.assert_close(output.logits, expected, atol=1e-5, rtol=0)
            (grad,) = torch.autograd.grad(torch.nn.functional.cross_entropy(expected, labels), [score])
        else:
            tuning = model.prompt_tuning
            with torch.no_grad():
                tuning.deep_prompts.normal_(generator=torch.Generator().manual_seed(1))
            model.zero_grad()
            output = model(input_ids=ids, labels=labels)
            output.loss.backward()
            prompts = tuning.input_prompts.detach().clone().requires_grad_(True)
            deep = tuning.deep_prompts.detach().clone().requires_grad_(True)
            expected = _reference_logits(reference, ids, prompts, deep)
            torch.testing.assert_close(output.logits, expected, atol=1e-5, rtol=0)
            loss = torch.nn.functional.cross_entropy(expected, labels)
            grad, grad_prompts, grad_deep = torch.autograd.grad(loss, [score, prompts, deep])
            torch.testing.assert_close(tuning.input_prompts.grad, grad_prompts, atol=1e-5, rtol=0)
            torch.testing.assert_close(tuning.deep_prompts.grad, grad_deep, atol=1e-5, rtol=0)
        torch.testing.assert_close(model.score.weight.grad, grad, atol=1e-5, rtol=0)
    finally:
        model.shutdown()


def _greedy_locally(local, ids, prompts, deep, new_tokens: int) -> torch.Tensor:
    """Greedy decoding written out on transformers' own model, the whole sequence each token."""
    for _ in range(new_tokens):
        logits = _reference_logits(local, ids, prompts, deep)
        ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
    return ids


@pytest.mark.parametrize("mode", ["ptune", "deep_ptune"])
def test_generate_with_tuned_prompts_saved_and_loaded(checkpoint, swarm, local, mode, tmp_path) -> None:
    def load(seed: int):
        torch.manual_seed(seed)
        model = AutoDistributedModelForCausalLM.from_pretrained(
            checkpoint("llama"),
            initial_peers=swarm["dht"].maddrs,
            model_id="ft",
            tuning_mode=mode,
            pre_seq_len=PRE_SEQ_LEN,
        )
        return without_eos(model)

    trained, fresh = load(seed=5), load(seed=6)
    try:
        if trained.prompt_tuning.deep_prompts is not None:
            with torch.no_grad():
                trained.prompt_tuning.deep_prompts.normal_(generator=torch.Generator().manual_seed(7))
        path = tmp_path / "prompts.pt"
        torch.save({n: p.detach() for n, p in trained.named_parameters() if p.requires_grad}, path)
        result = fresh.load_state_dict(torch.load(path), strict=False)
        assert not result.unexpected_keys
        ids = _ids(1, 6, seed=8)
        with torch.no_grad():
            out = fresh.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
        tuning = trained.prompt_tuning
        deep = None if tuning.deep_prompts is None else tuning.deep_prompts.detach()
        with torch.no_grad():
            expected = _greedy_locally(local, ids, tuning.input_prompts.detach(), deep, 6)
        assert torch.equal(out, expected)
    finally:
        trained.shutdown()
        fresh.shutdown()


def test_bfloat16_client_keeps_float32_trainable_prompts(checkpoint, swarm) -> None:
    torch.manual_seed(0)
    model = AutoDistributedModelForCausalLM.from_pretrained(
        checkpoint("llama"),
        initial_peers=swarm["dht"].maddrs,
        model_id="ft",
        dtype="bfloat16",
        tuning_mode="deep_ptune",
        pre_seq_len=PRE_SEQ_LEN,
    )
    try:
        assert model.get_input_embeddings().weight.dtype == torch.bfloat16
        ids = _ids(2, 5, seed=9)
        model(input_ids=ids, labels=ids).loss.backward()
        for parameter in (model.prompt_tuning.input_prompts, model.prompt_tuning.deep_prompts):
            assert parameter.dtype == torch.float32 and parameter.grad.dtype == torch.float32
            assert torch.isfinite(parameter.grad).all() and parameter.grad.abs().sum() > 0
    finally:
        model.shutdown()


def test_classifier_head_learns_a_synthetic_task(checkpoint, swarm) -> None:
    """Four classes, each writing its sequences with its own 16 tokens; only the head trains."""
    generator = torch.Generator().manual_seed(10)
    pools = (torch.randperm(VOCAB - 3, generator=generator)[:64] + 3).view(4, 16)

    def batch(size: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(0, 4, (size,), generator=generator)
        return pools[labels[:, None], torch.randint(0, 16, (size, 24), generator=generator)], labels

    torch.manual_seed(0)
    model = AutoDistributedModelForSequenceClassification.from_pretrained(
        checkpoint("llama"), initial_peers=swarm["dht"].maddrs, model_id="ft", num_labels=4
    )
    try:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.03)
        for _ in range(40):
            ids, labels = batch(16)
            model(input_ids=ids, labels=labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        correct = 0
        for _ in range(4):
            ids, labels = batch(16)
            with torch.no_grad():
                correct += int((model(input_ids=ids).logits.argmax(-1) == labels).sum())
        accuracy = correct / 64
    finally:
        model.shutdown()
    assert accuracy >= 0.9, accuracy


def _backward(process: Process, **fields) -> peer_pb2.BackwardReply:
    opened = channel(process)
    try:
        return peer_pb2_grpc.PeerStub(opened).Backward(peer_pb2.BackwardRequest(**fields), timeout=30)
    finally:
        opened.close()


def _hidden(batch: int, seq: int, width: int = HIDDEN) -> peer_pb2.Tensor:
    return to_message(torch.randn(batch, seq, width))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            dict(start=0, end=2, hidden=_hidden(1, 4), grad_output=_hidden(1, 4)),
            r"span \[0, 2\) is not served",
        ),
        (
            dict(start=1, end=4, hidden=_hidden(1, 4), grad_output=_hidden(1, 4)),
            r"span \[1, 4\) is not served",
        ),
        (dict(start=1, end=3, hidden=_hidden(1, 4), grad_output=_hidden(1, 5)), "grad_output shape"),
        (dict(start=1, end=3, hidden=_hidden(1, 4), grad_output=_hidden(2, 4)), "grad_output shape"),
        (dict(start=1, end=3, hidden=_hidden(1, 4)), "grad_output"),
        (dict(start=1, end=3, hidden=_hidden(1, 4, 32), grad_output=_hidden(1, 4, 32)), "hidden size 32"),
        (dict(start=1, end=3, hidden=_hidden(64, 4), grad_output=_hidden(64, 4)), "exceed the peer's limits"),
        (
            dict(
                start=1,
                end=3,
                hidden=_hidden(1, 4),
                grad_output=_hidden(1, 4),
                prompts=to_message(torch.zeros(1, 1, 2, HIDDEN)),
            ),
            r"prompts must be \[2, ",
        ),
        (
            dict(
                start=1,
                end=3,
                hidden=_hidden(1, 4),
                grad_output=_hidden(1, 4),
                prompts=to_message(torch.zeros(2, 1, 5, HIDDEN)),
            ),
            r"prompts must be",
        ),
    ],
    ids=[
        "span-before",
        "span-past-end",
        "seq-mismatch",
        "batch-mismatch",
        "no-grad",
        "width",
        "too-big",
        "prompt-blocks",
        "prompt-longer-than-seq",
    ],
)
def test_bad_backward_gets_a_clear_status(swarm, fields, message) -> None:
    with pytest.raises(grpc.RpcError) as error:
        _backward(swarm["1:3"], **fields)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert re.search(message, error.value.details()), error.value.details()
    # the peer still serves a good request
    hidden = torch.randn(1, 4, HIDDEN)
    reply = _backward(swarm["1:3"], start=1, end=3, hidden=to_message(hidden), grad_output=to_message(hidden))
    assert from_message(reply.grad_input, max_bytes=MAX_MESSAGE).shape == (1, 4, HIDDEN)
    assert not reply.HasField("grad_prompts")


def test_peer_killed_mid_step_gives_the_same_gradients(checkpoint, swarm, tmp_path) -> None:
    """The forward runs on one peer serving every block; then it dies. The backward tries it first (the
    forward's peer), bans it, and is split over a 0:2 and a 2:4 peer, which first re-run the forward of
    blocks 0..1 to get the input of block 2."""
    spans = ["0:4", "0:2", "2:4"]
    peers = start_peers(tmp_path, checkpoint("llama"), spans, swarm["dht"].maddrs, "--model-id", "ft-chaos")
    model = None
    try:
        whole, *spares = peers
        torch.manual_seed(0)
        model = AutoDistributedModelForCausalLM.from_pretrained(
            checkpoint("llama"),
            initial_peers=swarm["dht"].maddrs,
            model_id="ft-chaos",
            tuning_mode="deep_ptune",
            pre_seq_len=PRE_SEQ_LEN,
            max_retries=3,
        )
        tuning = model.prompt_tuning
        with torch.no_grad():
            tuning.deep_prompts.normal_(generator=torch.Generator().manual_seed(1))
        ids = _ids(2, 7, seed=11)
        model(input_ids=ids, labels=ids).loss.backward()
        expected = [tuning.input_prompts.grad.clone(), tuning.deep_prompts.grad.clone()]
        model.zero_grad()

        bans = model.swarm.bans
        for peer in spares:  # the forward takes the peer of every block
            bans.ban(peer.peer_id, "test")
        loss = model(input_ids=ids, labels=ids).loss
        for peer in spares:
            bans.unban(peer.peer_id)
        whole.stop(signal.SIGKILL)
        loss.backward()
        assert bans.is_banned(whole.peer_id)  # the dead peer was tried, and failed
        torch.testing.assert_close(tuning.input_prompts.grad, expected[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(tuning.deep_prompts.grad, expected[1], atol=1e-5, rtol=0)
    finally:
        if model is not None:
            model.shutdown()
        stop_all(peers)
