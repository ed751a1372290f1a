"""Decode and prefill speed through a local 3-peer swarm vs local transformers, on SmolLM2-135M-Instruct.

Prints JSON: median ms per generated token (batch 1, greedy, after a chat prompt) both ways and their
ratio, and the time of a 512-token prefill both ways. Peers run as separate processes on 127.0.0.1.

    python bench/decode.py [--new-tokens 64] [--repeats 3] [--insecure] [--profile] [--peer-option=...]
    python bench/decode.py --spot-checks [--new-tokens 128] [--repeats 10]

Peers and client speak TLS with signed records (the default); `--insecure` runs the same on plaintext gRPC,
so the two runs give what security costs per hop and token. `--profile` adds one more generation through the
swarm, split per token: the client's embeddings and LM head, the rest of its generate loop, and the time in
the swarm; per hop what the peer reports (`Info.step_seconds`: decode, wait, compute, encode, report,
push) and what is left, the transport (gRPC, event loops, wake-ups); CPU time per token of every process.
`--peer-option` passes an option to every peer (e.g. `--peer-option=--quant=int8`); `--wire` picks the
client's wire format (float32, float16, bfloat16, int8).

`--metrics` measures instead what the peers' Prometheus metrics cost: two swarms run side by side, one
plain and one with `--metrics-port` on every peer, scraped every `--scrape-period` seconds (far more often
than Prometheus would); generations alternate between them, and the medians give the decode slowdown. It
also times, in microseconds, the metric updates one step makes on a peer and what the interceptor adds to
a call (loopback, alternating rounds), and gives their sum per token as a share of the token's time: a
bound that the machine's noise does not blur.

`--spot-checks` measures instead what the default spot checks cost: two clients on one swarm with two more
peers whose spans cut across the three (so every hop can be checked, by chains of sub-spans), one with the
default checks and one without, generating in turn; decode tokens/s of each over the whole decode window
and the slowdown (`bench/spot_checks.py`).

`--tiny-llama` runs the same measurement on a random Llama of 8 layers and hidden size 512 (SmolLM2's
tokenizer and vocabulary) over 2 peers of 4 blocks: the layout where Petals measured 1.95x its local
decode. The model is written once into the cache folder (`$COROLLA_CACHE_DIR/models/tiny-llama-8x512`).

`--batch 8 --ragged` times instead a left-padded batch of 8 chat prompts of different lengths in one
`generate()` against the same rows one at a time, through the swarm (tokens/s both ways; `bench/ragged.py`).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import torch
from spot_checks import TokenClock, spot_check_overhead  # bench/ is this script's folder
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase, TextStreamer

from client.local_swarm import LocalSwarm, running
from client.model import AutoDistributedModelForCausalLM
from client.remote_cache import RemoteCache
from peer.metrics import PeerMetrics
from protos import peer_pb2, peer_pb2_grpc
from protos.prepare import prepare_default_model

SPANS = ["0:10", "10:20", "20:30"]
TINY_SPANS = ["0:4", "4:8"]


def _tiny_llama(tokenizer_folder) -> Path:
    """A random Llama of 8 layers, hidden 512 (seeded, so every run builds the same weights), saved once with
    SmolLM2's tokenizer into the cache folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from protos.prepare import default_cache_dir

    folder = default_cache_dir() / "models" / "tiny-llama-8x512"
    if (folder / "config.json").exists():
        return folder
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None  # random weights: decode exactly --new-tokens tokens
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _ms_per_token(model, tokenizer, inputs, new_tokens: int) -> tuple[float, torch.Tensor]:
    clock = TokenClock(tokenizer)
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


class _Profile(TextStreamer):
    """Marks the window of the decode steps (after the first generated token) and snapshots the peers'
    `Info` at its start; sums the client's embedding, LM head and swarm time inside it."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, snapshot) -> None:
        super().__init__(tokenizer, skip_prompt=True)
        self.snapshot, self.puts = snapshot, 0
        self.seconds = {"embed": 0.0, "head": 0.0, "swarm": 0.0}
        self.started = self.ended = 0.0
        self.before: list[peer_pb2.InfoReply] = []
        self.cpu = 0.0

    def put(self, value: torch.Tensor) -> None:
        self.puts += 1
        if self.puts == 2:  # the prompt, then the first token: decode steps follow
            self.before = self.snapshot()
            self.seconds = dict.fromkeys(self.seconds, 0.0)
            self.cpu = time.process_time()
            self.started = time.perf_counter()
        self.ended = time.perf_counter()

    def end(self) -> None:
        pass

    def timed(self, what: str, fn):
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[what] += time.perf_counter() - started

        return wrapper


def _profile(remote, tokenizer, inputs, new_tokens: int) -> dict:
    swarm = remote.swarm

    async def infos() -> list[peer_pb2.InfoReply]:
        view = await swarm.discovery.view(refresh=True)
        replies = []
        for record in sorted(view.peers().values(), key=lambda r: r.start):
            stub = swarm.channels.stub(record.address, record.certificate and record.certificate.encode())
            replies.append(await stub.Info(peer_pb2.InfoRequest(), timeout=10))
        return replies

    def snapshot() -> list[peer_pb2.InfoReply]:
        return swarm.runtime.run(infos())

    profile = _Profile(tokenizer, snapshot)
    embed, head = remote.get_input_embeddings(), remote.get_output_embeddings()
    saved = embed.forward, head.forward, RemoteCache.step
    embed.forward, head.forward = profile.timed("embed", embed.forward), profile.timed("head", head.forward)
    RemoteCache.step = profile.timed("swarm", RemoteCache.step)
    try:
        remote.generate(
            **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, streamer=profile
        )
    finally:
        embed.forward, head.forward, RemoteCache.step = saved
    cpu = time.process_time() - profile.cpu
    after = snapshot()
    steps = new_tokens - 1
    per_token = {k: round(v / steps * 1000, 3) for k, v in profile.seconds.items()}
    total = (profile.ended - profile.started) / steps * 1000
    hops, compute = [], 0.0
    for old, new in zip(profile.before, after, strict=True):
        delta = {k: new.step_seconds[k] - old.step_seconds.get(k, 0.0) for k in new.step_seconds}
        counted = delta.pop("steps")
        hop = {k: round(v / steps * 1000, 3) for k, v in delta.items()}
        hop.update(blocks=f"{new.start}:{new.end}", steps=int(counted))
        hop["cpu_ms"] = round((new.cpu_seconds - old.cpu_seconds) / steps * 1000, 2)
        compute += delta["compute"] / steps * 1000
        hops.append(hop)
    not_compute = per_token["swarm"] - compute
    return {
        "decode_steps": steps,
        "ms_per_token": round(total, 2),
        "client_ms": {
            "embed": per_token["embed"],
            "head": per_token["head"],
            "generate_loop": round(total - per_token["swarm"] - per_token["embed"] - per_token["head"], 3),
            "swarm": per_token["swarm"],
            "cpu": round(cpu / steps * 1000, 2),
        },
        "hops_ms": hops,
        "swarm_compute_ms": round(compute, 3),
        "swarm_not_compute_ms": round(not_compute, 3),
        "not_compute_ms_per_hop": round(not_compute / len(hops), 3),
    }


class _Scraper(threading.Thread):
    """Scrapes every peer's /metrics every `period` seconds until stopped."""

    def __init__(self, swarm: LocalSwarm, period: float) -> None:
        super().__init__(daemon=True)
        self.urls = [f"http://127.0.0.1:{peer.ready()['metrics_port']}/metrics" for peer in swarm.peers]
        self.period, self.scrapes, self.bytes = period, 0, 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.period):
            for url in self.urls:
                with urllib.request.urlopen(url, timeout=10) as reply:
                    self.bytes += len(reply.read())
                self.scrapes += 1


def _update_us(repeats: int = 100_000) -> float:
    """Microseconds of the metric updates of one inference step on a peer (step, batch and push)."""
    metrics, step = PeerMetrics(), peer_pb2.Step(hidden=peer_pb2.Tensor(data=bytes(2304)))
    started = time.perf_counter()
    for _ in range(repeats):
        metrics.step(tokens=1, prompt=False, wait=0.0001, seconds=0.002)
        metrics.batch("step", 1)
        metrics.pushed(step)
    return (time.perf_counter() - started) / repeats * 1e6


class _Info(peer_pb2_grpc.PeerServicer):
    async def Info(self, request, context):
        return peer_pb2.InfoReply(model_id="bench")


async def _call_us(calls: int = 200, rounds: int = 30) -> dict[str, float]:
    """CPU microseconds (client and server together: one process) of a unary call on loopback without and
    with the metrics interceptor: the medians, and the median of the differences of adjacent rounds (which
    cancels the machine's drift)."""
    stubs, servers, channels = {}, [], []
    for name, interceptors in (("off", []), ("on", [PeerMetrics().interceptor])):
        server = grpc.aio.server(interceptors=interceptors)
        peer_pb2_grpc.add_PeerServicer_to_server(_Info(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        servers.append(server)
        channels.append(channel)
        stubs[name] = peer_pb2_grpc.PeerStub(channel)
    times: dict[str, list[float]] = {"off": [], "on": []}
    try:
        for repeat in range(rounds + 1):
            for name in ("off", "on") if repeat % 2 == 0 else ("on", "off"):
                started = time.process_time()
                for _ in range(calls):
                    await stubs[name].Info(peer_pb2.InfoRequest(), timeout=10)
                if repeat:  # the first round warms both
                    times[name].append((time.process_time() - started) / calls * 1e6)
    finally:
        for channel in channels:
            await channel.close()
        for server in servers:
            await server.stop(None)
    differences = [on - off for off, on in zip(times["off"], times["on"], strict=True)]
    return {
        **{name: statistics.median(values) for name, values in times.items()},
        "added": statistics.median(differences),
    }


def _metrics_overhead(folder, tokenizer, inputs, args) -> dict:
    options = ["--insecure"] if args.insecure else []
    on_options = [*options, "--metrics-port", "0"]
    with running(folder, SPANS, *options) as plain, running(folder, SPANS, *on_options) as metered:
        models = {
            name: AutoDistributedModelForCausalLM.from_pretrained(
                folder, initial_peers=swarm.initial_peers, insecure=args.insecure
            )
            for name, swarm in (("off", plain), ("on", metered))
        }
        scraper = _Scraper(metered, args.scrape_period)
        scraper.start()
        times: dict[str, list[float]] = {"off": [], "on": []}
        outputs = {}
        try:
            for name in models:  # a first generation each: connections, caches and JIT warm
                _ms_per_token(models[name], tokenizer, inputs, 8)
            for repeat in range(args.repeats):
                for name in ("off", "on") if repeat % 2 == 0 else ("on", "off"):
                    ms, outputs[name] = _ms_per_token(models[name], tokenizer, inputs, args.new_tokens)
                    times[name].append(ms)
        finally:
            scraper.done.set()
            scraper.join()
            for model in models.values():
                model.shutdown()
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    per_step_us = _update_us()
    call_us = asyncio.run(_call_us())
    interceptor_us = call_us["added"]
    # per token: each peer updates its step metrics; each hop but the first takes one Push call
    bound_us = per_step_us * len(SPANS) + max(interceptor_us, 0.0) * (len(SPANS) - 1)
    return {
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "decode_ms_per_token": {"off": round(off, 2), "on": round(on, 2)},
        "decode_tokens_per_s": {"off": round(1000 / off, 2), "on": round(1000 / on, 2)},
        "slowdown": round(on / off - 1, 4),
        "runs_ms": {name: [round(ms, 2) for ms in runs] for name, runs in times.items()},
        "scrapes": scraper.scrapes,
        "scrape_period_s": args.scrape_period,
        "bytes_per_scrape": scraper.bytes // max(scraper.scrapes, 1),
        "updates_us_per_step_per_peer": round(per_step_us, 2),
        "call_us": {name: round(us, 1) for name, us in call_us.items()},
        "interceptor_us_per_call": round(interceptor_us, 1),
        "cost_us_per_token": round(bound_us, 1),
        "cost_share_of_a_token": round(bound_us / (off * 1000), 5),
        "same_tokens": bool(torch.equal(outputs["off"], outputs["on"])),
        "tls": not args.insecure,
    }


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
    parser.add_argument("--profile", action="store_true", help="split a token's time per stage and hop")
    parser.add_argument(
        "--peer-option", action="append", default=[], help="an option for every peer (repeatable)"
    )
    parser.add_argument("--wire", default=None, help="the client's wire format (default: the peers' dtype)")
    parser.add_argument(
        "--quant", default="any", help="which peers' weights the client accepts (default: any)"
    )
    parser.add_argument(
        "--metrics", action="store_true", help="measure the cost of the peers' metrics instead (see above)"
    )
    parser.add_argument(
        "--scrape-period", type=float, default=1.0, help="with --metrics: seconds between scrapes"
    )
    parser.add_argument(
        "--spot-checks",
        action="store_true",
        help="measure the cost of the default spot checks instead, alternating with checks off (see above)",
    )
    parser.add_argument("--batch", type=int, default=8, help="with --ragged: prompts in the batch")
    parser.add_argument(
        "--ragged",
        action="store_true",
        help="instead: a left-padded batch of --batch prompts of different lengths in one generate() vs the "
        "same rows one at a time, through the swarm (bench/ragged.py)",
    )
    parser.add_argument(
        "--tiny-llama",
        action="store_true",
        help="a random Llama (8 layers, hidden 512) over 2 peers instead of SmolLM2 over 3 (see above)",
    )
    args = parser.parse_args()
    folder = prepare_default_model()
    spans = SPANS
    if args.tiny_llama:
        folder, spans = _tiny_llama(folder), TINY_SPANS
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if args.ragged:
        from ragged import ragged_batch  # bench/ is this script's folder

        result = ragged_batch(
            folder, tokenizer, SPANS, batch=args.batch, new_tokens=args.new_tokens, repeats=args.repeats
        )
        print(json.dumps({"model": str(folder), "peers": SPANS, **result}, indent=2))
        return
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Write a short story about a lighthouse keeper."}],
        add_generation_prompt=True,
        tokenize=False,
    )
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    if args.spot_checks:
        result = spot_check_overhead(
            folder,
            tokenizer,
            inputs,
            SPANS,
            new_tokens=args.new_tokens,
            repeats=args.repeats,
            insecure=args.insecure,
        )
        print(json.dumps({"model": str(folder), **result}, indent=2))
        return
    if args.metrics:
        print(
            json.dumps(
                {"model": str(folder), "peers": SPANS, **_metrics_overhead(folder, tokenizer, inputs, args)},
                indent=2,
            )
        )
        return

    local = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    local_ms, local_out, local_prefill = [], None, []
    for _ in range(args.repeats):
        ms, local_out = _ms_per_token(local, tokenizer, inputs, args.new_tokens)
        local_ms.append(ms)
        local_prefill.append(_prefill_ms(local, args.prefill))
    del local

    peer_options = [*(["--insecure"] if args.insecure else []), *args.peer_option]
    profile = None
    with running(folder, spans, *peer_options) as swarm:
        remote = AutoDistributedModelForCausalLM.from_pretrained(
            folder,
            initial_peers=swarm.initial_peers,
            insecure=args.insecure,
            wire_dtype=args.wire,
            quant=args.quant,
        )
        swarm_ms, swarm_out, swarm_prefill = [], None, []
        for _ in range(args.repeats):
            ms, swarm_out = _ms_per_token(remote, tokenizer, inputs, args.new_tokens)
            swarm_ms.append(ms)
            swarm_prefill.append(_prefill_ms(remote, args.prefill))
        if args.profile:
            profile = _profile(remote, tokenizer, inputs, args.new_tokens)
        remote.shutdown()

    decode_swarm, decode_local = statistics.median(swarm_ms), statistics.median(local_ms)
    prefill_swarm, prefill_local = statistics.median(swarm_prefill), statistics.median(local_prefill)
    print(
        json.dumps(
            {
                "model": str(folder),
                "peers": spans,
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
                "peer_options": args.peer_option,
                "wire": args.wire or "float32",
                "repeats": args.repeats,
                **({"profile": profile} if profile is not None else {}),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
