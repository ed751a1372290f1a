"""Decode and prefill speed through a local 3-peer swarm vs local transformers, on SmolLM2-135M-Instruct.

Prints JSON: median ms per generated token (batch 1, greedy, after a chat prompt) both ways and their
ratio, and the time of a 512-token prefill both ways. Peers run as separate processes on 127.0.0.1.

    python bench/decode.py [--new-tokens 64] [--repeats 3] [--insecure]

Peers and client speak TLS with signed records (the default); `--insecure` runs the same on plaintext gRPC,
so the two runs give what security costs per hop and token.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase, TextStreamer

from client.local_swarm import running
from client.model import AutoDistributedModelForCausalLM
from protos.prepare import prepare_default_model

SPANS = ["0:10", "10:20", "20:30"]


class _Clock(TextStreamer):
    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        super().__init__(tokenizer, skip_prompt=True)
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _ms_per_token(model, tokenizer, inputs, new_tokens: int) -> tuple[float, torch.Tensor]:
    clock = _Clock(tokenizer)
    out = model.generate(
        **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, streamer=clock
    )
    decode = clock.times[2:]  # after the prompt and the first (prefill) token
    return statistics.median(b - a for a, b in itertools.pairwise(decode)) * 1000, out


def _prefill_ms(model, length: int) -> float:
    ids = torch.randint(100, 40000, (1, length), generator=torch.Generator().manual_seed(0))
    started = time.perf_counter()
    with torch.no_grad():
        model(ids)
    return (time.perf_counter() - started) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--new-tokens", type=int, default=64, help="generated tokens per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement (the median is kept)")
    parser.add_argument("--prefill", type=int, default=512, help="tokens in the prefill measurement")
    parser.add_argument(
        "--insecure", action="store_true", help="plaintext gRPC between client and peers (default: TLS)"
    )
    args = parser.parse_args()
    folder = prepare_default_model()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Write a short story about a lighthouse keeper."}],
        add_generation_prompt=True,
        tokenize=False,
    )
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)

    local = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    local_ms, local_out, local_prefill = [], None, []
    for _ in range(args.repeats):
        ms, local_out = _ms_per_token(local, tokenizer, inputs, args.new_tokens)
        local_ms.append(ms)
        local_prefill.append(_prefill_ms(local, args.prefill))
    del local

    with running(folder, SPANS, *(["--insecure"] if args.insecure else [])) as swarm:
        remote = AutoDistributedModelForCausalLM.from_pretrained(
            folder, initial_peers=swarm.initial_peers, insecure=args.insecure
        )
        swarm_ms, swarm_out, swarm_prefill = [], None, []
        for _ in range(args.repeats):
            ms, swarm_out = _ms_per_token(remote, tokenizer, inputs, args.new_tokens)
            swarm_ms.append(ms)
            swarm_prefill.append(_prefill_ms(remote, args.prefill))
        remote.shutdown()

    decode_swarm, decode_local = statistics.median(swarm_ms), statistics.median(local_ms)
    prefill_swarm, prefill_local = statistics.median(swarm_prefill), statistics.median(local_prefill)
    print(
        json.dumps(
            {
                "model": str(folder),
                "peers": SPANS,
                "new_tokens": args.new_tokens,
                "decode_ms_per_token": {"swarm": round(decode_swarm, 2), "local": round(decode_local, 2)},
                "decode_ratio": round(decode_swarm / decode_local, 3),
                f"prefill_{args.prefill}_ms": {
                    "swarm": round(prefill_swarm, 1),
                    "local": round(prefill_local, 1),
                },
                "prefill_ratio": round(prefill_swarm / prefill_local, 3),
                "same_tokens": bool(torch.equal(swarm_out, local_out)),
                "tls": not args.insecure,
                "repeats": args.repeats,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
