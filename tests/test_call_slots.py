"""A stranger against the call slots and the receive buffers of real peer processes on 127.0.0.1.

Headers-only calls (HTTP/2 streams that send request headers and never a message, `headers_only`) over 11
connections x 100 streams, more than the 1024 call slots, renewed as the peer ends them: a private
swarm's peer refuses each at once (the stranger has no swarm token), a public one admits at most a
client's share of them and ends each within --request-timeout; either way a member's `Info` answers
within a second the whole time. The public stranger calls from 127.0.0.2, the member from 127.0.0.1:
two clients, as two hosts would be. Then 200 concurrent 4 MiB pushes without a valid token over one
plaintext connection: received a few at a time, and freed as soon as they are refused, they leave the
peer's peak RSS well under +100 MiB (+18 to +42 MiB measured; +535 MiB before, when gRPC read a hundred at
once and each refused one waited for the garbage collector), and a generation still equals transformers'."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import psutil
import pytest
import torch
from families import HIDDEN, VOCAB, without_eos
from headers_only import Flood, flood
from swarm import LocalSwarm, Process, certificate, channel, push_flood, running

from client import AutoDistributedModelForCausalLM
from protos import peer_pb2, peer_pb2_grpc
from protos.swarm_key import METADATA_KEY, SwarmKey
from protos.tensors import to_message

pytestmark = [pytest.mark.swarm, pytest.mark.timeout(300)]

MODEL_ID = "slots"
REQUEST_TIMEOUT = 3.0  # the peers' --request-timeout: a call that sends no request ends after it
NUM_CONNECTIONS, CALLS_PER_CONNECTION = (
    11,
    100,
)  # 1100 calls: more than the 1024 slots (--max-concurrent-rpcs)
FLOOD_SECONDS = 3 * REQUEST_TIMEOUT  # how long the stranger keeps its calls open
INFO_TIMEOUT = 1.0
STRANGER = "127.0.0.2"  # loopback too, but another client than the member's 127.0.0.1
PUSH, INFO = "/corolla.peer.v1.Peer/Push", "/corolla.peer.v1.Peer/Info"
OPTIONS = ("--model-id", MODEL_ID, "--throughput", "100", "--request-timeout", str(REQUEST_TIMEOUT))
MiB = 2**20
PUSH_BYTES = 4 * MiB
NUM_PUSHES = 200
MAX_RSS_GROWTH = 100 * MiB
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def swarm_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("slots-key") / "swarm.key"
    SwarmKey.create(path)
    return path


@pytest.fixture(scope="module")
def private(checkpoint, tmp_path_factory, swarm_key) -> Iterator[LocalSwarm]:
    key = ("--swarm-key", str(swarm_key))
    with running(
        tmp_path_factory.mktemp("slots-private"),
        checkpoint("llama"),
        ["0:4"],
        *OPTIONS,
        *key,
        dht_options=key,
    ) as swarm:
        yield swarm


@pytest.fixture(scope="module")
def public(checkpoint, tmp_path_factory) -> Iterator[LocalSwarm]:
    """A public swarm's plaintext peer (--insecure), as the push flood's measurement was made against."""
    with running(
        tmp_path_factory.mktemp("slots-public"), checkpoint("llama"), ["0:4"], *OPTIONS, "--insecure"
    ) as swarm:
        yield swarm


async def _info_seconds(peer: Process, metadata: tuple[tuple[str, str], ...]) -> float:
    """Seconds a member's `Info` took; any error fails the test (RESOURCE_EXHAUSTED: no slot left)."""
    async with channel(peer, aio=True) as opened:
        started = time.monotonic()
        reply = await peer_pb2_grpc.PeerStub(opened).Info(
            peer_pb2.InfoRequest(), metadata=metadata, timeout=INFO_TIMEOUT
        )
        assert reply.model_id == MODEL_ID
        return time.monotonic() - started


async def _hold(stranger: Flood, peer: Process, metadata: tuple[tuple[str, str], ...]) -> list[float]:
    """Keeps the stranger's calls open for FLOOD_SECONDS while a member calls `Info` twice a second."""
    seconds = []
    deadline = time.monotonic() + FLOOD_SECONDS
    while time.monotonic() < deadline:
        await stranger.refill()
        await asyncio.sleep(0.5)  # the peer takes the new streams meanwhile
        seconds.append(await _info_seconds(peer, metadata))
    return seconds


def test_a_private_peer_refuses_headers_only_calls_at_once(private, swarm_key) -> None:
    peer = private.peers[0]
    member = ((METADATA_KEY, SwarmKey.load(swarm_key).grpc_token(certificate(peer))),)

    async def scenario() -> tuple[list[float], int, float]:
        async with flood(
            peer.address,
            PUSH,
            num_connections=NUM_CONNECTIONS,
            calls_per_connection=CALLS_PER_CONNECTION,
            tls=True,
        ) as stranger:
            seconds = await _hold(stranger, peer, member)
            return seconds, stranger.ended, stranger.longest_held()

    seconds, ended, longest = asyncio.run(scenario())
    assert max(seconds) < INFO_TIMEOUT
    assert ended >= NUM_CONNECTIONS * CALLS_PER_CONNECTION
    assert longest < REQUEST_TIMEOUT  # refused on sight: no call waited for the deadline
    assert "grpc call refused: no valid swarm token" in peer.text()


def test_a_public_peer_ends_a_strangers_headers_only_calls(public) -> None:
    peer = public.peers[0]

    async def scenario(method: str) -> tuple[list[float], int, float]:
        async with flood(
            peer.address,
            method,
            num_connections=NUM_CONNECTIONS,
            calls_per_connection=CALLS_PER_CONNECTION,
            source=STRANGER,
        ) as stranger:
            seconds = await _hold(stranger, peer, ())
            return seconds, stranger.open_streams, stranger.longest_held()

    # Push: the peer waits for requests that never come, a turn at a time, until the deadline
    seconds, still_open, longest = asyncio.run(scenario(PUSH))
    assert max(seconds) < INFO_TIMEOUT
    assert still_open <= 1024 // 4  # a client's share of the slots (--max-client-calls): the rest refused
    assert longest < REQUEST_TIMEOUT + 2.0  # each call ended by the deadline (with slack for a busy CPU)
    assert "call refused: too many calls from one client client=ipv4:127.0.0.2" in peer.text()
    assert "request not received in time" in peer.text()
    # Info: answered without reading the request; this stranger reads no reply either (it never opens its
    # HTTP/2 window), so the peer cannot finish those calls: they stay within the client's share
    seconds, still_open, _ = asyncio.run(scenario(INFO))
    assert max(seconds) < INFO_TIMEOUT
    assert still_open <= 1024 // 4


def _peak_rss_growth(pid: int, action: Callable[[], object]) -> int:
    """How far above its resident memory before `action` the process `pid` peaked while it ran: the
    kernel's high-water mark, reset first (`clear_refs`); sampled every few milliseconds if not allowed."""
    process = psutil.Process(pid)
    before = process.memory_info().rss
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        peak = [before]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.002):
                with contextlib.suppress(psutil.Error):
                    peak[0] = max(peak[0], process.memory_info().rss)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            action()
        finally:
            done.set()
            sampler.join(5)
        return peak[0] - before
    action()
    status = Path(f"/proc/{pid}/status").read_text()
    peak_kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
    return peak_kib * 1024 - before


async def _bad_token_pushes(peer: Process) -> list[grpc.StatusCode]:
    hidden = to_message(torch.randn(1, PUSH_BYTES // (4 * HIDDEN), HIDDEN))
    request = peer_pb2.PushRequest(
        step=peer_pb2.Step(session_id="someone", hidden=hidden), push_token=os.urandom(16)
    )
    assert request.ByteSize() >= PUSH_BYTES
    return await push_flood(peer, request, NUM_PUSHES)


def test_pushes_without_a_token_are_received_a_few_at_a_time(public, local, checkpoint) -> None:
    peer = public.peers[0]
    codes: list[grpc.StatusCode] = []
    grown = _peak_rss_growth(peer.popen.pid, lambda: codes.extend(asyncio.run(_bad_token_pushes(peer))))
    print(f"{NUM_PUSHES} x {PUSH_BYTES // MiB} MiB pushes without a token: peak RSS +{grown / MiB:.0f} MiB")
    # every one refused: PERMISSION_DENIED (read, then no such session or a wrong token), RESOURCE_EXHAUSTED
    # (no turn to be received within the deadline), or UNAVAILABLE (HTTP/2 REFUSED_STREAM: the client opened
    # a stream while the server still counted an ended one against the connection's 100)
    refused = {
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.UNAVAILABLE,
    }
    assert set(codes) <= refused, set(codes)
    assert codes.count(grpc.StatusCode.PERMISSION_DENIED) >= NUM_PUSHES // 2  # most of them were read
    assert grown < MAX_RSS_GROWTH, f"peak RSS grew by {grown / MiB:.0f} MiB"
    model = without_eos(
        AutoDistributedModelForCausalLM.from_pretrained(
            checkpoint("llama"), initial_peers=public.initial_peers, model_id=MODEL_ID, insecure=True
        )
    )
    try:
        prompt = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(7))
        mask = torch.ones_like(prompt)
        options = dict(
            attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False
        )
        assert torch.equal(model.generate(prompt, **options), local.generate(prompt, **options))
    finally:
        model.shutdown()
