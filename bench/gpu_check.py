"""Parity and decode speed of peers on an accelerator, for a machine that has one (CI has none).

    python bench/gpu_check.py [--device cuda] [--dtype float32 bfloat16] [--new-tokens 32]

For each dtype, on SmolLM2-135M-Instruct: (1) a span loaded with `HostedSpan.load(device=...)` against
transformers' own model on the same device and dtype (max |diff| of the hidden states after blocks 0:10 for a
64-token prompt, then 8 decode steps); (2) a local swarm of 3 peer processes started with `--device` and
`--dtype`, a client whose embeddings and head sit on the same device, greedy decode vs transformers on that
device: ms per token both ways and whether the tokens are the same. Prints JSON. `--device cpu` runs the same
checks on the CPU (a smoke test of the plumbing).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from client.local_swarm import running
from client.model import AutoDistributedModelForCausalLM
from peer.blocks import HostedSpan
from peer.devices import resolve_device, synchronize
from protos.prepare import prepare_default_model

SPANS = ["0:10", "10:20", "20:30"]
MODEL_ID = "gpu-check"  # named on both sides: the check does not depend on how ids are derived


@torch.inference_mode()
def span_parity(folder, device: torch.device, dtype: torch.dtype) -> dict:
    """Blocks 0:10 through `HostedSpan` vs transformers' model, both on `device` in `dtype`."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    span = HostedSpan.load(folder, 0, 10, dtype=dtype, device=device)
    ids = torch.randint(100, 40000, (1, 72), generator=torch.Generator().manual_seed(0)).to(device)
    expected = model(ids, output_hidden_states=True).hidden_states[10]  # after block 9
    embeds = model.get_input_embeddings()(ids)
    cache = span.new_cache()
    outputs = [span.forward(embeds[:, :64], cache)]
    outputs += [span.forward(embeds[:, i : i + 1], cache) for i in range(64, 72)]
    got = torch.cat(outputs, dim=1)
    return {
        "max_abs_diff": (got.float() - expected.float()).abs().max().item(),
        "max_abs_value": expected.float().abs().max().item(),
        "span_device": str(span.device),
        "span_bytes": span.parameter_bytes(),
    }


def _ms_per_token(model, inputs, new_tokens: int, device: torch.device) -> tuple[float, torch.Tensor]:
    times: list[float] = []

    class Clock:
        def put(self, value) -> None:
            synchronize(device)
            times.append(time.perf_counter())

        def end(self) -> None:
            pass

    out = model.generate(
        **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, streamer=Clock()
    )
    steps = [b - a for a, b in itertools.pairwise(times[2:])]
    return statistics.median(steps) * 1000, out.cpu()


def swarm_decode(folder, device: torch.device, dtype_name: str, new_tokens: int) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Write a short story about a lighthouse keeper."}],
        add_generation_prompt=True,
        tokenize=False,
    )
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(device)
    dtype = getattr(torch, dtype_name)
    local = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    local_ms, local_out = _ms_per_token(local, inputs, new_tokens, device)
    del local
    options = ["--insecure", "--device", str(device), "--dtype", dtype_name, "--model-id", MODEL_ID]
    with running(folder, SPANS, *options) as swarm:
        remote = AutoDistributedModelForCausalLM.from_pretrained(
            folder,
            initial_peers=swarm.initial_peers,
            insecure=True,
            dtype=dtype,
            device=device,
            model_id=MODEL_ID,
        )
        try:
            swarm_ms, swarm_out = _ms_per_token(remote, inputs, new_tokens, device)
        finally:
            remote.shutdown()
    return {
        "decode_ms_per_token": {"swarm": round(swarm_ms, 2), "local": round(local_ms, 2)},
        "decode_ratio": round(swarm_ms / local_ms, 3),
        "same_tokens": bool(torch.equal(swarm_out, local_out)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, mps or cpu (default: cuda)")
    parser.add_argument(
        "--dtype", nargs="+", default=["float32", "bfloat16"], help="dtypes to check (default: both)"
    )
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per decode run")
    parser.add_argument("--skip-swarm", action="store_true", help="only the span parity (no processes)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    folder = prepare_default_model()
    report: dict = {"device": str(device), "torch": torch.__version__, "checks": {}}
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(device)
    for dtype_name in args.dtype:
        check = {"span_parity": span_parity(folder, device, getattr(torch, dtype_name))}
        if not args.skip_swarm:
            check["swarm"] = swarm_decode(folder, device, dtype_name, args.new_tokens)
        report["checks"][dtype_name] = check
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
