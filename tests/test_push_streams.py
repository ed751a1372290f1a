"""Persistent push streams (issue 27, item 2): every session's steps from one peer to the next ride one
`PushStream` call; a refused frame, or the end of the stream, reaches the pushing session's client as a
StepError naming the next hop; and a hostile sender of frames cannot take a peer down or disturb others.

Topology: in-process peers of the tiny Llama on 127.0.0.1 (tests/fakes.py), dialled by the client library
or directly by a test's own gRPC calls; the sender's unit tests run `PushStreams` against a bare gRPC
server of the test's that answers each frame as it is told.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable

import grpc
import pytest
from fakes import FakePeer, hidden_states
from test_inprocess import ONE_PER_SPAN, TWO_PER_SPAN, assert_exact, hop, reference, run

from client.errors import short_id
from client.session import InferenceSession
from peer.push_streams import PushStreams
from protos import peer_pb2, peer_pb2_grpc
from protos.channels import ChannelPool
from protos.tensors import to_message

WAIT = 30.0  # seconds any condition below may take to come true (the test machine may be loaded)
SMALL_WINDOW = [("grpc.http2.bdp_probe", 0)]  # a receive window that stays at 64 KiB
METHOD = "/corolla.peer.v1.Peer/PushStream"
CODES = {code.value[0]: code.name for code in grpc.StatusCode}


def _until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.02)


# ---- through the client library ------------------------------------------------------------------------


@pytest.mark.parametrize("push_stream", [True, False], ids=["stream", "unary"])
def test_every_session_rides_one_stream_per_next_peer(fake_swarm, connect, push_stream: bool) -> None:
    swarm = fake_swarm(ONE_PER_SPAN, push_stream=push_stream)
    connection = connect(swarm)
    for _ in range(2):  # two sessions, one after the other, on the same streams
        assert_exact(run(connection).outputs, reference(swarm))
    opened = [peer.service.push_streams.num_opened for peer in swarm.peers]
    assert opened == ([1, 1, 0] if push_stream else [0, 0, 0])  # the last hop pushes to nobody


def test_a_refused_frame_reaches_the_client_naming_the_next_hop(
    fake_swarm, connect, caplog: pytest.LogCaptureFixture
) -> None:
    """The middle hop forgot its sessions (a restart): the first hop's next frame is refused with a nack,
    which the first hop turns into a StepError naming the middle hop; the client reopens there and replays.
    The stream itself goes on."""
    swarm = fake_swarm(TWO_PER_SPAN)
    connection = connect(swarm)
    forgetful: list[FakePeer] = []

    def forget(session: InferenceSession) -> None:
        forgetful.append(hop(swarm, session, 1))
        forgetful[0].drop_sessions()

    with caplog.at_level(logging.WARNING):
        result = run(connection, {3: forget})
    assert_exact(result.outputs, reference(swarm))
    assert result.num_failovers == 1
    named = f"PERMISSION_DENIED from peer {short_id(forgetful[0].peer_id)}: push to the next hop failed"
    assert named in caplog.text
    assert "push stream ended" not in caplog.text


def test_a_dropped_stream_fails_the_steps_on_it_over(
    fake_swarm, connect, caplog: pytest.LogCaptureFixture
) -> None:
    """The stream from the first hop to the middle one breaks while a step's frame is on it (the middle hop
    holds it unread): the step fails with UNAVAILABLE naming the middle hop, the client fails over and
    replays exactly, and the first hop's next push opens a fresh stream."""
    swarm = fake_swarm(TWO_PER_SPAN)
    connection = connect(swarm, max_hop_timeout=30.0, min_hop_timeout=30.0)  # only the push may fail it
    broken: list[FakePeer] = []

    def break_stream(first: FakePeer, middle: FakePeer) -> None:
        _until(lambda: middle.faults.num_waiting > 0, "the frame never reached the middle hop")

        async def cancel() -> None:
            for stream in list(first.service.push_streams._streams.values()):  # a reset of the connection
                stream.call.cancel()

        swarm.call(cancel())
        _until(lambda: len(middle.service.incoming_pushes) == 0, "the middle hop never saw the stream end")
        middle.thaw()

    def freeze(session: InferenceSession) -> None:
        first, middle = hop(swarm, session, 0), hop(swarm, session, 1)
        broken.append(middle)
        middle.freeze()
        threading.Thread(target=break_stream, args=(first, middle), daemon=True).start()

    with caplog.at_level(logging.WARNING):
        result = run(connection, {3: freeze})
    assert_exact(result.outputs, reference(swarm))
    assert connection.bans.banned() == {broken[0].peer_id}
    assert result.route[1][0] != broken[0].peer_id and result.num_failovers == 1
    named = f"UNAVAILABLE from peer {short_id(broken[0].peer_id)}: push to the next hop failed"
    assert named in caplog.text


# ---- a hostile sender of frames -------------------------------------------------------------------------


class Session:
    """A Session stream opened directly on a peer, taking pushes with `token`."""

    def __init__(self, peer: FakePeer, session_id: str, token: bytes) -> None:
        self._channel = grpc.insecure_channel(peer.address)
        self._requests: queue.Queue = queue.Queue()
        self._replies = peer_pb2_grpc.PeerStub(self._channel).Session(
            iter(self._requests.get, None), timeout=60
        )
        self.session_id = session_id
        opening = peer_pb2.OpenSession(
            session_id=session_id,
            start=0,
            end=4,
            batch_size=1,
            max_length=64,
            dtype="float32",
            push_token=token,
        )
        self._requests.put(peer_pb2.SessionRequest(open=opening))
        assert next(self._replies).WhichOneof("kind") == "opened"

    def reply(self) -> str:
        return next(self._replies).WhichOneof("kind")

    def close(self) -> None:
        self._requests.put(None)
        self._replies.cancel()
        self._channel.close()


class Pusher:
    """A PushStream call driven frame by frame; its nacks are read only when asked."""

    def __init__(self, peer: FakePeer, *, raw: bool = False, options: list | None = None) -> None:
        self._channel = grpc.insecure_channel(peer.address, options=options or [])
        self._frames: queue.Queue = queue.Queue()
        call = self._channel.stream_stream(
            METHOD,
            request_serializer=(lambda b: b) if raw else peer_pb2.PushRequest.SerializeToString,
            response_deserializer=peer_pb2.PushNack.FromString,
        )
        self._nacks = call(iter(self._frames.get, None), timeout=60)

    def send(self, frame: peer_pb2.PushRequest | bytes) -> None:
        self._frames.put(frame)

    def nack(self) -> tuple[str, int, str, str] | str:
        """The next nack (session id, step id, code name, message), or the status the stream ended with."""
        try:
            nack = next(self._nacks)
        except StopIteration:
            return "OK"
        except grpc.RpcError as e:
            return e.code().name
        return nack.session_id, nack.step_id, CODES[nack.code], nack.message

    def close(self) -> None:
        self._frames.put(None)
        self._nacks.cancel()
        self._channel.close()


def _frame(session_id: str, token: bytes, step_id: int, *, seq: int = 3, batch: int = 1, **fields):
    step = peer_pb2.Step(
        session_id=session_id,
        step_id=step_id,
        position=0,
        hidden=to_message(hidden_states(batch, seq, seed=step_id)),
        **fields,
    )
    return peer_pb2.PushRequest(step=step, push_token=token)


def test_refused_frames_get_nacks_and_the_stream_goes_on(fake_swarm) -> None:
    swarm = fake_swarm([(0, 4)])
    peer, token = swarm.peers[0], os.urandom(16)
    victim, pusher = Session(peer, "victim", token), Pusher(peer)
    try:
        refused = {
            1: _frame("victim", os.urandom(16), 1),  # a wrong token
            2: _frame("nobody", token, 2),  # an unknown session: the same answer
            3: _frame("victim", token, 3, local_only=True),
            4: _frame("victim", token, 4, batch=2),
        }
        for frame in refused.values():
            pusher.send(frame)
        answers = [pusher.nack() for _ in refused]
        assert answers == [
            ("victim", 1, "PERMISSION_DENIED", "push refused"),
            ("nobody", 2, "PERMISSION_DENIED", "push refused"),
            ("victim", 3, "INVALID_ARGUMENT", "a push cannot be local_only"),
            ("victim", 4, "INVALID_ARGUMENT", "hidden batch 2 does not match the session's batch 1"),
        ]
        pusher.send(_frame("victim", token, 5))  # accepted: no nack, the session's client gets the result
        assert victim.reply() == "result"
        pusher.send(None)  # the sender's end: the stream ends OK, with no nack for the accepted frame
        assert pusher.nack() == "OK"
        _until(lambda: len(peer.service.incoming_pushes) == 0, "the stream was never released")
    finally:
        victim.close()
        pusher.close()


def test_a_push_over_the_session_budget_gets_a_nack(fake_swarm) -> None:
    swarm = fake_swarm([(0, 4)], max_pending_pushes=1)
    peer, token = swarm.peers[0], os.urandom(16)
    victim, pusher = Session(peer, "victim", token), Pusher(peer)
    runtime = peer.service.runtimes.get("victim")
    assert runtime is not None
    try:
        swarm.call(runtime.lock.acquire())  # the session is busy: pushed steps wait behind its lock
        pusher.send(_frame("victim", token, 1))
        pusher.send(_frame("victim", token, 2))
        assert pusher.nack() == ("victim", 2, "RESOURCE_EXHAUSTED", "too many pushed steps queued")
        swarm.loop.call_soon_threadsafe(runtime.lock.release)
        assert victim.reply() == "result"  # the first one ran
    finally:
        victim.close()
        pusher.close()


def test_bytes_that_are_no_frame_end_the_stream_only(fake_swarm) -> None:
    swarm = fake_swarm([(0, 4)])
    peer, token = swarm.peers[0], os.urandom(16)
    victim, garbage, pusher = Session(peer, "victim", token), Pusher(peer, raw=True), Pusher(peer)
    try:
        garbage.send(b"\xff\xff\xff\xff")
        assert garbage.nack() == "INVALID_ARGUMENT"
        pusher.send(_frame("victim", token, 1))
        assert victim.reply() == "result"
    finally:
        for closing in (victim, garbage, pusher):
            closing.close()


def test_a_caller_holds_a_bounded_number_of_streams(fake_swarm) -> None:
    swarm = fake_swarm([(0, 4)], max_client_push_streams=2)
    peer, token = swarm.peers[0], os.urandom(16)
    victim = Session(peer, "victim", token)
    pushers = [Pusher(peer) for _ in range(2)]
    try:
        for index, pusher in enumerate(pushers):
            pusher.send(_frame("nobody", token, index))
            assert pusher.nack()[2] == "PERMISSION_DENIED"  # served
        extra = Pusher(peer)
        pushers.append(extra)
        extra.send(_frame("victim", token, 7))
        assert extra.nack() == "RESOURCE_EXHAUSTED"
        pushers[0].close()
        _until(lambda: len(peer.service.incoming_pushes) == 1, "the closed stream was never released")
        again = Pusher(peer)
        pushers.append(again)
        again.send(_frame("victim", token, 8))
        assert victim.reply() == "result"
    finally:
        victim.close()
        for pusher in pushers:
            pusher.close()


def test_a_stream_without_frames_is_closed(fake_swarm) -> None:
    swarm = fake_swarm([(0, 4)], push_stream_period=0.25)  # closed after 0.5 s without a frame
    peer, token = swarm.peers[0], os.urandom(16)
    pusher = Pusher(peer)
    try:
        pusher.send(_frame("nobody", token, 1))
        assert pusher.nack()[2] == "PERMISSION_DENIED"
        assert pusher.nack() == "OK"  # the receiver's end: the sender opens a new stream for its next push
        _until(lambda: len(peer.service.incoming_pushes) == 0, "the idle stream was never released")
    finally:
        pusher.close()


def test_a_flood_of_bad_frames_whose_nacks_are_never_read_ends_its_stream(
    fake_swarm, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="peer.push_streams")
    swarm = fake_swarm([(0, 4)], max_push_stream_queue=4)
    peer, token = swarm.peers[0], os.urandom(16)
    victim = Session(peer, "victim", token)
    flooder = Pusher(peer, options=SMALL_WINDOW)
    try:
        wrong = _frame("victim", os.urandom(16), 1, seq=1)
        for _ in range(20000):  # each refused: ~40 bytes of nack, never read; 64 KiB of them fill the window
            flooder.send(wrong)
        # the peer ends the call (its writer may be stuck on a window that never opens: it is cancelled)
        _until(lambda: "reason=nacks not read" in caplog.text, "the flooding stream was never ended")
        _until(lambda: len(peer.service.incoming_pushes) == 0, "the flooding stream was never released")
        pusher = Pusher(peer)  # the peer is up, and another session is served as before
        try:
            pusher.send(_frame("victim", token, 2))
            assert victim.reply() == "result"
        finally:
            pusher.close()
    finally:
        victim.close()
        flooder.close()


# ---- the sender against a receiver of the test's ---------------------------------------------------------


class Receiver:
    """A bare gRPC server with a PushStream that answers frame i with `answers[i]`: None takes it, a code
    nacks it, "end" ends the stream with UNAVAILABLE; past the list it takes every frame."""

    def __init__(self, answers: list[grpc.StatusCode | str | None]) -> None:
        self.answers = answers
        self.frames: list[tuple[str, int]] = []
        self.streams = 0
        self.server = grpc.aio.server()
        handler = grpc.stream_stream_rpc_method_handler(
            self._serve,
            request_deserializer=peer_pb2.PushRequest.FromString,
            response_serializer=peer_pb2.PushNack.SerializeToString,
        )
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("corolla.peer.v1.Peer", {"PushStream": handler}),)
        )
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"

    async def _serve(
        self, frames: AsyncIterator[peer_pb2.PushRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[peer_pb2.PushNack]:
        self.streams += 1
        async for frame in frames:
            index = len(self.frames)
            self.frames.append((frame.step.session_id, frame.step.step_id))
            answer = self.answers[index] if index < len(self.answers) else None
            if answer == "end":
                await context.abort(grpc.StatusCode.UNAVAILABLE, "went away")
            if isinstance(answer, grpc.StatusCode):
                step = frame.step
                yield peer_pb2.PushNack(
                    session_id=step.session_id, step_id=step.step_id, code=answer.value[0], message="no"
                )


def _hop(address: str) -> peer_pb2.Hop:
    return peer_pb2.Hop(peer_id="next", address=address, session_id="s")


def _sends(
    answers: list, num_frames: int, *, max_queued: int = 64, period: float = 300.0, settle: int = 0
) -> tuple[list[tuple[int, str, str]], int, list[tuple[str, int]]]:
    """Push `num_frames` frames (step ids 0..) through `PushStreams` to a `Receiver(answers)`, waiting for
    each frame to be taken after the first `settle`; returns the failures (step id, code, message), the
    streams opened and the frames the receiver saw."""

    async def scenario() -> tuple[list[tuple[int, str, str]], int, list[tuple[str, int]]]:
        receiver = Receiver(answers)
        await receiver.server.start()
        channels = ChannelPool(max_message_bytes=2**20, insecure=True)
        streams = PushStreams(channels, max_queued=max_queued, step_timeout=30.0, period=period)
        failures: list[tuple[int, str, str]] = []
        try:
            for step_id in range(num_frames):
                request = peer_pb2.PushRequest(step=peer_pb2.Step(session_id="s", step_id=step_id))

                def fail(code: grpc.StatusCode, message: str, step_id: int = step_id) -> None:
                    failures.append((step_id, code.name, message))

                streams.push(_hop(receiver.address), request, fail)
                ends = step_id < len(answers) and answers[step_id] == "end"
                while step_id >= settle and not any(failed[0] == step_id for failed in failures):
                    if len(receiver.frames) > step_id and not ends:  # taken or nacked: on to the next
                        break
                    await asyncio.sleep(0.005)
            await streams.close(timeout=5.0)
        finally:
            await channels.close()
            await receiver.server.stop(None)
        return sorted(failures), streams.num_opened, receiver.frames

    return asyncio.run(asyncio.wait_for(scenario(), WAIT))


FAILED = "push to the next hop failed: {}".format


def test_a_nack_fails_its_step_only() -> None:
    failures, opened, seen = _sends([None, grpc.StatusCode.PERMISSION_DENIED, None], 4)
    assert failures == [(1, "PERMISSION_DENIED", FAILED("PERMISSION_DENIED"))]  # not the receiver's text
    assert opened == 1 and seen == [("s", 0), ("s", 1), ("s", 2), ("s", 3)]


def test_the_end_of_a_stream_fails_the_steps_written_on_it_and_the_next_push_reopens() -> None:
    failures, opened, seen = _sends([None, None, "end"], 4)
    assert failures == [(step, "UNAVAILABLE", FAILED("UNAVAILABLE")) for step in range(3)]
    assert opened == 2 and seen[-1] == ("s", 3)  # the fourth went on a fresh stream and was taken


def test_a_full_queue_fails_the_push_at_once() -> None:
    failures, opened, seen = _sends([], 6, max_queued=4, settle=6)  # six frames without a pause
    assert failures == [(step, "RESOURCE_EXHAUSTED", "push queue to the next hop is full") for step in (4, 5)]
    assert opened == 1 and len(seen) == 4


def test_a_stream_is_retired_after_its_period_and_ends_failing_nothing() -> None:
    failures, opened, seen = _sends([], 3, period=0.0)
    assert failures == [] and opened == 3 and len(seen) == 3


def test_frames_of_a_session_keep_their_order() -> None:
    failures, opened, seen = _sends([], 200, max_queued=256, settle=200)
    assert failures == [] and opened == 1 and seen == [("s", step) for step in range(200)]


def test_frames_keep_their_order_across_retired_streams() -> None:
    # a fresh stream per frame, all pushed at once: each stream writes only once the one before it ended
    failures, opened, seen = _sends([], 20, period=0.0, settle=20)
    assert failures == [] and opened == 20 and seen == [("s", step) for step in range(20)]
