"""Overhead of running all blocks as one corolla span vs transformers' own forward on the same model.

Prints JSON: median ms of a decode step at context 128 and of a 512-token prefill, both ways, and the
ratios (span / transformers). Runs on the prepared SmolLM2-135M-Instruct by default.

    python bench/span_overhead.py [--model DIR] [--repeats N] [--dtype float32]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
from transformers import AutoModelForCausalLM, DynamicCache

from peer.blocks import HostedSpan
from protos.checkpoint import parse_dtype
from protos.prepare import prepare_default_model


def _median_ms(fn: Callable[[], object], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="checkpoint folder (default: the prepared SmolLM2-135M-Instruct)")
    parser.add_argument("--repeats", type=int, default=30, help="timed repetitions per measurement")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    parser.add_argument("--context", type=int, default=128, help="cached positions before the decode step")
    parser.add_argument("--prefill", type=int, default=512, help="tokens in the prefill measurement")
    args = parser.parse_args()
    folder = args.model or str(prepare_default_model())
    dtype = parse_dtype(args.dtype)
    torch.manual_seed(0)

    base = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval().model
    span = HostedSpan.load(folder, 0, base.config.num_hidden_layers, dtype=dtype)
    hidden_size = span.hidden_size
    context = torch.randn(1, args.context, hidden_size, dtype=dtype)
    step = torch.randn(1, 1, hidden_size, dtype=dtype)
    prefill = torch.randn(1, args.prefill, hidden_size, dtype=dtype)
    step_positions = torch.tensor([[args.context]])

    hf_cache = DynamicCache(config=base.config)
    span_cache = span.new_cache()
    with torch.inference_mode():
        base(inputs_embeds=context, past_key_values=hf_cache, use_cache=True)
        span.forward(context, span_cache)

    def hf_decode() -> None:
        with torch.inference_mode():
            base(inputs_embeds=step, past_key_values=hf_cache, position_ids=step_positions, use_cache=True)
        hf_cache.crop(-1)

    def span_decode() -> None:
        span.forward(step, span_cache, step_positions)
        span_cache.crop(-1)

    def hf_prefill() -> None:
        with torch.inference_mode():
            base(inputs_embeds=prefill, use_cache=False)

    def span_prefill() -> None:
        span.forward(prefill)

    results: dict[str, object] = {"model": folder, "dtype": args.dtype, "threads": torch.get_num_threads()}
    for name, ours, theirs, repeats in [
        ("decode", span_decode, hf_decode, args.repeats),
        ("prefill", span_prefill, hf_prefill, max(5, args.repeats // 3)),
    ]:
        ours(), theirs()  # warm up
        ours_ms: list[float] = []
        theirs_ms: list[float] = []
        for _ in range(repeats):  # interleaved, so machine noise hits both alike
            ours_ms += _median_ms(ours, 1)
            theirs_ms += _median_ms(theirs, 1)
        span_median, hf_median = statistics.median(ours_ms), statistics.median(theirs_ms)
        results[name] = {
            "span_ms": round(span_median, 3),
            "transformers_ms": round(hf_median, 3),
            "ratio": round(span_median / hf_median, 4),
            "repeats": repeats,
        }
    results["decode"]["context"] = args.context  # type: ignore[index]
    results["prefill"]["tokens"] = args.prefill  # type: ignore[index]
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
