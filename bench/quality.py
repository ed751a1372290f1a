"""What lossy modes cost in quality: perplexity of SmolLM2-135M-Instruct on held-out Shakespeare lines (a play
no example fine-tunes on), locally and through a local 3-peer swarm, for each peer weight mode (`--quant`)
and each wire format of the hidden states (`wire_dtype`). Also the bytes one hidden state [1, 1, 576] takes
on the wire per hop in each format. Prints JSON.

    python bench/quality.py [--play the-tempest] [--seq-len 128] [--blocks 8] [--quant none int8]
                            [--wire float32 float16 bfloat16 int8]

Perplexity comes from the model's own loss on `--blocks` token blocks of `--seq-len` tokens (a stateless
Forward through the peers); each mode is reported with its change against float32 transformers in percent.
"""

from __future__ import annotations

import argparse
import copy
import json
import math

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from client.corpus import token_blocks
from client.local_swarm import running
from client.model import AutoDistributedModelForCausalLM
from peer.quant import quantize_blocks
from protos.prepare import prepare_default_model
from protos.tensors import to_message, wire_dtype_from_name

SPANS = ["0:10", "10:20", "20:30"]


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor) -> float:
    losses = [model(row.unsqueeze(0), labels=row.unsqueeze(0)).loss.item() for row in blocks]
    return math.exp(sum(losses) / len(losses))


def wire_bytes(formats: list[str], hidden_size: int) -> dict[str, int]:
    """Bytes of one hidden state [1, 1, hidden] on the wire (the Tensor message, as serialized)."""
    hidden = torch.randn(1, 1, hidden_size, generator=torch.Generator().manual_seed(0))
    return {name: to_message(hidden, dtype=wire_dtype_from_name(name)).ByteSize() for name in formats}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--play", default="the-tempest", help="held-out play (see client.corpus.play_names)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per block")
    parser.add_argument("--blocks", type=int, default=8, help="token blocks evaluated")
    parser.add_argument("--quant", nargs="+", default=["none", "int8"], help="peer weight modes")
    parser.add_argument(
        "--wire", nargs="+", default=["float32", "float16", "bfloat16", "int8"], help="wire formats"
    )
    args = parser.parse_args()
    folder = prepare_default_model()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    blocks = token_blocks(tokenizer, args.play, seq_len=args.seq_len, max_blocks=args.blocks)

    local = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    reference = perplexity(local, blocks)
    results: dict[str, dict] = {"local": {"none": {"ppl": round(reference, 4)}}}
    for quant in args.quant:
        if quant == "none":
            continue
        quantized = copy.deepcopy(local)
        quantize_blocks(list(quantized.model.layers), quant)
        value = perplexity(quantized, blocks)
        results["local"][quant] = {
            "ppl": round(value, 4),
            "change_pct": round(100 * (value / reference - 1), 3),
        }
    hidden_size = local.config.hidden_size
    del local

    for quant in args.quant:
        swarm_results: dict[str, dict] = {}
        with running(folder, SPANS, "--insecure", f"--quant={quant}") as swarm:
            for wire in args.wire:
                remote = AutoDistributedModelForCausalLM.from_pretrained(
                    folder, initial_peers=swarm.initial_peers, insecure=True, wire_dtype=wire, quant="any"
                )
                try:
                    value = perplexity(remote, blocks)
                finally:
                    remote.shutdown()
                change = round(100 * (value / reference - 1), 3)
                swarm_results[wire] = {"ppl": round(value, 4), "change_pct": change}
        results[f"swarm_quant_{quant}"] = swarm_results

    print(
        json.dumps(
            {
                "model": str(folder),
                "play": args.play,
                "tokens": int(blocks.numel()),
                "reference_ppl": round(reference, 4),
                "results": results,
                "wire_bytes_per_token_per_hop": wire_bytes(args.wire, hidden_size),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
