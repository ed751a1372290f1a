"""What the default spot checks cost in decode speed (`bench/decode.py --spot-checks`): one swarm of the
three spans plus two verifier peers whose spans cut across them, so that every hop can be checked; two
clients on it, one with the default checks and one with `verify_every=0`, generating in turn (alternating
which goes first); decode tokens/s of each from the whole decode window (checked steps included: a median
of per-token times would hide them), the slowdown, and what the checks did.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase, TextStreamer

from client.config import ClientConfig
from client.local_swarm import running
from client.model import AutoDistributedModelForCausalLM
from client.verify import SpotCheckStats

VERIFIER_SPANS = ["0:15", "15:30"]  # no hop's span is served exactly twice: checks use chains of sub-spans


class TokenClock(TextStreamer):
    """Times of the generated tokens: the decode window runs from the first to the last."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        super().__init__(tokenizer, skip_prompt=True)
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _decode(model, tokenizer, inputs, new_tokens: int) -> dict:
    """One greedy generation: decode tokens/s (after its first token), the seconds its decode steps spent
    in spot checks (the checks run between a step's result and its return), its output, the checks'
    stats and the route."""
    window = TokenClock(tokenizer)
    length = inputs["input_ids"].shape[1] + new_tokens
    checks: list[tuple[float, float]] = []  # (start, seconds) of each spot check
    with model.inference_session(max_length=length) as session:
        checker = session.spot_checks
        check = checker.check

        async def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return await check(*args, **kwargs)
            finally:
                checks.append((started, time.perf_counter() - started))

        checker.check = timed
        out = model.generate(
            **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, streamer=window
        )
        route = [f"{hop.start}:{hop.end}" for hop in session.route]
    decode = window.times[1:]  # the prompt's put, then one per generated token: from the first token on
    in_window = [seconds for started, seconds in checks if started >= decode[0]]
    return {
        "tokens_per_s": (len(decode) - 1) / (decode[-1] - decode[0]),
        "window_s": decode[-1] - decode[0],
        "check_s": sum(in_window),
        "checked_steps": len(in_window),
        "decode_steps": len(decode) - 1,
        "out": out,
        "stats": checker.stats,
        "route": route,
    }


def spot_check_overhead(
    folder: Path, tokenizer, inputs, spans: list[str], *, new_tokens: int, repeats: int, insecure: bool
) -> dict:
    defaults = ClientConfig()
    options = ["--insecure"] if insecure else []
    with running(folder, [*spans, *VERIFIER_SPANS], *options) as swarm:
        models = {
            name: AutoDistributedModelForCausalLM.from_pretrained(
                folder, initial_peers=swarm.initial_peers, insecure=insecure, **extra
            )
            for name, extra in (("off", {"verify_every": 0}), ("on", {}))
        }
        rates: dict[str, list[float]] = {"off": [], "on": []}
        outputs, totals, route = {}, SpotCheckStats(), []
        window_s = check_s = 0.0
        checked_steps = decode_steps = 0
        try:
            for name in models:  # a first generation each: connections, caches and measured block times
                _decode(models[name], tokenizer, inputs, 8)
            for repeat in range(repeats):
                for name in ("off", "on") if repeat % 2 == 0 else ("on", "off"):
                    run = _decode(models[name], tokenizer, inputs, new_tokens)
                    rates[name].append(run["tokens_per_s"])
                    outputs[name] = run["out"]
                    if name == "on":
                        route = run["route"]
                        window_s += run["window_s"]
                        check_s += run["check_s"]
                        checked_steps += run["checked_steps"]
                        decode_steps += run["decode_steps"]
                        for field in ("checked", "skipped", "mismatches", "unchecked"):
                            setattr(totals, field, getattr(totals, field) + getattr(run["stats"], field))
        finally:
            for model in models.values():
                model.shutdown()
    off, on = statistics.mean(rates["off"]), statistics.mean(rates["on"])
    # the same ratio per adjacent pair cancels the machine's drift between pairs
    pairs = [b / a for a, b in zip(rates["off"], rates["on"], strict=True)]
    return {
        "peers": [*spans, *VERIFIER_SPANS],
        "verify_every": defaults.verify_every,
        "verify_max_gap": defaults.verify_max_gap,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "decode_tokens_per_s": {"off": round(off, 2), "on": round(on, 2)},
        "cost": round(1 - on / off, 4),
        "cost_median_of_pairs": round(1 - statistics.median(pairs), 4),
        "runs_tokens_per_s": {name: [round(r, 2) for r in runs] for name, runs in rates.items()},
        # with checks on: the share of the decode window spent in checks (serial with the steps, so this is
        # the slowdown without the machine's noise), and what one checked step added
        "decode_steps": decode_steps,
        "checked_steps": checked_steps,
        "check_share_of_decode": round(check_s / window_s, 4) if window_s else None,
        "ms_per_check": round(check_s / checked_steps * 1000, 1) if checked_steps else None,
        "ms_per_token_on": round(window_s / decode_steps * 1000, 2) if decode_steps else None,
        "hop_checks": {
            "checked": totals.checked,
            "skipped": totals.skipped,
            "mismatches": totals.mismatches,
            "unchecked": totals.unchecked,
        },
        "same_tokens": bool(torch.equal(outputs["off"], outputs["on"])),
        "tls": not insecure,
        "route": route,
    }
