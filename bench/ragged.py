"""A batch of prompts of different lengths through the swarm (`python bench/decode.py --batch 8 --ragged`):
one left-padded `generate()` of all rows (one session, one step per token for the whole batch) against the
same rows one at a time, on the same local 3-peer SmolLM2 swarm. Also compared with local transformers on
the same padded batch: the same tokens?"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from client.local_swarm import running
from client.model import AutoDistributedModelForCausalLM

QUESTIONS = [
    "What is the capital of France?",
    "Name three colours of the rainbow.",
    "How many legs does a spider have? Answer with a number and explain how you know.",
    "Write a haiku about the sea.",
    "What is two plus two?",
    "Who wrote Romeo and Juliet, and when was it first performed on stage in London?",
    "Give me a synonym for happy.",
    "Why is the sky blue? Explain it to a curious child who asks a lot of questions.",
]


def _prompts(tokenizer: PreTrainedTokenizerBase, batch: int) -> list[str]:
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
            add_generation_prompt=True,
            tokenize=False,
        )
        for i in range(batch)
    ]


def _timed(model: Any, inputs: dict[str, torch.Tensor], new_tokens: int) -> tuple[float, torch.Tensor]:
    started = time.perf_counter()
    out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return time.perf_counter() - started, out


def ragged_batch(
    folder: Any,
    tokenizer: PreTrainedTokenizerBase,
    spans: list[str],
    *,
    batch: int,
    new_tokens: int,
    repeats: int,
) -> dict[str, Any]:
    """Tokens/s of the padded batch and of its rows one at a time (medians of `repeats`), and token equality
    with local transformers on the same batch."""
    tokenizer.padding_side = "left"
    texts = _prompts(tokenizer, batch)
    padded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    rows = [tokenizer(text, return_tensors="pt", add_special_tokens=False) for text in texts]
    local = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    _, expected = _timed(local, padded, new_tokens)
    del local
    with running(folder, spans) as swarm:
        model = AutoDistributedModelForCausalLM.from_pretrained(folder, initial_peers=swarm.initial_peers)
        try:
            _timed(model, rows[0], 2)  # warm-up: route, channels
            together, alone = [], []
            for _ in range(repeats):
                seconds, out = _timed(model, padded, new_tokens)
                together.append(seconds)
                alone.append(sum(_timed(model, row, new_tokens)[0] for row in rows))
        finally:
            model.shutdown()
    generated = batch * new_tokens
    batched, single = generated / statistics.median(together), generated / statistics.median(alone)
    return {
        "batch": batch,
        "prompt_lengths": [int(n) for n in padded["attention_mask"].sum(dim=1)],
        "new_tokens": new_tokens,
        "repeats": repeats,
        "ragged_batch_tokens_per_s": round(batched, 2),
        "one_at_a_time_tokens_per_s": round(single, 2),
        "speedup": round(batched / single, 2),
        "same_tokens_as_local_transformers": bool(torch.equal(out, expected)),
    }
