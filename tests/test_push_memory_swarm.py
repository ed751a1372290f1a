"""Pushed steps cannot pile up in a real peer process's memory (security review 3, H1).

Topology: one peer process (the tiny Llama, blocks 0:4) listening on every loopback address; an attacker on
127.0.0.1 and an honest client on ::1 dial it directly. The attacker opens 8 sessions that take pushes,
stops reading their streams (each stalls on its full reply queue, holding its session's lock), then pushes
4 MiB steps of a valid shape to all of them, 4 each (the per-session count). The peer's resident memory
must stay under +100 MiB (on code without a byte budget all 32 pushes wait: about +160 MiB), the pushes
past the budget are refused with RESOURCE_EXHAUSTED, and the honest client's session still steps and takes
pushes meanwhile. The peer runs with the default limits.
"""

from __future__ import annotations

import os
import queue
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from swarm import Process as LocalProcess
from swarm import channel, running

from protos import peer_pb2, peer_pb2_grpc
from protos.tensors import to_message

pytestmark = pytest.mark.swarm

HIDDEN = 64  # the tiny Llama's width
NUM_SESSIONS = 8
BATCH = 16
STALL_STEPS = 64  # steps sent on each attacker stream that is never read: far more than fit in its buffers
STALL_POSITIONS = 16  # positions of each such step: [16, 16, 64] float32, 64 KiB of output
PUSH_POSITIONS = 1024  # [16, 1024, 64] float32: 4 MiB, a shape the session accepts (max_length 8192)
MAX_RSS_GROWTH = 100 * 2**20
# default limits but a stall timeout longer than the test, so every session stays stalled while the memory
# is measured
OPTIONS = [
    "--host",
    "::",
    "--announce-host",
    "127.0.0.1",
    "--throughput",
    "100",
    "--stalled-stream-timeout",
    "120",
]
MESSAGE_OPTIONS = [
    ("grpc.max_send_message_length", 64 * 2**20),
    ("grpc.max_receive_message_length", 64 * 2**20),
]
# the attacker keeps its receive window at 64 KiB (no bandwidth probing), so its streams stall after a few
# replies and what the peer holds is its own doing, not the kernel's socket buffers
ATTACKER_OPTIONS = [*MESSAGE_OPTIONS, ("grpc.http2.bdp_probe", 0)]


@pytest.fixture(scope="module")
def peer(checkpoint, tmp_path_factory) -> Iterator[LocalProcess]:
    logs = tmp_path_factory.mktemp("push-memory-logs")
    with running(logs, checkpoint("llama"), ["0:4"], *OPTIONS) as swarm:
        yield swarm.peers[0]


def _memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of process `pid`, in bytes."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0]) * 1024
    return fields


def _stalled(stub: peer_pb2_grpc.PeerStub, *, sent: int, timeout: float = 120.0) -> int:
    """Steps the peer has computed once it stops computing, which happens only when every attacker stream
    is stuck on a full reply queue; fails if it computed every step sent (nothing stalled) or never stops."""
    deadline, last, since = time.monotonic() + timeout, -1, time.monotonic()
    while time.monotonic() < deadline:
        computed = stub.Info(peer_pb2.InfoRequest(), timeout=10).steps_computed
        if computed != last:
            last, since = computed, time.monotonic()
        elif time.monotonic() - since > 2.0:
            assert computed < sent, "every step was computed: the attacker's streams never stalled"
            return computed
        time.sleep(0.2)
    raise TimeoutError("the peer kept computing")


def _reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM starts again from VmRSS (Linux >= 4.0)


class Stream:
    """A raw Session stream fed one request at a time; `receive` is optional: the attacker never reads."""

    def __init__(self, stub: peer_pb2_grpc.PeerStub) -> None:
        self._requests: queue.Queue = queue.Queue()
        self._replies = stub.Session(iter(self._requests.get, None), timeout=300)

    def send(self, **kind) -> None:
        self._requests.put(peer_pb2.SessionRequest(**kind))

    def receive(self) -> peer_pb2.SessionReply:
        return next(self._replies)

    def open(self, session_id: str, token: bytes, *, batch: int, max_length: int) -> str:
        opening = peer_pb2.OpenSession(
            session_id=session_id, start=0, end=4, batch_size=batch, max_length=max_length, push_token=token
        )
        self.send(open=opening)
        return self.receive().WhichOneof("kind")

    def close(self) -> None:
        self._requests.put(None)
        self._replies.cancel()


def _hidden(batch: int, seq: int, seed: int) -> peer_pb2.Tensor:
    return to_message(torch.randn(batch, seq, HIDDEN, generator=torch.Generator().manual_seed(seed)))


def _push(
    stub: peer_pb2_grpc.PeerStub, session_id: str, token: bytes, step: peer_pb2.Step
) -> grpc.StatusCode:
    step.session_id = session_id
    try:
        stub.Push(peer_pb2.PushRequest(step=step, push_token=token), timeout=30)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def test_stalled_sessions_with_pushes_keep_the_peer_small(peer: LocalProcess) -> None:
    ready = peer.ready()
    assert ready is not None
    pid, port = int(ready["pid"]), str(ready["address"]).rsplit(":", 1)[1]
    attacker = peer_pb2_grpc.PeerStub(channel(peer, address=f"127.0.0.1:{port}", options=ATTACKER_OPTIONS))
    honest = peer_pb2_grpc.PeerStub(channel(peer, address=f"[::1]:{port}", options=MESSAGE_OPTIONS))
    theirs, their_token = Stream(honest), os.urandom(16)
    streams: list[Stream] = []
    try:
        assert theirs.open("theirs", their_token, batch=1, max_length=64) == "opened"
        theirs.send(step=peer_pb2.Step(step_id=0, position=0, hidden=_hidden(1, 2, 0)))
        assert theirs.receive().WhichOneof("kind") == "result"  # warm: the model has run once
        time.sleep(1.0)
        before = _memory(pid)
        _reset_peak(pid)

        tokens = [os.urandom(16) for _ in range(NUM_SESSIONS)]
        for index, token in enumerate(tokens):
            stream = Stream(attacker)
            streams.append(stream)
            assert stream.open(f"stall-{index}", token, batch=BATCH, max_length=8192) == "opened"
            for step_id in range(STALL_STEPS):  # the same positions again and again, never read
                hidden = _hidden(BATCH, STALL_POSITIONS, step_id)
                stream.send(step=peer_pb2.Step(step_id=step_id, position=0, rollback_to=0, hidden=hidden))
        computed = _stalled(honest, sent=NUM_SESSIONS * STALL_STEPS + 1)  # + the honest client's step
        stalled = _memory(pid)

        big = peer_pb2.Step(step_id=1000, position=STALL_POSITIONS, hidden=_hidden(BATCH, PUSH_POSITIONS, 1))
        codes = [
            _push(attacker, f"stall-{index}", token, big)
            for _ in range(4)  # the per-session bound (max_pending_pushes)
            for index, token in enumerate(tokens)
        ]
        accepted = codes.count(grpc.StatusCode.OK)
        time.sleep(1.0)
        after = _memory(pid)
        growth = max(after["VmHWM"], after["VmRSS"]) - before["VmRSS"]
        print(
            f"stalled_after_steps={computed} accepted={accepted}/{len(codes)} "
            f"rss_before={before['VmRSS'] >> 20}MiB rss_stalled={stalled['VmRSS'] >> 20}MiB "
            f"rss_after={after['VmRSS'] >> 20}MiB "
            f"peak_growth={growth >> 20}MiB"
        )
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
        assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes  # the budget refused the rest
        assert growth < MAX_RSS_GROWTH, (growth >> 20, accepted)

        # another client is not affected: its session steps, and a push to it is accepted and runs
        theirs.send(step=peer_pb2.Step(step_id=1, position=2, hidden=_hidden(1, 1, 1)))
        assert theirs.receive().WhichOneof("kind") == "result"
        pushed = peer_pb2.Step(step_id=2, position=3, hidden=_hidden(1, 1, 2))
        assert _push(honest, "theirs", their_token, pushed) == grpc.StatusCode.OK
        reply = theirs.receive()
        assert reply.WhichOneof("kind") == "result" and reply.result.step_id == 2, reply
    finally:
        for stream in [*streams, theirs]:
            stream.close()
