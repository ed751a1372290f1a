"""Abuse of sessions against the real servicer on an in-process peer (security review 3, H1 and H2): a
client that stops reading its stream, pushes past the byte budget, and one client holding every session
slot from 8 addresses.

Topology: one in-process peer on 127.0.0.1; clients dial it directly, or through a relay per source
address (127.0.N.1, one /24 each: Linux routes all of 127.0.0.0/8 to loopback) so the peer sees the
caller on that address, as it would see 9 hosts.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator

import grpc
from fakes import FakePeer, hidden_states

from protos import peer_pb2, peer_pb2_grpc
from protos.tensors import to_message

WAIT = 30.0  # seconds any condition below may take to come true (the test machine may be loaded)
# a client that keeps its receive window at 64 KiB (no bandwidth probing): its stream stalls after a few
# replies once it stops reading
SMALL_WINDOW = [("grpc.http2.bdp_probe", 0)]


class Stream:
    """A Session stream driven one message at a time; the caller decides whether it ever reads."""

    def __init__(self, target: str, *, options: list[tuple[str, object]] | None = None) -> None:
        self._channel = grpc.insecure_channel(target, options=options or [])
        self._requests: queue.Queue = queue.Queue()
        self._replies = peer_pb2_grpc.PeerStub(self._channel).Session(
            iter(self._requests.get, None), timeout=60
        )

    def open(self, session_id: str, **fields) -> str:
        fields = dict(start=0, end=4, batch_size=1, max_length=64, dtype="float32") | fields
        self.send(open=peer_pb2.OpenSession(session_id=session_id, **fields))
        return self.receive()

    def send(self, **kind) -> None:
        self._requests.put(peer_pb2.SessionRequest(**kind))

    def receive(self) -> str:
        """The next reply's kind, or the name of the status the stream ended with."""
        try:
            return next(self._replies).WhichOneof("kind")
        except grpc.RpcError as e:
            return e.code().name

    def close(self) -> None:
        self._requests.put(None)
        self._replies.cancel()
        self._channel.close()


def _until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.02)


def _step(step_id: int, seq: int, **fields) -> peer_pb2.Step:
    return peer_pb2.Step(step_id=step_id, hidden=to_message(hidden_states(1, seq, seed=step_id)), **fields)


def _push(peer: FakePeer, session_id: str, token: bytes, step: peer_pb2.Step) -> str:
    step.session_id = session_id
    with grpc.insecure_channel(peer.address) as channel:
        try:
            peer_pb2_grpc.PeerStub(channel).Push(
                peer_pb2.PushRequest(step=step, push_token=token), timeout=10
            )
        except grpc.RpcError as e:
            return e.code().name
    return "OK"


# ---- H1: a stream whose client stops reading -------------------------------------------------------------


def test_a_stream_whose_client_stops_reading_is_ended_and_frees_its_session(fake_swarm) -> None:
    swarm = fake_swarm([(0, 4)], stalled_stream_timeout=1.0, max_queued_replies=2)
    peer, token = swarm.peers[0], os.urandom(16)
    reader, stalled = Stream(peer.address), Stream(peer.address, options=SMALL_WINDOW)
    try:
        assert reader.open("reads") == "opened"
        assert stalled.open("stalls", push_token=token) == "opened"
        runtime = peer.service.runtimes.get("stalls")
        assert runtime is not None
        for step_id in range(64):  # 8 KiB of output each, never read: a few fill the window and the queue
            stalled.send(step=_step(step_id, 32, position=0, rollback_to=0))
        _until(lambda: runtime.lock.locked() and peer.faults.num_computes > 8, "the stream never stalled")
        stuck = time.monotonic()
        codes = [
            _push(peer, "stalls", token, _step(100 + n, 32, position=0, rollback_to=0)) for n in range(2)
        ]
        assert codes == ["OK", "OK"] and peer.service.pushes.pending_bytes > 0  # queued behind the lock
        _until(lambda: peer.sessions.get("stalls") is None, "the stalled stream was never ended")
        assert (
            0.5 < time.monotonic() - stuck < WAIT
        )  # about `stalled_stream_timeout` after it stopped reading
        _until(
            lambda: not runtime.lock.locked() and runtime.pending_pushes == 0, "its lock and pushes were kept"
        )
        assert peer.service.pushes.pending_bytes == 0 and not runtime.tasks
        reader.send(step=_step(0, 3, position=0))  # another client's session never noticed
        assert reader.receive() == "result"
    finally:
        for stream in (reader, stalled):
            stream.close()


# ---- H1: the byte budget of pushes, before they are queued -----------------------------------------------


def test_pushes_past_the_byte_budget_are_refused_before_they_are_queued(fake_swarm) -> None:
    one = peer_pb2.PushRequest(step=_step(0, 16, position=0, session_id="busy"), push_token=b"t" * 16)
    budget = 3 * (one.ByteSize() + 8)  # room for 3 such pushes (their ids and positions take a few bytes)
    swarm = fake_swarm([(0, 4)], max_pending_pushes=8, max_client_pending_push_bytes=budget)
    peer, token = swarm.peers[0], os.urandom(16)
    stream = Stream(peer.address)
    try:
        assert stream.open("busy", push_token=token) == "opened"
        runtime = peer.service.runtimes.get("busy")
        assert runtime is not None
        swarm.call(runtime.lock.acquire())  # the session is busy: accepted pushes stay queued
        wrong = _step(9, 16, position=0)
        wrong.hidden.shape[1] = 80  # more positions than the session's max_length 64
        assert _push(peer, "busy", token, wrong) == "INVALID_ARGUMENT"
        codes = [
            _push(peer, "busy", token, _step(step_id, 16, position=16 * step_id)) for step_id in range(4)
        ]
        assert codes == ["OK", "OK", "OK", "RESOURCE_EXHAUSTED"]
        assert runtime.pending_pushes == 3 and peer.service.pushes.pending_bytes <= budget
        swarm.loop.call_soon_threadsafe(runtime.lock.release)
        assert [stream.receive() for _ in range(3)] == ["result"] * 3  # the accepted ones ran, in order
        _until(lambda: peer.service.pushes.pending_bytes == 0, "the budget was not given back")
    finally:
        stream.close()


# ---- H2: squatting every session slot -------------------------------------------------------------------


@contextlib.contextmanager
def _relays(target: str, sources: list[str]) -> Iterator[list[str]]:
    """A TCP relay per source address: dialing the relay reaches `target` from that source. Yields the
    relays' addresses; every listener and connection is closed on the way out."""
    host, port = target.rsplit(":", 1)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="relays", daemon=True)
    thread.start()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.CancelledError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    def relay(source: str) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], object]:
        async def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            upstream = await asyncio.open_connection(host, int(port), local_addr=(source, 0))
            await asyncio.gather(pipe(reader, upstream[1]), pipe(upstream[0], writer))

        return connected

    async def start() -> list[asyncio.Server]:
        return [await asyncio.start_server(relay(source), "127.0.0.1", 0) for source in sources]

    servers = asyncio.run_coroutine_threadsafe(start(), loop).result(WAIT)
    try:
        yield [f"127.0.0.1:{server.sockets[0].getsockname()[1]}" for server in servers]
    finally:

        async def stop() -> None:
            for server in servers:
                server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(stop(), loop).result(WAIT)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(WAIT)
        loop.close()


def test_a_client_holding_8_addresses_cannot_keep_a_ninth_from_opening_a_session(fake_swarm) -> None:
    # 16 slots, 2 per address: 8 addresses (8 networks) fill the peer; a ninth address opens a minute later
    swarm = fake_swarm([(0, 4)], max_sessions=16, max_client_sessions=2, preempt_idle_timeout=0.5)
    peer = swarm.peers[0]
    sources = [f"127.0.{network}.1" for network in range(1, 10)]
    with _relays(peer.address, sources) as relays:
        squatter = [Stream(relay) for relay in relays[:8] for _ in range(2)]
        ninth = Stream(relays[8])
        try:
            assert [stream.open(f"squat-{n}") for n, stream in enumerate(squatter)] == ["opened"] * 16
            assert {s.client for i in peer.sessions.session_ids() if (s := peer.sessions.get(i))} == {
                f"ipv4:{source}" for source in sources[:8]
            }
            time.sleep(0.6)  # every squatted session is idle now
            assert ninth.open("ninth") == "opened"
            ended = [n for n, stream in enumerate(squatter) if peer.sessions.get(f"squat-{n}") is None]
            assert len(ended) == 1 and squatter[ended[0]].receive() == "RESOURCE_EXHAUSTED"
            assert peer.num_sessions == 16 and peer.sessions.preempted == 1
            again = Stream(relays[ended[0] // 2])  # the squatter cannot take the slot back
            assert again.open("again") == "RESOURCE_EXHAUSTED"
            again.close()
            ninth.send(step=_step(0, 3, position=0))
            assert ninth.receive() == "result"
        finally:
            for stream in [*squatter, ninth]:
                stream.close()
