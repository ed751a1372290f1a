"""A stranger against real peer processes: push floods, hop-list amplification, SIGTERM under a push
backlog. The peer stays bounded in memory and time, and exact for a well-behaved client."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator

import grpc
import psutil
import pytest
import torch
from swarm import Process, channel, push_flood, running, start_peer
from test_peer import Stream, _read_records, _result, stub

from peer.blocks import HostedSpan
from protos import peer_pb2, peer_pb2_grpc
from protos.records import PeerState
from protos.tensors import to_message

pytestmark = pytest.mark.swarm  # real DHT and peer processes

HIDDEN = 64
MAX_MESSAGE = 8 << 20
PENDING = 4
OPTIONS = [
    "--model-id",
    "llama",  # the id the records are read under
    "--max-message-bytes",
    str(MAX_MESSAGE),
    "--max-pending-pushes",
    str(PENDING),
    "--max-concurrent-rpcs",
    "8",
]
OPTIONS += [
    "--max-length",
    "128",
    "--max-cache-tokens",
    "1024",
    "--throughput",
    "100",
    "--announce-period",
    "2",
]
MiB = 2**20


@pytest.fixture(scope="module")
def swarm(checkpoint, tmp_path_factory) -> Iterator[dict[str, Process]]:
    logs = tmp_path_factory.mktemp("hostile-logs")
    with running(logs, checkpoint("llama"), ["0:4"], *OPTIONS) as swarm:
        yield {"dht": swarm.dht, "peer": swarm.peers[0]}


def _rss(process: Process) -> int:
    return psutil.Process(process.popen.pid).memory_info().rss


def _hidden(seq: int, seed: int) -> torch.Tensor:
    return torch.randn(1, seq, HIDDEN, generator=torch.Generator().manual_seed(seed))


async def _flood(peer: Process, request: peer_pb2.PushRequest, count: int) -> list[grpc.StatusCode]:
    return await push_flood(peer, request, count, options=[("grpc.max_send_message_length", 2 * MAX_MESSAGE)])


def test_push_flood_into_ones_own_session_stays_bounded(swarm, checkpoint) -> None:
    peer = swarm["peer"]
    token = os.urandom(16)
    flooder = Stream(peer)
    assert flooder.open("flooder", push_token=token).WhichOneof("kind") == "opened"
    # 4 MiB each: a step of 16384 positions, beyond the session's max_length: refused from its claimed shape
    # before it is queued or decoded (INVALID_ARGUMENT), or over the push budget; the peer must never hold
    # more than a few at once
    big = peer_pb2.Step(
        session_id="flooder", step_id=1, position=0, hidden=to_message(_hidden(4 * MiB // 256, 0))
    )
    request = peer_pb2.PushRequest(step=big, push_token=token)
    assert request.ByteSize() > 4 * MiB
    before = _rss(peer)
    codes = asyncio.run(_flood(peer, request, 200))
    grown = _rss(peer) - before
    print(f"push flood: peer RSS grew by {grown / MiB:.0f} MiB")
    allowed = {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT}
    assert set(codes) <= allowed, set(codes)
    # unbounded, 200 accepted pushes would hold over 800 MiB; bounded, runs measured 56-114 MiB of growth
    # (gRPC buffers and the allocator's arenas vary from run to run)
    assert grown < 200 * MiB, f"peer RSS grew by {grown / MiB:.0f} MiB"
    # another client is served exactly meanwhile
    span = HostedSpan.load(checkpoint("llama"), 0, 4)
    other = Stream(peer)
    assert other.open("bystander").WhichOneof("kind") == "opened"
    hidden = _hidden(5, 1)
    torch.testing.assert_close(_result(other.step(0, 0, hidden)), span.forward(hidden, span.new_cache()))
    other.close()
    flooder.close()
    assert peer.popen.poll() is None


def test_open_with_a_million_hops_is_refused(swarm) -> None:
    peer = swarm["peer"]
    request = peer_pb2.SessionRequest(
        open=peer_pb2.OpenSession(
            session_id="amplified",
            start=0,
            end=2,
            batch_size=1,
            max_length=16,
            next_hops=[peer_pb2.Hop()] * 10**6,
        )
    )
    before = _rss(peer)
    with pytest.raises(grpc.RpcError) as caught:
        list(stub(peer).Session(iter([request]), timeout=30))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "more next hops than blocks" in caught.value.details()
    assert _rss(peer) - before < 100 * MiB


def test_sigterm_with_queued_pushes_exits_in_time_and_offline(swarm, checkpoint, tmp_path) -> None:
    drain = 2.0
    extra = start_peer(
        tmp_path,
        checkpoint("llama"),
        "2:4",
        swarm["dht"].maddrs,
        *OPTIONS,
        "--max-pending-pushes",
        "100",
        # the 100 pushes come at once from one client: room for them all under the call guard's caps
        "--max-concurrent-rpcs",
        "128",
        "--max-client-calls",
        "128",
        "--drain-timeout",
        str(drain),
        name="draining",
    )
    token = os.urandom(16)
    victim = Stream(extra)
    assert victim.open("queued", start=2, end=4, push_token=token).WhichOneof("kind") == "opened"
    steps = [
        peer_pb2.PushRequest(
            step=peer_pb2.Step(session_id="queued", step_id=n, position=0, hidden=to_message(_hidden(64, n))),
            push_token=token,
        )
        for n in range(100)
    ]

    async def push_all() -> list[grpc.StatusCode]:
        async with channel(extra, aio=True) as opened:
            push = peer_pb2_grpc.PeerStub(opened).Push
            results = await asyncio.gather(
                *(push(step, timeout=30) for step in steps), return_exceptions=True
            )
            return [r.code() if isinstance(r, grpc.aio.AioRpcError) else grpc.StatusCode.OK for r in results]

    codes = asyncio.run(push_all())
    assert codes.count(grpc.StatusCode.OK) >= 50  # most are queued behind each other when SIGTERM comes
    started = time.monotonic()
    assert extra.stop(timeout=60) == 0
    assert time.monotonic() - started < drain + 5
    after = _read_records(swarm["dht"].maddrs, "llama", 4)[2].get(extra.peer_id)
    assert after is not None and after.state is PeerState.OFFLINE
    victim.close()
