"""Fine-tuning through the swarm on a tiny Llama served by real peer processes: gradients of the trainable
client parts equal local autograd on transformers' own model; Backward validates its input; a peer killed in
the middle of a training step changes nothing."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from families import VOCAB
from swarm import Process, start_dht, start_peers
from transformers import AutoModelForSequenceClassification

from client.model import AutoDistributedModelForCausalLM, AutoDistributedModelForSequenceClassification

SPANS = ["0:1", "1:3", "3:4"]
PRE_SEQ_LEN = 3
MAX_MESSAGE = 1 << 20
PEER_OPTIONS = ("--throughput", "100", "--max-message-bytes", str(MAX_MESSAGE), "--announce-period", "2")


@pytest.fixture(scope="module")
def swarm(checkpoint, tmp_path_factory) -> Iterator[dict[str, Process]]:
    logs = tmp_path_factory.mktemp("finetune-swarm")
    dht = start_dht(logs)
    started: dict[str, Process] = {"dht": dht}
    try:
        # three peers of one route, and two more for the blocks of the peer the chaos test kills
        spans = [*SPANS, "1:3", "0:4"]
        peers = start_peers(
            logs, checkpoint("llama"), spans[:3], dht.maddrs, "--model-id", "ft", *PEER_OPTIONS
        )
        started |= dict(zip(SPANS, peers, strict=True))
        spares = start_peers(logs, checkpoint("llama"), ["1:3", "1:3"], dht.maddrs, "--model-id", "ft-chaos")
        started |= {"chaos-a": spares[0], "chaos-b": spares[1]}
        edges = start_peers(logs, checkpoint("llama"), ["0:1", "3:4"], dht.maddrs, "--model-id", "ft-chaos")
        started |= {"chaos-0": edges[0], "chaos-3": edges[1]}
        yield started
    finally:
        for process in reversed(started.values()):
            process.stop()


def _ids(batch: int, seq: int, seed: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _reference_loss(
    local, ids: torch.Tensor, prompts: torch.Tensor, deep: torch.Tensor | None
) -> torch.Tensor:
    """Prompt tuning written directly on transformers' own model: prompts before the input embeddings, deep
    prompts added to the first positions entering each block by forward pre-hooks."""
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
        batch = ids.shape[0]
        embeds = torch.cat([prompts.expand(batch, -1, -1), embeds], dim=1)
        labels = torch.cat([torch.full((batch, PRE_SEQ_LEN), -100), ids], dim=1)
        return local(inputs_embeds=embeds, labels=labels).loss
    finally:
        for hook in hooks:
            hook.remove()


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


def test_classifier_head_gradients_match_local_autograd(checkpoint, swarm) -> None:
    torch.manual_seed(0)
    model = AutoDistributedModelForSequenceClassification.from_pretrained(
        checkpoint("llama"), initial_peers=swarm["dht"].maddrs, model_id="ft", num_labels=3
    )
    try:
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        assert trainable == {"score.weight"}
        assert model.score.weight.dtype == torch.float32
        reference = AutoModelForSequenceClassification.from_pretrained(
            checkpoint("llama"), num_labels=3, pad_token_id=0, dtype=torch.float32
        ).eval()
        with torch.no_grad():
            reference.score.weight.copy_(model.score.weight)
        ids, labels = _ids(4, 7, seed=3), torch.tensor([0, 2, 1, 2])
        output = model(input_ids=ids, labels=labels)
        output.loss.backward()
        expected = reference(input_ids=ids, labels=labels)
        expected.loss.backward()
        torch.testing.assert_close(output.logits, expected.logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(model.score.weight.grad, reference.score.weight.grad, atol=1e-5, rtol=0)
    finally:
        model.shutdown()
