"""The real SmolLM2-135M-Instruct checkpoint, split into 3 spans of 10 blocks, generates like transformers."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from client.modules import ClientModules
from peer.blocks import HostedSpan
from protos.prepare import prepare_default_model

NEW_TOKENS = 32
SPANS = [(0, 10), (10, 20), (20, 30)]

pytestmark = [pytest.mark.slow, pytest.mark.swarm]


@pytest.fixture(scope="module")
def smollm2():
    return prepare_default_model()


def test_three_spans_generate_like_transformers(smollm2) -> None:
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    messages = [{"role": "user", "content": "Name three colours of the rainbow."}]
    input_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    input_ids = input_ids["input_ids"] if not isinstance(input_ids, torch.Tensor) else input_ids
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    expected = model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
    )[0, input_ids.shape[1] :]
    del model

    client = ClientModules.load(smollm2)
    spans = [HostedSpan.load(smollm2, start, end) for start, end in SPANS]
    caches = [span.new_cache() for span in spans]
    positions = torch.arange(input_ids.shape[1])[None]
    step_ids, tokens = input_ids, []
    for _ in range(NEW_TOKENS):
        hidden = client.embed(step_ids, positions)
        for span, cache in zip(spans, caches, strict=True):
            hidden = span.forward(hidden, cache, positions)
        step_ids = client.head(hidden[:, -1:])[:, -1].argmax(-1, keepdim=True)
        tokens.append(int(step_ids))
        positions = positions[:, -1:] + 1
    assert tokens == expected.tolist(), (tokenizer.decode(tokens), tokenizer.decode(expected))


def test_span_of_ten_blocks_holds_a_third_of_the_blocks(smollm2) -> None:
    span = HostedSpan.load(smollm2, 10, 20)
    per_block = sum(p.numel() * p.element_size() for p in span.blocks[10].parameters())
    embeddings = 49152 * 576 * 4
    assert 10 * per_block <= span.parameter_bytes() < 10 * per_block + embeddings // 10
    assert span.parameter_bytes() < 0.4 * (30 * per_block + embeddings)


class _Collect:
    """A streamer that keeps every token it is given."""

    def __init__(self) -> None:
        self.tokens: list[int] = []

    def put(self, value: torch.Tensor) -> None:
        self.tokens += value.flatten().tolist()

    def end(self) -> None:
        pass


def test_chat_answer_through_three_peer_processes(smollm2, tmp_path) -> None:
    from swarm import running

    from client.model import AutoDistributedModelForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
        add_generation_prompt=True,
        tokenize=False,
    )
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    local = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    options = dict(max_new_tokens=NEW_TOKENS, do_sample=False)
    expected = local.generate(**inputs, **options)
    stopped_expected = local.generate(**inputs, stop_strings=["."], tokenizer=tokenizer, **options)
    del local

    with running(tmp_path, smollm2, [f"{s}:{e}" for s, e in SPANS]) as swarm:
        model = AutoDistributedModelForCausalLM.from_pretrained(smollm2, initial_peers=swarm.initial_peers)
        try:
            streamer = _Collect()
            out = model.generate(**inputs, streamer=streamer, **options)
            stopped = model.generate(**inputs, stop_strings=["."], tokenizer=tokenizer, **options)
        finally:
            model.shutdown()
        question = "What is the capital of France? Answer in one sentence."
        command = [sys.executable, "-m", "protos.cli", "generate", str(smollm2), question, "--chat"]
        command += ["--max-new-tokens", str(NEW_TOKENS), "--initial-peers", *swarm.initial_peers]
        printed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert (
        out[0, inputs["input_ids"].shape[1] :].shape[0] == NEW_TOKENS or out[0, -1] == tokenizer.eos_token_id
    )
    assert torch.equal(out, expected), tokenizer.decode(out[0])
    assert streamer.tokens == out[0].tolist()  # the prompt, then each token as it was generated
    assert torch.equal(stopped, stopped_expected) and tokenizer.decode(stopped[0]).rstrip().endswith(".")
    answer = tokenizer.decode(expected[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout.strip() == answer.strip()
