"""What the hand-over to the compute thread costs a lone decode step: one-token steps of a small span through
the peer's `Scheduler`, with the forward run on the event loop thread (`inline_seconds` on) and through
its one-thread executor (off), alternating step by step so that load from elsewhere hits both alike.

Prints JSON per span: median and p90 microseconds per step both ways and of their time outside the forward,
the median of the paired differences, the bare forward (`HostedSpan.forward` called directly) and the bare
hop (`run_in_executor` of a no-op). Random weights (the
tiny Llama of bench/decode.py: 8 layers, hidden 512, a peer's 4 blocks; and a SmolLM2-135M-shaped peer's
10 blocks); nothing is downloaded.

    python bench/executor_hop.py [--steps N] [--context C] [--threads T] [--span NAME]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from peer.blocks import BatchItem, HostedSpan
from peer.scheduler import Scheduler, StepWork

SPANS: dict[str, dict[str, Any]] = {  # name: LlamaConfig fields; each peer hosts `blocks` of them
    "tiny-llama-8x512": dict(
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
    ),
    "smollm2-135m-shape": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
    ),
}
BLOCKS = {"tiny-llama-8x512": 4, "smollm2-135m-shape": 10}  # one peer's span: 2 and 3 peers
CHUNK_TOKENS = 128  # the peer's --prefill-chunk-tokens
WARMUP = 20  # steps each way before the timed ones (the inline way measures its step time meanwhile)


def _span(name: str) -> HostedSpan:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, max_position_embeddings=4096, **SPANS[name])
    model = LlamaForCausalLM(config).eval().model
    return HostedSpan.from_model(model, 0, BLOCKS[name])


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(fraction * len(ordered)), len(ordered) - 1)]


class _Session:
    """One session on one scheduler: one-token steps after `context` cached positions, each rolled back
    to them first (as the peer's `prepare` does)."""

    def __init__(self, scheduler: Scheduler, span: HostedSpan, context: int) -> None:
        self.scheduler, self.span, self.context = scheduler, span, context
        self.cache = span.new_cache()
        with torch.inference_mode():
            span.forward(torch.randn(1, context, span.hidden_size), self.cache)
        self.hidden = torch.randn(1, 1, span.hidden_size)
        self.positions = torch.tensor([[context]])

    async def step(self) -> tuple[float, float]:
        """(microseconds of the step through the scheduler, of them outside the forward)."""
        cache, context = self.cache, self.context
        item = BatchItem(self.hidden, cache, self.positions)
        work = StepWork(self.span, self.span.start, self.span.end, item, lambda: cache.rollback(context))
        started = time.perf_counter()
        await self.scheduler.prefill(work, chunk_tokens=CHUNK_TOKENS)
        total = (time.perf_counter() - started) * 1e6
        return total, total - work.computed * 1e6


def _bare(span: HostedSpan, context: int, steps: int) -> tuple[list[float], list[float]]:
    """Microseconds of the forward alone, and of a no-op handed to a one-thread executor and back."""
    cache = span.new_cache()
    with torch.inference_mode():
        span.forward(torch.randn(1, context, span.hidden_size), cache)
    hidden = torch.randn(1, 1, span.hidden_size)
    positions = torch.tensor([[context]])
    forward = []
    for _ in range(steps):
        started = time.perf_counter()
        cache.rollback(context)
        span.forward(hidden, cache, positions)
        forward.append((time.perf_counter() - started) * 1e6)

    async def hops() -> list[float]:
        loop, pool, times = asyncio.get_running_loop(), ThreadPoolExecutor(max_workers=1), []
        for _ in range(steps):
            started = time.perf_counter()
            await loop.run_in_executor(pool, int)
            times.append((time.perf_counter() - started) * 1e6)
        pool.shutdown()
        return times

    return forward, asyncio.run(hops())


def _summary(times: list[float]) -> dict[str, float]:
    return {"median_us": round(statistics.median(times), 1), "p90_us": round(_percentile(times, 0.9), 1)}


def measure(name: str, *, steps: int, context: int) -> dict[str, Any]:
    """Alternates one step through the compute thread and one on the loop, `steps` times each."""
    span = _span(name)
    executor, inline = Scheduler(inline_seconds=0.0), Scheduler(inline_seconds=1.0)
    timed: dict[str, list[float]] = {"executor": [], "inline": []}
    outside: dict[str, list[float]] = {"executor": [], "inline": []}

    async def run() -> None:
        sessions = {"executor": _Session(executor, span, context), "inline": _Session(inline, span, context)}
        for _ in range(WARMUP):
            for session in sessions.values():
                await session.step()
        for _ in range(steps):
            for way, session in sessions.items():
                total, extra = await session.step()
                timed[way].append(total)
                outside[way].append(extra)

    asyncio.run(run())
    inlined = inline.inlined
    executor.shutdown()
    inline.shutdown()
    forward, hop = _bare(span, context, steps)
    paired = [a - b for a, b in zip(timed["executor"], timed["inline"], strict=True)]
    return {
        "span": name,
        "blocks": BLOCKS[name],
        "context": context,
        "steps": steps,
        "executor": _summary(timed["executor"]),
        "inline": _summary(timed["inline"]),
        "executor_outside_forward": _summary(outside["executor"]),
        "inline_outside_forward": _summary(outside["inline"]),
        "inlined_steps": inlined,
        "forward_alone": _summary(forward),
        "bare_hop": _summary(hop),
        "inline_saves_us_median_of_pairs": round(statistics.median(paired), 1),
        "inline_saves_fraction": round(statistics.median(paired) / statistics.median(timed["executor"]), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=2000, help="steps each way (alternating)")
    parser.add_argument("--context", type=int, default=128, help="cached positions before each step")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--span", choices=sorted(SPANS), action="append", help="default: every span")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    results = [measure(name, steps=args.steps, context=args.context) for name in args.span or SPANS]
    print(json.dumps({"threads": torch.get_num_threads(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
