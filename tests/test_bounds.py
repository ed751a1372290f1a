"""The peer's bounds against a real servicer on an in-process server (no OS process needed): pending pushes
per session, Forward/Backward admission, a failed push that names no address, sessions retired at drain,
and the bounded reply queue of a Session stream."""

from __future__ import annotations

import asyncio
import os
import queue
import threading

import grpc
import pytest
import torch
from fakes import FakePeer, hidden_states

from peer.replies import ReplyQueue
from protos import peer_pb2, peer_pb2_grpc
from protos.tensors import from_message, to_message

MAX_MESSAGE = 1 << 20


class Stream:
    """A Session stream on an in-process peer, driven one message at a time."""

    def __init__(self, peer: FakePeer) -> None:
        self._requests: queue.Queue = queue.Queue()
        self._replies = _stub(peer).Session(iter(self._requests.get, None), timeout=60)

    def open(self, session_id: str, **fields) -> peer_pb2.SessionReply:
        fields = dict(start=0, end=4, batch_size=1, max_length=64, dtype="float32") | fields
        self._requests.put(
            peer_pb2.SessionRequest(open=peer_pb2.OpenSession(session_id=session_id, **fields))
        )
        return next(self._replies)

    def send(self, step: peer_pb2.Step) -> None:
        self._requests.put(peer_pb2.SessionRequest(step=step))

    def receive(self) -> peer_pb2.SessionReply:
        return next(self._replies)

    def close(self) -> None:
        self._requests.put(None)


def _stub(peer: FakePeer) -> peer_pb2_grpc.PeerStub:
    return peer_pb2_grpc.PeerStub(grpc.insecure_channel(peer.address))


def _step(step_id: int, position: int, hidden: torch.Tensor, **fields) -> peer_pb2.Step:
    return peer_pb2.Step(step_id=step_id, position=position, hidden=to_message(hidden), **fields)


def test_pushes_beyond_the_pending_bound_are_refused(fake_swarm) -> None:
    swarm = fake_swarm([(0, 4)], max_pending_pushes=3)
    peer, token = swarm.peers[0], os.urandom(16)
    stream = Stream(peer)
    assert stream.open("busy", push_token=token).WhichOneof("kind") == "opened"
    runtime = peer.service.runtimes.get("busy")
    assert runtime is not None
    swarm.call(runtime.lock.acquire())  # the session is busy: accepted pushes stay queued
    inputs = [hidden_states(1, 1, seed=seed) for seed in range(6)]
    codes = []
    for step_id, hidden in enumerate(inputs):
        request = peer_pb2.PushRequest(
            step=_step(step_id, step_id, hidden, session_id="busy"), push_token=token
        )
        try:
            _stub(peer).Push(request, timeout=10)
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as e:
            codes.append(e.code())
    assert codes == [grpc.StatusCode.OK] * 3 + [grpc.StatusCode.RESOURCE_EXHAUSTED] * 3
    swarm.loop.call_soon_threadsafe(runtime.lock.release)
    span, cache = swarm.local_span(), None
    cache = span.new_cache()
    for step_id in range(3):  # the accepted ones ran, in order, exactly
        reply = stream.receive()
        assert reply.result.step_id == step_id and reply.result.position == step_id + 1
        expected = span.forward(inputs[step_id], cache)
        torch.testing.assert_close(from_message(reply.result.hidden, max_bytes=MAX_MESSAGE), expected)
    assert runtime.pending_pushes == 0
    stream.close()


def test_forward_and_backward_in_flight_are_capped_before_decoding(fake_swarm) -> None:
    swarm = fake_swarm([(0, 4)], max_stateless_in_flight=2)
    peer = swarm.peers[0]
    peer.slow(1.0, at_least=1.5)  # each compute holds its admission for 1.5 s
    request = peer_pb2.ForwardRequest(start=0, end=4, hidden=to_message(hidden_states(1, 2, seed=0)))
    codes: list[grpc.StatusCode] = []

    def call() -> None:
        try:
            _stub(peer).Forward(request, timeout=30)
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as e:
            codes.append(e.code())

    threads = [threading.Thread(target=call) for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(codes, key=str) == sorted(
        [grpc.StatusCode.OK] * 2 + [grpc.StatusCode.RESOURCE_EXHAUSTED] * 3, key=str
    )
    peer.slow(1.0)
    garbage = peer_pb2.ForwardRequest(
        start=0, end=4, hidden=peer_pb2.Tensor(dtype="float32", shape=[0, 2**62, 2**62])
    )
    with pytest.raises(grpc.RpcError) as caught:
        _stub(peer).Forward(garbage, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    _stub(peer).Forward(request, timeout=30)  # every admission was given back


def test_a_failed_push_names_no_address(fake_swarm) -> None:
    swarm = fake_swarm([(0, 2)])
    peer = swarm.peers[0]
    hop = peer_pb2.Hop(
        peer_id="gone", address="127.0.0.1:9", start=2, end=4, session_id="n", push_token=b"t" * 16
    )
    stream = Stream(peer)
    assert stream.open("head", end=2, next_hops=[hop]).WhichOneof("kind") == "opened"
    stream.send(_step(0, 0, hidden_states(1, 1, seed=0)))
    reply = stream.receive()
    assert reply.WhichOneof("kind") == "error" and reply.error.peer_id == "gone"
    assert reply.error.message == "push to the next hop failed: UNAVAILABLE"
    stream.close()


def test_drain_retires_open_sessions_with_unavailable(fake_swarm) -> None:
    swarm = fake_swarm([(0, 4)])
    peer = swarm.peers[0]
    stream = Stream(peer)
    assert stream.open("open-at-drain").WhichOneof("kind") == "opened"
    swarm.call(peer.service.retire_all("peer is shutting down"))
    with pytest.raises(grpc.RpcError) as caught:
        stream.receive()
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert caught.value.details() == "peer is shutting down" and peer.num_sessions == 0


def test_close_cancels_pushes_still_queued(fake_swarm) -> None:
    swarm = fake_swarm([(0, 4)], max_pending_pushes=4)
    peer, token = swarm.peers[0], os.urandom(16)
    stream = Stream(peer)
    stream.open("stuck", push_token=token)
    runtime = peer.service.runtimes.get("stuck")
    assert runtime is not None
    swarm.call(runtime.lock.acquire())  # never released: the pushes would wait forever
    for step_id in range(4):
        step = _step(step_id, step_id, hidden_states(1, 1, seed=step_id), session_id="stuck")
        _stub(peer).Push(peer_pb2.PushRequest(step=step, push_token=token), timeout=10)
    assert runtime.pending_pushes == 4
    swarm.call(peer.service.close(timeout=0.2), timeout=5)
    assert runtime.pending_pushes == 0
    stream.close()


# ---- the reply queue of one stream ----------------------------------------------------------------------


def test_reply_queue_waits_for_room_and_keeps_order() -> None:
    async def scenario() -> list[object]:
        replies: ReplyQueue[int, str] = ReplyQueue(2)
        await replies.put(1)
        await replies.put(2)
        third = asyncio.create_task(replies.put(3))
        await asyncio.sleep(0.01)
        assert not third.done() and len(replies) == 2  # full: the writer waits, memory stays bounded
        taken = [await replies.get()]
        await asyncio.wait_for(third, 1)
        replies.end("end")
        await replies.put(4)  # after the end: dropped
        taken += [await replies.get() for _ in range(3)]
        return taken

    assert asyncio.run(scenario()) == [1, 2, 3, "end"]


def test_reply_queue_end_releases_waiting_writers() -> None:
    async def scenario() -> tuple[list[object], int]:
        replies: ReplyQueue[int, str] = ReplyQueue(1)
        await replies.put(1)
        writers = [asyncio.create_task(replies.put(n)) for n in (2, 3, 4)]
        await asyncio.sleep(0.01)
        assert not any(w.done() for w in writers)
        replies.end("gone")
        await asyncio.wait_for(asyncio.gather(*writers), 1)  # none stays blocked on a stream nobody reads
        return [await replies.get(), await replies.get()], len(replies)

    assert asyncio.run(scenario()) == ([1, "gone"], 0)
    with pytest.raises(ValueError, match="maxsize"):
        ReplyQueue(0)
