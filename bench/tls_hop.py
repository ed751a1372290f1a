"""What TLS costs one hop of one decode step: a Push of one token's hidden state (SmolLM2's width, float32)
to a peer's real servicer stack on 127.0.0.1, over plaintext and over TLS with the peer's identity-bound
certificate, alternating, in one process. Prints JSON: median microseconds per call both ways and the
difference. The call is refused by the peer (unknown session) after the whole message is read, so it times
transport and parsing, not compute.

    python bench/tls_hop.py [--calls 2000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import grpc
import torch

from protos import peer_pb2, peer_pb2_grpc, tls
from protos.identity import Identity
from protos.tensors import to_message

HIDDEN = 576  # SmolLM2-135M's hidden size


class _Sink(peer_pb2_grpc.PeerServicer):
    async def Push(self, request, context):
        return peer_pb2.PushReply()


async def _median_us(stub: peer_pb2_grpc.PeerStub, request: peer_pb2.PushRequest, calls: int) -> float:
    for _ in range(50):  # warm up the connection
        await stub.Push(request, timeout=10)
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        await stub.Push(request, timeout=10)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6


async def main(calls: int, rounds: int) -> dict[str, object]:
    server_tls = tls.ServerTls.create(Identity.load_or_create(None))
    server = grpc.aio.server()
    peer_pb2_grpc.add_PeerServicer_to_server(_Sink(), server)
    plain_port = server.add_insecure_port("127.0.0.1:0")
    tls_port = server.add_secure_port("127.0.0.1:0", server_tls.server_credentials())
    await server.start()
    step = peer_pb2.Step(session_id="bench", step_id=1, hidden=to_message(torch.randn(1, 1, HIDDEN)))
    request = peer_pb2.PushRequest(step=step, push_token=b"t" * 16)
    plain = grpc.aio.insecure_channel(f"127.0.0.1:{plain_port}")
    secure = grpc.aio.secure_channel(
        f"127.0.0.1:{tls_port}",
        tls.channel_credentials(server_tls.certificate),
        options=tls.channel_options(),
    )
    results: dict[str, list[float]] = {"plaintext": [], "tls": []}
    for _ in range(rounds):
        results["plaintext"].append(await _median_us(peer_pb2_grpc.PeerStub(plain), request, calls))
        results["tls"].append(await _median_us(peer_pb2_grpc.PeerStub(secure), request, calls))
    await plain.close()
    await secure.close()
    await server.stop(None)
    plain_us, tls_us = statistics.median(results["plaintext"]), statistics.median(results["tls"])
    return {
        "message_bytes": request.ByteSize(),
        "median_us_per_call": {"plaintext": round(plain_us, 1), "tls": round(tls_us, 1)},
        "tls_cost_us_per_hop": round(tls_us - plain_us, 1),
        "ratio": round(tls_us / plain_us, 3),
        "rounds": {name: [round(value, 1) for value in values] for name, values in results.items()},
        "calls_per_round": calls,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=2000, help="timed calls per round and transport")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (the median is kept)")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main(args.calls, args.rounds)), indent=2))
