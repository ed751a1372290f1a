"""Decode through peers that push over one persistent stream per next peer (the default) vs a unary Push call
per step (`--no-push-stream`), on SmolLM2-135M-Instruct over 3 local peers (or `--tiny-llama` over 2).

Prints JSON: median ms per generated token (batch 1, greedy) through each swarm, generations alternating
between the two swarms so the machine's load hits both alike, their ratio, whether both gave local
transformers' tokens; with `--profile`, one more generation through each split per hop (`bench/decode.py
--profile`: what each peer reports per stage, the transport's share as non-compute per hop).

    python bench/push_stream.py [--new-tokens 64] [--repeats 5] [--insecure] [--profile] [--tiny-llama]
    python bench/push_stream.py --transport [--pushes 500] [--repeats 5]

`--transport` measures instead the transport alone, in one process on plaintext loopback: a decode step's
push (SmolLM2's hidden size, one position) from `PushStreams` or a unary Push call to a receiver that only
notes its arrival; per push, the wall time until it arrived and the process's CPU time (both ends, the
unary call's answer included), rounds alternating between the two.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import time

import grpc
import torch
from decode import SPANS, TINY_SPANS, _ms_per_token, _profile, _tiny_llama  # bench/ is this script's folder
from transformers import AutoModelForCausalLM, AutoTokenizer

from client.local_swarm import running
from client.model import AutoDistributedModelForCausalLM
from peer.push_streams import PushStreams
from protos import peer_pb2, peer_pb2_grpc
from protos.channels import ChannelPool
from protos.prepare import prepare_default_model
from protos.tensors import to_message

MODES = {"stream": ("--push-stream",), "unary": ("--no-push-stream",)}


class _Sink(peer_pb2_grpc.PeerServicer):
    """Takes pushes, unary or streamed, and only notes that each arrived."""

    def __init__(self) -> None:
        self.arrived = asyncio.Event()

    async def Push(self, request, context):
        self.arrived.set()
        return peer_pb2.PushReply()

    async def PushStream(self, frames, context):
        async for _ in frames:
            self.arrived.set()
        return
        yield  # an async generator that answers nothing


async def _transport(pushes: int, repeats: int, hidden_size: int = 576) -> dict:
    sink, server = _Sink(), grpc.aio.server()
    peer_pb2_grpc.add_PeerServicer_to_server(sink, server)
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    await server.start()
    channels = ChannelPool(max_message_bytes=2**26, insecure=True)
    streams = PushStreams(channels, max_queued=64, step_timeout=15.0, period=3600.0)
    hop = peer_pb2.Hop(peer_id="sink", address=address, session_id="s")
    step = peer_pb2.Step(session_id="s", hidden=to_message(torch.randn(1, 1, hidden_size)))
    frame = peer_pb2.PushRequest(step=step, push_token=b"t" * 16)
    stub = channels.stub(address)
    answers: list[asyncio.Task] = []

    def failed(code: grpc.StatusCode, message: str) -> None:
        raise RuntimeError(f"push failed: {message}")

    async def unary() -> None:
        answers.append(asyncio.ensure_future(stub.Push(frame, timeout=15.0)))  # awaited as the peer does

    async def stream() -> None:
        streams.push(hop, frame, failed)

    measured: dict[str, dict[str, list[float]]] = {
        m: {"wall_us": [], "cpu_us": []} for m in ("stream", "unary")
    }
    try:
        for round_ in range(repeats + 1):  # the first round warms both up
            for mode, send in (("stream", stream), ("unary", unary)):
                wall, cpu = time.perf_counter(), time.process_time()
                for _ in range(pushes):
                    sink.arrived.clear()
                    await send()
                    await sink.arrived.wait()
                await asyncio.gather(*answers)
                answers.clear()
                if round_:
                    measured[mode]["wall_us"].append((time.perf_counter() - wall) / pushes * 1e6)
                    measured[mode]["cpu_us"].append((time.process_time() - cpu) / pushes * 1e6)
    finally:
        await streams.close(timeout=5.0)
        await channels.close()
        await server.stop(None)
    return {
        mode: {name: round(statistics.median(values), 1) for name, values in figures.items()}
        for mode, figures in measured.items()
    } | {"pushes_per_round": pushes, "rounds": repeats, "hidden_size": hidden_size}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--new-tokens", type=int, default=64, help="generated tokens per run")
    parser.add_argument("--repeats", type=int, default=5, help="runs per swarm (the median is kept)")
    parser.add_argument("--insecure", action="store_true", help="plaintext gRPC (default: TLS)")
    parser.add_argument("--profile", action="store_true", help="split a token's time per hop, both ways")
    parser.add_argument("--tiny-llama", action="store_true", help="a random Llama 8x512 over 2 peers")
    parser.add_argument("--peer-option", action="append", default=[], help="an option for every peer")
    parser.add_argument("--transport", action="store_true", help="time the transport alone (see above)")
    parser.add_argument("--pushes", type=int, default=500, help="with --transport: pushes per round")
    args = parser.parse_args()
    if args.transport:
        print(json.dumps(asyncio.run(_transport(args.pushes, args.repeats)), indent=2))
        return
    folder, spans = prepare_default_model(), SPANS
    if args.tiny_llama:
        folder, spans = _tiny_llama(folder), TINY_SPANS
    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Write a short story about a lighthouse keeper."}],
        add_generation_prompt=True,
        tokenize=False,
    )
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    local = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    local_ms, local_out = _ms_per_token(local, tokenizer, inputs, args.new_tokens)
    del local

    common = [*(["--insecure"] if args.insecure else []), *args.peer_option]
    ms: dict[str, list[float]] = {mode: [] for mode in MODES}
    same: dict[str, bool] = dict.fromkeys(MODES, True)
    profiles: dict[str, dict] = {}
    with contextlib.ExitStack() as stack:
        models = {}
        for mode, options in MODES.items():
            swarm = stack.enter_context(running(folder, spans, *common, *options))
            model = AutoDistributedModelForCausalLM.from_pretrained(
                folder, initial_peers=swarm.initial_peers, insecure=args.insecure
            )
            stack.callback(model.shutdown)
            models[mode] = model
            _ms_per_token(model, tokenizer, inputs, 4)  # warm: routes, channels, streams
        for _ in range(args.repeats):
            for mode, model in models.items():
                took, out = _ms_per_token(model, tokenizer, inputs, args.new_tokens)
                ms[mode].append(took)
                same[mode] = same[mode] and bool(torch.equal(out, local_out))
        if args.profile:
            for mode, model in models.items():
                profiles[mode] = _profile(model, tokenizer, inputs, args.new_tokens)

    median = {mode: round(statistics.median(values), 2) for mode, values in ms.items()}
    print(
        json.dumps(
            {
                "model": str(folder),
                "peers": spans,
                "new_tokens": args.new_tokens,
                "repeats": args.repeats,
                "tls": not args.insecure,
                "decode_ms_per_token": {**median, "local": round(local_ms, 2)},
                "runs_ms": {mode: [round(v, 2) for v in values] for mode, values in ms.items()},
                "stream_over_unary": round(median["stream"] / median["unary"], 3),
                "ratio_to_local": {mode: round(value / local_ms, 3) for mode, value in median.items()},
                "same_tokens": same,
                **({"profile": profiles} if profiles else {}),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
