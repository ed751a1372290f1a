"""Quotas and the compute queue against a real peer process: one client opening sessions until refused
reaches only its own quota while a client on another address still opens; a decode step sent while a
16k-token Backward computes (and another waits) comes back within the step's timeout."""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator

import grpc
import pytest
import torch
from swarm import Process as LocalProcess
from swarm import channel, running

from protos import peer_pb2, peer_pb2_grpc
from protos.tensors import to_message

pytestmark = pytest.mark.swarm

HIDDEN = 64  # the tiny Llama's width
CLIENT_SESSIONS = 4
STEP_TIMEOUT = 10.0  # seconds the decoding client waits for each step (sent as the step's timeout_ms)
# listening on every address (inside the tests' network namespace: loopback only), announced on 127.0.0.1,
# so one client can come from 127.0.0.1 and another from ::1
OPTIONS = ["--host", "::", "--announce-host", "127.0.0.1", "--max-client-sessions", str(CLIENT_SESSIONS)]
OPTIONS += [
    "--max-sessions",
    "32",
    "--max-length",
    "64",
    "--max-cache-tokens",
    "65536",
    "--throughput",
    "100",
]
OPTIONS += ["--max-forward-tokens", "16384", "--max-message-bytes", str(64 * 2**20)]


@pytest.fixture(scope="module")
def peer(checkpoint, tmp_path_factory) -> Iterator[LocalProcess]:
    logs = tmp_path_factory.mktemp("quota-logs")
    with running(logs, checkpoint("llama"), ["0:4"], *OPTIONS) as swarm:
        yield swarm.peers[0]


def _stub(peer: LocalProcess, address: str) -> peer_pb2_grpc.PeerStub:
    options = [("grpc.max_send_message_length", 64 * 2**20), ("grpc.max_receive_message_length", 64 * 2**20)]
    return peer_pb2_grpc.PeerStub(channel(peer, address=address, options=options))


def _port(process: LocalProcess) -> str:
    ready = process.ready()
    assert ready is not None
    return str(ready["address"]).rsplit(":", 1)[1]


class Stream:
    """A raw Session stream fed one request at a time; its session lives while the stream is open."""

    def __init__(self, stub: peer_pb2_grpc.PeerStub) -> None:
        self._requests: queue.Queue = queue.Queue()
        self._replies = stub.Session(iter(self._requests.get, None), timeout=120)

    def send(self, **kind) -> peer_pb2.SessionReply | grpc.StatusCode:
        self._requests.put(peer_pb2.SessionRequest(**kind))
        try:
            return next(self._replies)
        except grpc.RpcError as e:
            return e.code()

    def open(self, session_id: str) -> str:
        opening = peer_pb2.OpenSession(session_id=session_id, start=0, end=4, batch_size=1, max_length=64)
        reply = self.send(open=opening)
        return reply.name if isinstance(reply, grpc.StatusCode) else reply.WhichOneof("kind")

    def close(self) -> None:
        self._requests.put(None)


def _hidden(batch: int, seq: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, seq, HIDDEN, generator=torch.Generator().manual_seed(seed))


def test_a_client_reaches_only_its_quota_and_another_still_opens(peer: LocalProcess) -> None:
    port = _port(peer)
    mine = [Stream(_stub(peer, f"127.0.0.1:{port}")) for _ in range(CLIENT_SESSIONS + 2)]
    theirs = Stream(_stub(peer, f"[::1]:{port}"))
    try:
        outcomes = [stream.open(f"mine-{index}") for index, stream in enumerate(mine)]
        assert outcomes == ["opened"] * CLIENT_SESSIONS + ["RESOURCE_EXHAUSTED"] * 2
        assert theirs.open("theirs") == "opened"
        info = _stub(peer, f"127.0.0.1:{port}").Info(peer_pb2.InfoRequest(), timeout=10)
        assert info.num_sessions == CLIENT_SESSIONS + 1
    finally:
        for stream in [*mine, theirs]:
            stream.close()


def test_a_decode_step_behind_a_16k_token_backward_returns_in_time(peer: LocalProcess) -> None:
    port = _port(peer)
    stub = _stub(peer, f"127.0.0.1:{port}")
    request = peer_pb2.BackwardRequest(
        start=0, end=4, hidden=to_message(_hidden(16, 1024, 0)), grad_output=to_message(_hidden(16, 1024, 1))
    )
    started = time.monotonic()
    backwards = [stub.Backward.future(request, timeout=300) for _ in range(2)]
    time.sleep(0.5)  # the first is computing, the second queued
    stream = Stream(stub)
    latencies: list[float] = []
    try:
        assert stream.open("decode") == "opened"
        for position in range(8):
            step = peer_pb2.Step(
                step_id=position,
                position=position,
                hidden=to_message(_hidden(1, 1, 10 + position)),
                timeout_ms=int(STEP_TIMEOUT * 1000),
            )
            sent = time.monotonic()
            reply = stream.send(step=step)
            latencies.append(time.monotonic() - sent)
            assert isinstance(reply, peer_pb2.SessionReply) and reply.WhichOneof("kind") == "result", reply
            assert list(reply.result.hidden.shape) == [1, 1, HIDDEN]
    finally:
        stream.close()
    for future in backwards:
        assert future.result().HasField("grad_input")
    backward_seconds = time.monotonic() - started
    print(f"decode step seconds={[round(t, 3) for t in latencies]} backwards seconds={backward_seconds:.2f}")
    assert max(latencies) < STEP_TIMEOUT, (latencies, backward_seconds)


def test_a_second_client_is_not_slowed_by_a_quota_refusal(peer: LocalProcess) -> None:
    """After the refusals above, the peer still serves a well-behaved client exactly."""
    port = _port(peer)
    stream = Stream(_stub(peer, f"127.0.0.1:{port}"))
    try:
        assert stream.open("after") == "opened"
        step = peer_pb2.Step(step_id=0, position=0, hidden=to_message(_hidden(1, 3, 5)))
        reply = stream.send(step=step)
        assert isinstance(reply, peer_pb2.SessionReply) and reply.WhichOneof("kind") == "result"
    finally:
        stream.close()
