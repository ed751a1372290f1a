"""Parity: embed -> 3 spans (each loaded alone from the checkpoint) -> head equals transformers' own model."""

from __future__ import annotations

import pytest
import torch
from families import FAMILIES, NUM_BLOCKS, VOCAB, without_eos
from transformers import AutoModelForCausalLM

from client.modules import ClientModules
from peer.blocks import HostedSpan

SPANS = [(0, 1), (1, 3), (3, NUM_BLOCKS)]
PROMPT_LEN = 10
DECODE_STEPS = 20


def reference(folder, input_ids: torch.Tensor):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    without_eos(model)
    out = model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=DECODE_STEPS + 1,
        min_new_tokens=DECODE_STEPS + 1,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    return out.sequences[:, input_ids.shape[1] :], torch.stack(out.logits, 1)


def through_spans(client: ClientModules, spans: list[HostedSpan], input_ids: torch.Tensor):
    """A prefill, then greedy decode steps, each step through every span with its own cache."""
    caches = [span.new_cache() for span in spans]
    batch, length = input_ids.shape
    positions = torch.arange(length).expand(batch, -1)
    step_ids, tokens, logits = input_ids, [], []
    for _ in range(DECODE_STEPS + 1):
        hidden = client.embed(step_ids, positions)
        for span, cache in zip(spans, caches, strict=True):
            hidden = span.forward(hidden, cache, positions)
        step_logits = client.head(hidden[:, -1:], positions[:, -1:])[:, -1]
        step_ids = step_logits.argmax(-1, keepdim=True)
        tokens.append(step_ids)
        logits.append(step_logits)
        positions = positions[:, -1:] + 1
    return torch.cat(tokens, 1), torch.stack(logits, 1)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_spans_match_transformers(checkpoint, family: str, batch: int) -> None:
    folder = checkpoint(family)
    torch.manual_seed(1)
    input_ids = torch.randint(3, VOCAB, (batch, PROMPT_LEN))
    expected_tokens, expected_logits = reference(folder, input_ids)

    client = ClientModules.load(folder)
    spans = [HostedSpan.load(folder, start, end) for start, end in SPANS]
    tokens, logits = through_spans(client, spans, input_ids)

    torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=0)
    assert torch.equal(tokens, expected_tokens)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bloom"])
def test_one_shot_prefill_matches_full_forward(checkpoint, family: str) -> None:
    folder = checkpoint(family)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    input_ids = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(input_ids, use_cache=False).logits

    client = ClientModules.load(folder)
    hidden = client.embed(input_ids)
    for start, end in SPANS:
        hidden = HostedSpan.load(folder, start, end).forward(hidden)  # stateless: no cache
    torch.testing.assert_close(client.head(hidden), expected, atol=1e-5, rtol=0)


def test_sub_span_of_the_hosted_span(checkpoint) -> None:
    """A peer hosting [0, 4) runs [1, 3) alone exactly as a peer hosting only [1, 3)."""
    folder = checkpoint("mistral")
    wide, narrow = HostedSpan.load(folder, 0, NUM_BLOCKS), HostedSpan.load(folder, 1, 3)
    hidden = torch.randn(1, 12, wide.hidden_size, generator=torch.Generator().manual_seed(3))
    wide_cache, narrow_cache = wide.new_cache(start=1, end=3), narrow.new_cache()
    for chunk in hidden.split([10, 1, 1], dim=1):
        out_wide = wide.forward(chunk, wide_cache, start=1, end=3)
        out_narrow = narrow.forward(chunk, narrow_cache)
        assert torch.equal(out_wide, out_narrow)


def test_mixtral_checkpoint_keeps_per_expert_weights(checkpoint) -> None:
    """The parity run above loads Mixtral from a per-expert checkpoint, fused into 3D weights on load."""
    from safetensors import safe_open

    folder = checkpoint("mixtral")
    with safe_open(folder / "model.safetensors", framework="pt") as handle:
        keys = list(handle.keys())
    assert any(".experts.3.w1.weight" in key for key in keys)
    span = HostedSpan.load(folder, 1, 3)
    assert span.blocks[1].mlp.experts.gate_up_proj.shape[0] == 4
