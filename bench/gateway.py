"""The OpenAI gateway's cost: time to first token and decode speed through `corolla api` (the official
`openai` SDK, streamed chat; and plain HTTP without the SDK) vs the client library called directly, on the
same local 3-peer SmolLM2 swarm; then 8 streamed requests at once through the gateway.

    python bench/gateway.py [--new-tokens 48] [--repeats 5] [--concurrent 8]

Prints JSON. Runs alternate between the two ways, so load on the shared machine hits both alike; medians.
End of turn is suppressed both ways (`min_new_tokens` directly, `logit_bias` through the API), so every run
generates exactly --new-tokens tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import torch
from transformers import AutoTokenizer
from transformers.generation.streamers import BaseStreamer

from client.local_swarm import running, start_api
from client.model import AutoDistributedModelForCausalLM
from protos.prepare import prepare_default_model

SPANS = ["0:10", "10:20", "20:30"]
QUESTION = "Explain in a few sentences why the sky is blue."
QUESTIONS = [
    "What is the capital of France?",
    "Name three colours of the rainbow.",
    "How many legs does a spider have?",
    "Write a haiku about the sea.",
    "What is two plus two?",
    "Who wrote Romeo and Juliet?",
    "Give me a synonym for happy.",
    "Why is the sky blue?",
]
MODEL = "SmolLM2-135M-Instruct"


class _Clock(BaseStreamer):
    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _timing(started: float, token_times: list[float]) -> dict[str, float]:
    """Time to first token (ms) and decode tokens/s after it."""
    first, last = token_times[0], token_times[-1]
    return {
        "ttft_ms": (first - started) * 1000,
        "tokens_per_s": (len(token_times) - 1) / (last - first) if last > first else float("nan"),
    }


def _direct(model, tokenizer, question: str, new_tokens: int) -> dict[str, float]:
    """The library as a chat application calls it: the chat template, tokenizing, then `generate()`."""
    clock = _Clock()
    started = time.perf_counter()
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        streamer=clock,
    )
    return _timing(started, clock.times[1:])  # the first put is the prompt


def _through_api(sdk: openai.OpenAI, question: str, new_tokens: int, end_id: int) -> dict[str, float]:
    started, times, tokens = time.perf_counter(), [], 0
    stream = sdk.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": question}],
        temperature=0,
        max_tokens=new_tokens,
        logit_bias={str(end_id): -100},
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            times.append(time.perf_counter())
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    result = _timing(started, times)
    result["tokens"] = tokens
    return result


def _through_http(url: str, question: str, new_tokens: int, end_id: int) -> dict[str, float]:
    """The same request as plain HTTP (httpx, server-sent events read as lines): the gateway without the
    SDK's own cost of building requests and parsing every chunk into objects."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": question}],
        "temperature": 0,
        "max_tokens": new_tokens,
        "logit_bias": {str(end_id): -100},
        "stream": True,
    }
    started, times = time.perf_counter(), []
    with httpx.stream("POST", url + "/chat/completions", json=body, timeout=600) as reply:
        for line in reply.iter_lines():
            if line.startswith("data: {") and '"content":"' in line and '"content":""' not in line:
                times.append(time.perf_counter())
    result = _timing(started, times)
    result["tokens"] = len(times)
    return result


def _median(runs: list[dict[str, float]], key: str) -> float:
    return round(statistics.median(run[key] for run in runs), 2)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--new-tokens", type=int, default=48, help="tokens per generation (default: 48)")
    parser.add_argument("--repeats", type=int, default=5, help="runs each way, alternating (default: 5)")
    parser.add_argument("--concurrent", type=int, default=8, help="streamed requests at once (default: 8)")
    args = parser.parse_args()

    folder = prepare_default_model()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with tempfile.TemporaryDirectory(prefix="corolla-bench-") as logs, running(folder, SPANS) as swarm:
        api = start_api(Path(logs), folder, swarm.initial_peers)
        model = AutoDistributedModelForCausalLM.from_pretrained(folder, initial_peers=swarm.initial_peers)
        sdk = openai.OpenAI(base_url=api.address, api_key="unused", max_retries=0, timeout=600)
        try:
            _direct(model, tokenizer, QUESTION, 4)  # warm-up both ways: routes, channels, first-call costs
            _through_api(sdk, QUESTION, 4, tokenizer.eos_token_id)
            direct, gateway, http = [], [], []
            for _ in range(args.repeats):
                direct.append(_direct(model, tokenizer, QUESTION, args.new_tokens))
                gateway.append(_through_api(sdk, QUESTION, args.new_tokens, tokenizer.eos_token_id))
                http.append(_through_http(api.address, QUESTION, args.new_tokens, tokenizer.eos_token_id))
            questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.concurrent)]
            started = time.perf_counter()
            end = tokenizer.eos_token_id
            with ThreadPoolExecutor(args.concurrent) as pool:
                together = list(pool.map(lambda q: _through_api(sdk, q, args.new_tokens, end), questions))
            wall = time.perf_counter() - started
        finally:
            model.shutdown()
            api.stop()
    direct_speed, gateway_speed = _median(direct, "tokens_per_s"), _median(gateway, "tokens_per_s")
    direct_ttft, gateway_ttft = _median(direct, "ttft_ms"), _median(gateway, "ttft_ms")
    print(
        json.dumps(
            {
                "model": MODEL,
                "new_tokens": args.new_tokens,
                "repeats": args.repeats,
                "direct": {"tokens_per_s": direct_speed, "ttft_ms": direct_ttft},
                "gateway": {"tokens_per_s": gateway_speed, "ttft_ms": gateway_ttft},
                "gateway_speed_ratio": round(gateway_speed / direct_speed, 3),
                "gateway_ttft_ratio": round(gateway_ttft / direct_ttft, 3),
                "plain_http": {
                    "tokens_per_s": _median(http, "tokens_per_s"),
                    "ttft_ms": _median(http, "ttft_ms"),
                    "speed_ratio": round(_median(http, "tokens_per_s") / direct_speed, 3),
                    "ttft_ratio": round(_median(http, "ttft_ms") / direct_ttft, 3),
                },
                "concurrent": {
                    "requests": args.concurrent,
                    "all_tokens": all(run["tokens"] == args.new_tokens for run in together),
                    "wall_s": round(wall, 2),
                    "aggregate_tokens_per_s": round(sum(run["tokens"] for run in together) / wall, 2),
                    "median_ttft_ms": _median(together, "ttft_ms"),
                    "median_tokens_per_s_each": _median(together, "tokens_per_s"),
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
