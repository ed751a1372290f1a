"""Prompt tuning of the real SmolLM2-135M on Shakespeare's lines through 3 peer processes: the held-out loss
drops clearly, and the loss curve equals the same training run on transformers' own model."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from swarm import LocalSwarm, running
from transformers import AutoModelForCausalLM, AutoTokenizer

from client.corpus import token_blocks
from client.finetune import prompted_loss
from client.model import AutoDistributedModelForCausalLM
from protos.prepare import prepare_default_model

SPANS = ["0:10", "10:20", "20:30"]
STEPS, BATCH, SEQ_LEN, PRE_SEQ_LEN, LR = 20, 2, 16, 4, 0.03

pytestmark = [pytest.mark.slow, pytest.mark.swarm]


@pytest.fixture(scope="module")
def smollm2():
    return prepare_default_model()


@pytest.fixture(scope="module")
def swarm(smollm2, tmp_path_factory) -> Iterator[LocalSwarm]:
    with running(
        tmp_path_factory.mktemp("smollm2-tuning"), smollm2, SPANS, "--model-id", "smollm2-tune"
    ) as swarm:
        yield swarm


def _train(loss_of, parameters: list[torch.nn.Parameter], train: torch.Tensor) -> list[float]:
    optimizer = torch.optim.AdamW(parameters, lr=LR, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, STEPS)
    losses = []
    for step in range(STEPS):
        loss = loss_of(train[step * BATCH : (step + 1) * BATCH])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
        losses.append(loss.item())
    return losses


def test_prompt_tuning_lowers_held_out_loss_like_local_training(smollm2, swarm) -> None:
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    train = token_blocks(tokenizer, "hamlet", seq_len=SEQ_LEN, max_blocks=STEPS * BATCH)
    held_out = token_blocks(tokenizer, "macbeth", seq_len=SEQ_LEN, max_blocks=8)

    torch.manual_seed(0)
    model = AutoDistributedModelForCausalLM.from_pretrained(
        smollm2,
        initial_peers=swarm.initial_peers,
        model_id="smollm2-tune",
        tuning_mode="ptune",
        pre_seq_len=PRE_SEQ_LEN,
    )
    try:
        prompts = model.prompt_tuning.input_prompts
        initial = prompts.detach().clone()
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert trainable == [prompts]

        def remote_loss(ids: torch.Tensor) -> torch.Tensor:
            return model(input_ids=ids, labels=ids).loss

        with torch.no_grad():
            before = remote_loss(held_out).item()
        remote_curve = _train(remote_loss, trainable, train)
        with torch.no_grad():
            after = remote_loss(held_out).item()
    finally:
        model.shutdown()
    print(f"held-out loss through the swarm: {before:.3f} -> {after:.3f}")
    assert after < before - 0.3, (before, after)

    # the same run on transformers' own model, prompts written by hand
    local = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval().requires_grad_(False)
    local_prompts = torch.nn.Parameter(initial)
    local_curve = _train(lambda ids: prompted_loss(local, local_prompts, ids), [local_prompts], train)
    torch.testing.assert_close(torch.tensor(remote_curve), torch.tensor(local_curve), atol=1e-4, rtol=0)
    torch.testing.assert_close(prompts.detach(), local_prompts.detach(), atol=1e-4, rtol=0)
