"""Session records hold state only (issue 27, item 1): each open session's lock, queued pushed steps and
stream live in the servicer's runtime table, and every way a session closes drops its entry (cancelling
its queued pushed steps), so nothing is left behind. Against a real servicer on an in-process server."""

from __future__ import annotations

import os
import queue
import time
from collections.abc import Callable

import grpc
import pytest
from fakes import FakePeer, hidden_states

from peer.replies import ReplyQueue
from protos import peer_pb2, peer_pb2_grpc
from protos.tensors import to_message

WAIT = 30.0


class Stream:
    """A Session stream on an in-process peer, driven one message at a time."""

    def __init__(self, peer: FakePeer) -> None:
        self._requests: queue.Queue = queue.Queue()
        stub = peer_pb2_grpc.PeerStub(grpc.insecure_channel(peer.address))
        self._replies = stub.Session(iter(self._requests.get, None), timeout=60)

    def open(self, session_id: str, **fields) -> str:
        fields = dict(start=0, end=4, batch_size=1, max_length=128, dtype="float32") | fields
        self._requests.put(
            peer_pb2.SessionRequest(open=peer_pb2.OpenSession(session_id=session_id, **fields))
        )
        return self.receive()

    def step(self, step_id: int, seq: int, position: int = 0) -> str:
        hidden = to_message(hidden_states(1, seq, seed=step_id))
        self._requests.put(
            peer_pb2.SessionRequest(step=peer_pb2.Step(step_id=step_id, position=position, hidden=hidden))
        )
        return self.receive()

    def receive(self) -> str:
        """The next reply's kind, or the status code the stream ended with."""
        try:
            return next(self._replies).WhichOneof("kind")
        except grpc.RpcError as e:
            return e.code().name

    def close(self) -> None:
        self._requests.put(peer_pb2.SessionRequest(close=peer_pb2.Close()))
        self._requests.put(None)

    def cancel(self) -> None:
        self._replies.cancel()
        self._requests.put(None)


def _until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.02)


def _push(peer: FakePeer, session_id: str, token: bytes, step_id: int) -> None:
    hidden = to_message(hidden_states(1, 1, seed=step_id))
    step = peer_pb2.Step(session_id=session_id, step_id=step_id, position=step_id, hidden=hidden)
    stub = peer_pb2_grpc.PeerStub(grpc.insecure_channel(peer.address))
    stub.Push(peer_pb2.PushRequest(step=step, push_token=token), timeout=10)


def _idle(peer: FakePeer, session_id: str) -> None:
    """Make a session look unused for a long time (run on the swarm's loop, which owns the table)."""

    async def age() -> None:
        session = peer.sessions.get(session_id)
        assert session is not None
        session.last_used -= 3600.0

    peer.swarm.call(age())


@pytest.fixture
def peer(fake_swarm) -> FakePeer:
    # 8 pages of 16 tokens, and no quota short of them for the one in-process client: a 64-token session
    # and an 80-token one do not fit together, so the second's step preempts the first
    swarm = fake_swarm(
        [(0, 4)], max_cache_tokens=128, max_client_cache_tokens=256, max_network_cache_tokens=256
    )
    return swarm.peers[0]


def _empty(peer: FakePeer) -> bool:
    return len(peer.service.runtimes) == 0 and peer.num_sessions == 0


def test_a_session_opened_has_a_runtime_and_its_record_none_of_it(peer: FakePeer) -> None:
    stream = Stream(peer)
    assert stream.open("a") == "opened"
    session, runtime = peer.sessions.get("a"), peer.service.runtimes.get("a")
    assert session is not None and runtime is not None
    assert not {"lock", "tasks", "pending_pushes", "reply", "finish"} & set(vars(session))
    stream.close()
    _until(lambda: _empty(peer), "the session or its runtime was kept")


@pytest.mark.parametrize("end", ["close", "cancel"])
def test_the_streams_end_drops_the_runtime(peer: FakePeer, end: str) -> None:
    stream = Stream(peer)
    assert stream.open("a") == "opened" and stream.step(0, 3) == "result"
    assert len(peer.service.runtimes) == 1
    getattr(stream, end)()
    _until(lambda: _empty(peer), "the session or its runtime was kept")


def test_idle_expiry_drops_the_runtime_and_cancels_queued_pushes(peer: FakePeer) -> None:
    token = os.urandom(16)
    stream = Stream(peer)
    assert stream.open("a", push_token=token) == "opened"
    runtime = peer.service.runtimes.get("a")
    assert runtime is not None
    peer.swarm.call(runtime.lock.acquire())  # busy: the pushed steps stay queued
    for step_id in range(2):
        _push(peer, "a", token, step_id)
    _until(lambda: runtime.pending_pushes == 2, "the pushes were not queued")
    _idle(peer, "a")

    async def expire() -> None:
        peer.service.expire_idle()

    peer.swarm.call(expire())
    assert stream.receive() == "NOT_FOUND"
    _until(lambda: runtime.pending_pushes == 0 and not runtime.tasks, "queued pushes were kept")
    assert _empty(peer) and peer.service.pushes.pending_bytes == 0
    peer.swarm.loop.call_soon_threadsafe(runtime.lock.release)
    stream.close()


def test_a_session_preempted_for_pages_drops_its_runtime(peer: FakePeer) -> None:
    first, second = Stream(peer), Stream(peer)
    assert first.open("first") == "opened" and first.step(0, 64) == "result"  # 4 of 8 pages
    assert second.open("second") == "opened" and second.step(1, 80) == "result"  # 5 pages: first goes
    assert first.receive() == "RESOURCE_EXHAUSTED"
    assert peer.sessions.preempted == 1 and peer.service.runtimes.get("first") is None
    assert len(peer.service.runtimes) == 1 and peer.service.runtimes.get("second") is not None
    second.close()
    _until(lambda: _empty(peer), "the session or its runtime was kept")


def test_a_session_preempted_for_a_new_session_drops_its_runtime(fake_swarm) -> None:
    # opened through the servicer directly: in-process streams all come from one address, one network
    swarm = fake_swarm([(0, 4)], max_sessions=2)
    peer = swarm.peers[0]
    ends: dict[str, ReplyQueue] = {}

    async def open_as(client: str, session_id: str) -> None:
        replies: ReplyQueue = ReplyQueue(4)
        request = peer_pb2.OpenSession(session_id=session_id, start=0, end=4, batch_size=1, max_length=16)
        peer.service._open(request, replies, client)
        ends[session_id] = replies

    swarm.call(open_as("ipv4:10.0.1.1", "a1"))
    swarm.call(open_as("ipv4:10.0.1.1", "a2"))
    _idle(peer, "a1")
    _idle(peer, "a2")
    swarm.call(open_as("ipv4:10.0.2.1", "b"))  # a1 (the oldest idle of the largest network) makes room
    assert peer.sessions.preempted == 1 and peer.sessions.get("a1") is None
    assert peer.service.runtimes.get("a1") is None and len(peer.service.runtimes) == 2

    async def ended(session_id: str) -> object:
        return await ends[session_id].get()

    status = getattr(swarm.call(ended("a1")), "status", None)  # the stream's end marker, not a reply
    assert status is not None and status.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    for session_id in ("a2", "b"):
        swarm.call(_close(peer, session_id))
    assert _empty(peer)


async def _close(peer: FakePeer, session_id: str) -> None:
    peer.service.close_session(session_id, reason="closed by the test")


def test_retired_and_dropped_sessions_drop_their_runtimes(peer: FakePeer) -> None:
    retired, dropped = Stream(peer), Stream(peer)
    assert retired.open("retired") == "opened"
    peer.swarm.call(peer.service.retire_all("peer is shutting down"))
    assert retired.receive() == "UNAVAILABLE" and _empty(peer)
    assert dropped.open("dropped") == "opened" and len(peer.service.runtimes) == 1
    peer.drop_sessions()
    assert _empty(peer)
    dropped.close()


def test_a_session_whose_cache_cannot_be_made_is_closed_with_its_runtime(
    peer: FakePeer, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_memory(**_: object) -> None:
        raise MemoryError("no room for the cache")

    monkeypatch.setattr(peer.span, "new_cache", no_memory)
    stream = Stream(peer)
    assert stream.open("a") == "INTERNAL"
    assert _empty(peer)
