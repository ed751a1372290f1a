"""Persistent push streams between peers: one `PushStream` call per (peer, next peer) carries every session's
pushed steps, one frame per step, and answers only the frames it refuses (a `PushNack`). Knows frames, nacks
and streams; what a frame means (its session, token and budget) is the servicer's `accept`.

    sender (PushStreams)                                     receiver (IncomingPushStreams)
    push(hop, frame, fail) ─▶ queue ─▶ writer ─▶ PushStream ─▶ reader ─▶ accept(frame) ─▶ step task
                              (bounded)          (one call)         │ refused
    fail(code) ◀─ recent frames ◀─ reader ◀──── PushNack ◀──── nacks (bounded) ◀┘

There is no acknowledgement of accepted frames, so the sender keeps each frame's `fail` for a step timeout:
a nack fails that one step; the end of a stream fails every step written on it within that time (the
client fails over and replays exactly) and the next push opens a fresh stream. A stream is used for
`period` seconds, then retired: written to its end and half-closed, so it ends OK and fails nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc

from peer.requests import client_key
from peer.status import Status, status_of
from peer.wire import Refused
from protos import peer_pb2
from protos.channels import ChannelPool, Relay

if TYPE_CHECKING:
    from peer.config import PeerConfig

logger = logging.getLogger(__name__)

Fail = Callable[[grpc.StatusCode, str], None]  # tells a pushed step's client that its push failed
Accept = Callable[[peer_pb2.PushRequest], Awaitable[None]]  # admits one frame as a unary Push would
_Key = tuple[str, bytes, Relay | None]  # the next hop's address, certificate and relay
_Frame = tuple[str, int]  # (the next hop's session id, step id)

# seconds a new stream waits for the retired one it replaces to end before its first write: well within the
# receiver's deadline for a stream's first message (`request_timeout`); past it, a session's frames could
# arrive out of order, which its position check refuses (FAILED_PRECONDITION: the client replays)
FOLLOW_TIMEOUT = 2.0
MAX_RECENT_FRAMES = 65536  # frames one stream remembers for failing them; past it the oldest are forgotten
# how the end of a stream reaches the steps written on it: what the client can act on, else UNAVAILABLE
_KEPT_CODES = frozenset(
    {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAUTHENTICATED}
)
_CODES = {code.value[0]: code for code in grpc.StatusCode}


def failure_message(code: grpc.StatusCode) -> str:
    """What the pushing session's client is told: the code only. The next hop's own text stays in this
    peer's log: echoed, it would map the next peer's network."""
    return f"push to the next hop failed: {code.name}"


@dataclass
class _Sent:
    at: float  # time.monotonic() when the frame was queued
    fail: Fail


class _Stream:
    """One outgoing PushStream call: its frames waiting to be written, and those written lately."""

    def __init__(self, key: _Key, call: grpc.aio.StreamStreamCall, *, max_queued: int, now: float) -> None:
        self.key = key
        self.call = call
        self.max_queued = max_queued
        self.opened_at = now
        self.frames: deque[peer_pb2.PushRequest] = deque()
        self.sent: OrderedDict[_Frame, _Sent] = OrderedDict()  # insertion order is time order
        self.retiring = False  # half-close once the queue is written: the stream then ends OK
        self.ready = asyncio.Event()  # a frame or the retirement waits for the writer
        self.writer: asyncio.Task[None] | None = None
        self.reader: asyncio.Task[None] | None = None
        # the retired stream this one replaces: its end (every frame read) comes before this one's first
        # write, so a session's frames reach the next hop in order across the change
        self.follows: asyncio.Task[None] | None = None
        self.follow_timeout = 0.0

    def remember(self, frame: _Frame, fail: Fail, now: float, *, window: float) -> None:
        while self.sent:
            _, oldest = next(iter(self.sent.items()))
            if now - oldest.at <= window and len(self.sent) < MAX_RECENT_FRAMES:
                break
            self.sent.popitem(last=False)
        self.sent[frame] = _Sent(now, fail)
        self.sent.move_to_end(frame)

    async def write(self) -> None:
        """Writes the frames in order, one at a time; a broken call ends it (the reader reports why)."""
        if self.follows is not None:
            await asyncio.wait({self.follows}, timeout=self.follow_timeout)
            self.follows = None
        try:
            while True:
                while not self.frames:
                    if self.retiring:
                        await self.call.done_writing()
                        return
                    self.ready.clear()
                    await self.ready.wait()
                await self.call.write(self.frames.popleft())
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.aio.UsageError) as e:
            logger.debug("push stream write ended next=%s reason=%r", self.key[0], e)


class PushStreams:
    """The outgoing push streams of one peer, one per next hop (address, certificate, relay), opened on first
    use. Used from the peer's event loop only."""

    def __init__(self, channels: ChannelPool, *, max_queued: int, step_timeout: float, period: float) -> None:
        self.channels = channels
        self.max_queued = max_queued
        self.step_timeout = step_timeout  # how long a written frame may still fail
        self.period = period
        self.num_opened = 0  # streams opened so far
        self._streams: dict[_Key, _Stream] = {}  # the stream each next hop's frames go to now
        self._live: set[_Stream] = set()  # those and the retired ones still ending

    @classmethod
    def from_config(cls, channels: ChannelPool, config: PeerConfig) -> PushStreams:
        return cls(
            channels,
            max_queued=config.max_push_stream_queue,
            step_timeout=config.step_timeout,
            period=config.push_stream_period,
        )

    def __len__(self) -> int:
        return len(self._streams)

    def push(self, hop: peer_pb2.Hop, request: peer_pb2.PushRequest, fail: Fail) -> None:
        """Queue `request` for `hop`'s stream without waiting. A refusal, a full queue or the end of the
        stream later calls `fail` (at most once per frame). Raises what `ChannelPool.stub` raises for a next
        hop that cannot be reached at all (NoCertificate, relay.Unreachable)."""
        relay = (hop.peer_id, tuple(hop.relay_maddrs)) if hop.relay_maddrs else None
        key = (hop.address, bytes(hop.certificate), relay)
        now = time.monotonic()
        stream = self._streams.get(key)
        follows = None
        if stream is not None and now - stream.opened_at >= self.period:
            self._retire(stream)
            follows, stream = stream.reader, None
        if stream is None:
            stream = self._open(key, now, follows=follows)
        if len(stream.frames) >= stream.max_queued:
            fail(grpc.StatusCode.RESOURCE_EXHAUSTED, "push queue to the next hop is full")
            return
        stream.remember((request.step.session_id, request.step.step_id), fail, now, window=self.step_timeout)
        stream.frames.append(request)
        stream.ready.set()

    def _open(self, key: _Key, now: float, *, follows: asyncio.Task[None] | None = None) -> _Stream:
        address, certificate, relay = key
        call = self.channels.stub(address, certificate or None, relay=relay).PushStream()
        stream = _Stream(key, call, max_queued=self.max_queued, now=now)
        stream.follows, stream.follow_timeout = follows, min(self.step_timeout, FOLLOW_TIMEOUT)
        stream.writer = asyncio.create_task(stream.write())
        stream.reader = asyncio.create_task(self._read(stream))
        self._streams[key] = stream
        self._live.add(stream)
        self.num_opened += 1
        logger.debug("push stream opened next=%s", address)
        return stream

    def _retire(self, stream: _Stream) -> None:
        if self._streams.get(stream.key) is stream:
            del self._streams[stream.key]
        stream.retiring = True
        stream.ready.set()

    async def _read(self, stream: _Stream) -> None:
        code, details = grpc.StatusCode.CANCELLED, "this peer is closing"
        try:
            async for nack in stream.call:
                self._nacked(stream, nack)
            code, details = await stream.call.code(), ""
        except grpc.aio.AioRpcError as e:
            code, details = e.code(), e.details() or ""
        except asyncio.CancelledError:  # the call was cancelled here (grpc raises this), or this task was
            details = "cancelled"
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
        finally:
            self._ended(stream, code, details)

    def _nacked(self, stream: _Stream, nack: peer_pb2.PushNack) -> None:
        sent = stream.sent.pop((nack.session_id, nack.step_id), None)
        code = _CODES.get(nack.code, grpc.StatusCode.UNAVAILABLE)
        if code is grpc.StatusCode.OK:
            code = grpc.StatusCode.UNAVAILABLE
        logger.warning(
            "push refused next=%s step=%d code=%s reason=%r",
            stream.key[0],
            nack.step_id,
            code.name,
            nack.message[:200],
        )
        if sent is not None:
            sent.fail(code, failure_message(code))

    def _ended(self, stream: _Stream, code: grpc.StatusCode, details: str) -> None:
        """The stream is over: later pushes open a new one; steps written on it lately fail, unless it was
        retired and ended OK (every frame was read and answered)."""
        retired = stream.retiring  # this end was asked for: every frame was written before the half-close
        self._retire(stream)
        self._live.discard(stream)
        if stream.writer is not None:
            stream.writer.cancel()
        if code is grpc.StatusCode.OK and retired and not stream.frames:
            return
        kept = code if code in _KEPT_CODES else grpc.StatusCode.UNAVAILABLE
        now, failed = time.monotonic(), 0
        for sent in stream.sent.values():
            if now - sent.at <= self.step_timeout:
                sent.fail(kept, failure_message(kept))
                failed += 1
        stream.sent.clear()
        stream.frames.clear()
        if failed or code is not grpc.StatusCode.OK:
            logger.warning(
                "push stream ended next=%s code=%s steps_failed=%d reason=%r",
                stream.key[0],
                code.name,
                failed,
                details[:200],
            )

    async def close(self, *, timeout: float) -> None:
        """Retire every stream, wait at most `timeout` seconds for them to end, cancel the rest."""
        streams = list(self._live)
        for stream in streams:
            self._retire(stream)
        readers = [stream.reader for stream in streams if stream.reader is not None]
        if readers:
            _, pending = await asyncio.wait(readers, timeout=timeout)
            for stream in streams:
                if stream.reader in pending:
                    stream.call.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
        writers = [stream.writer for stream in streams if stream.writer is not None]
        await asyncio.gather(*writers, return_exceptions=True)


@dataclass(frozen=True)
class _End:
    status: Status | None = None  # None: the stream ends OK


class IncomingPushStreams:
    """The PushStream calls served here: how many, and how each one's frames and nacks flow (module doc)."""

    def __init__(
        self, *, max_streams: int, max_client_streams: int, max_queued_nacks: int, idle_timeout: float
    ) -> None:
        self.max_streams = max_streams
        self.max_client_streams = max_client_streams
        self.max_queued_nacks = max_queued_nacks
        self.idle_timeout = idle_timeout
        self._clients: dict[str, int] = {}  # client -> its streams open here

    @classmethod
    def from_config(cls, config: PeerConfig) -> IncomingPushStreams:
        return cls(
            max_streams=config.max_push_streams,
            max_client_streams=config.max_client_push_streams,
            max_queued_nacks=config.max_push_stream_queue,
            idle_timeout=2 * config.push_stream_period,
        )

    def __len__(self) -> int:
        return sum(self._clients.values())

    def streams(self, client: str) -> int:
        return self._clients.get(client, 0)

    async def serve(
        self,
        frames: AsyncIterator[peer_pb2.PushRequest | Refused],
        context: grpc.aio.ServicerContext,
        accept: Accept,
    ) -> AsyncIterator[peer_pb2.PushNack]:
        """The nacks of one PushStream call (the servicer yields them); `accept` admits each frame."""
        client = client_key(context.peer())
        refusal = self._admit(client)
        if refusal is not None:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal)
        released = False

        def release(_: object = None) -> None:
            nonlocal released
            if not released:
                released = True
                self._release(client)

        context.add_done_callback(release)  # also when gRPC abandons this generator at a `yield`
        rpc = asyncio.current_task()
        nacks: asyncio.Queue[peer_pb2.PushNack | _End] = asyncio.Queue()
        reader = asyncio.create_task(self._read(frames, nacks, accept, rpc, client))
        try:
            while True:
                item = await nacks.get()
                if isinstance(item, _End):
                    if item.status is not None:
                        await context.abort(*item.status)
                    return
                yield item
        finally:
            release()
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)

    def _admit(self, client: str) -> str | None:
        held = self._clients.get(client, 0)
        if held >= self.max_client_streams:
            return f"too many push streams from your address (at most {self.max_client_streams})"
        if len(self) >= self.max_streams:
            return f"this peer serves {self.max_streams} push streams already"
        self._clients[client] = held + 1
        return None

    def _release(self, client: str) -> None:
        left = self._clients.get(client, 0) - 1
        if left > 0:
            self._clients[client] = left
        else:
            self._clients.pop(client, None)

    async def _read(
        self,
        frames: AsyncIterator[peer_pb2.PushRequest | Refused],
        nacks: asyncio.Queue[peer_pb2.PushNack | _End],
        accept: Accept,
        rpc: asyncio.Task[object] | None,
        client: str,
    ) -> None:
        """Admits the frames in order; refusals become nacks. One timer for the whole stream, moved on at
        each frame: no task or timer handle is made per frame."""
        loop = asyncio.get_running_loop()
        end = _End()
        try:
            async with asyncio.timeout(self.idle_timeout) as idle:
                async for frame in frames:
                    idle.reschedule(loop.time() + self.idle_timeout)
                    if isinstance(frame, Refused):
                        end = _End(Status(grpc.StatusCode.INVALID_ARGUMENT, frame.reason))
                        break
                    try:
                        await accept(frame)
                        continue
                    except asyncio.CancelledError:
                        raise
                    except Exception as e:  # refused: a nack, and the stream goes on
                        code, message, _ = status_of(e)
                    if nacks.qsize() >= self.max_queued_nacks:  # the sender reads none of its nacks
                        logger.warning("push stream ended client=%s reason=nacks not read", client)
                        nacks.put_nowait(_End(Status(grpc.StatusCode.RESOURCE_EXHAUSTED, "nacks not read")))
                        if rpc is not None:  # gRPC may be stuck writing to a sender that reads nothing
                            rpc.cancel()
                        return
                    step = frame.step
                    nack = peer_pb2.PushNack(
                        session_id=step.session_id, step_id=step.step_id, message=message
                    )
                    nack.code = code.value[0]
                    nacks.put_nowait(nack)
        except TimeoutError:
            logger.debug("push stream idle client=%s: closed", client)
        except grpc.aio.AbortError:  # the call was ended under the read (a guard's deadline)
            logger.debug("push stream aborted client=%s", client)
        nacks.put_nowait(end)
