"""An inference session over a route: one stream per hop with server-to-server push, step results, positions,
and failover that replaces only the hops that failed and rebuilds their caches exactly.

    client ──Step──▶ hop A ──Push──▶ hop B ──Push──▶ hop C
       ▲               │ report        │ report        │ result
       └───────────────┴───────────────┴───────────────┘
Each hop reports its output to the client before pushing it on, so for every step the client holds the
hidden states entering every hop boundary (`StepLog.inputs`). When hop B fails, replacement peers for B's
blocks replay B's inputs step by step with the same chunks (their caches come out bit for bit the same),
hop A is rerouted to them, and the failed step resumes at the first hop that has not reported it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import torch

from client.config import ClientConfig
from client.discovery import BanList, Discovery
from client.errors import NoRouteError, SwarmError
from client.route import Hop, PeerStats, plan_inference_route
from protos import peer_pb2, peer_pb2_grpc
from protos.errors import CorollaError, InvalidInputError
from protos.tensors import dtype_from_name, from_message, to_message

logger = logging.getLogger(__name__)

# codes after which the peer is banned and replaced; NOT_FOUND and FAILED_PRECONDITION reopen the hop
_BAN_CODES = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.CANCELLED,
}


class PeerFailure(CorollaError):
    """A hop failed a request; `code` says what the client can do (see protos/peer.proto)."""

    def __init__(self, code: grpc.StatusCode, message: str, peer_id: str) -> None:
        super().__init__(f"{code.name} from peer ...{peer_id[-8:]}: {message}")
        self.code = code
        self.peer_id = peer_id


class SwarmUnavailableError(SwarmError):
    """The swarm could not serve the request within the retry budget."""


@dataclass
class StepLog:
    """One step of the session: enough to resend it to any hop."""

    position: int  # cache length before the step (after a rollback)
    positions: torch.Tensor  # position ids [batch, new_positions]
    beam_indices: torch.Tensor | None
    rollback_to: int | None
    inputs: dict[int, torch.Tensor] = field(default_factory=dict)  # block -> hidden entering it [b, t, h]


class _HopStream:
    """One hop's Session stream; its replies go to the session, tagged with the stream."""

    def __init__(
        self, hop: Hop, channel: grpc.aio.Channel, session: InferenceSession, session_id: str
    ) -> None:
        self.hop = hop
        self.session = session
        self.session_id = session_id  # each hop has its own, so a reopened hop never meets an old one
        self.failure: PeerFailure | None = None
        self.closed = False
        self._requests: asyncio.Queue[peer_pb2.SessionRequest | None] = asyncio.Queue()
        self._call = peer_pb2_grpc.PeerStub(channel).Session(self._request_iterator())
        self._opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._reader = asyncio.create_task(self._read())

    async def _request_iterator(self) -> AsyncIterator[peer_pb2.SessionRequest]:
        while (request := await self._requests.get()) is not None:
            yield request

    def send(self, request: peer_pb2.SessionRequest) -> None:
        self._requests.put_nowait(request)

    async def open(self, request: peer_pb2.OpenSession, timeout: float) -> None:
        self.send(peer_pb2.SessionRequest(open=request))
        try:
            await asyncio.wait_for(asyncio.shield(self._opened), timeout)
        except TimeoutError:
            raise PeerFailure(
                grpc.StatusCode.DEADLINE_EXCEEDED, "no answer to open", self.hop.peer_id
            ) from None

    async def _read(self) -> None:
        max_bytes = self.session.config.max_message_bytes
        try:
            async for reply in self._call:
                kind = reply.WhichOneof("kind")
                if kind == "opened":
                    self._opened.set_result(None)
                elif kind == "result":
                    hidden = from_message(
                        reply.result.hidden, max_bytes=max_bytes, expected_ndim=3, name="hidden"
                    )
                    self.session._on_result(self, reply.result.step_id, hidden)
                elif kind == "error":
                    peer_id = reply.error.peer_id or self.hop.peer_id
                    failure = PeerFailure(_code(reply.error.code), reply.error.message, peer_id)
                    self.session._on_error(reply.error.step_id, failure)
            self._end(PeerFailure(grpc.StatusCode.UNAVAILABLE, "stream ended", self.hop.peer_id))
        except grpc.aio.AioRpcError as e:
            self._end(PeerFailure(e.code(), e.details() or "stream failed", self.hop.peer_id))
        except CorollaError as e:  # a garbled reply: this hop is not trusted for the rest of the session
            self._end(PeerFailure(grpc.StatusCode.INTERNAL, f"bad reply: {e}", self.hop.peer_id))

    def _end(self, failure: PeerFailure) -> None:
        self.failure = failure
        if not self._opened.done():
            self._opened.set_exception(failure)
        self.session._on_stream_end(self, failure)

    def message(self) -> peer_pb2.Hop:
        hop = self.hop
        return peer_pb2.Hop(
            peer_id=hop.peer_id, address=hop.address, start=hop.start, end=hop.end, session_id=self.session_id
        )

    async def close(self) -> None:
        self.closed = True
        self._requests.put_nowait(None)
        self._call.cancel()
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)
        if not self._opened.done():
            self._opened.cancel()
        elif not self._opened.cancelled():
            self._opened.exception()  # retrieved, so asyncio does not warn about it


def _code(value: int) -> grpc.StatusCode:
    return next((code for code in grpc.StatusCode if code.value[0] == value), grpc.StatusCode.UNKNOWN)


@dataclass
class _Waiting:
    """A step in flight: it is done when every expected hop has reported its output."""

    log: StepLog
    expect: list[_HopStream]  # the last one's output is the step's result
    done: asyncio.Future[None]
    sent_at: float = 0.0  # time.perf_counter() when the step left the client
    arrivals: dict[int, float] = field(default_factory=dict)  # block -> when the output entering it came

    def complete(self) -> bool:
        return all(stream.hop.end in self.log.inputs for stream in self.expect)


class InferenceSession:
    """Peers' caches for one generation (or several calls that continue it) on a route of peers.

    `position` counts what the caches hold. Runs on the client runtime's loop (`astep`, `aclose`).
    """

    def __init__(
        self,
        *,
        discovery: Discovery,
        bans: BanList,
        channels: ChannelPool,
        config: ClientConfig,
        max_length: int,
        wire_dtype: str,
        stats: PeerStats | None = None,
    ) -> None:
        self.discovery = discovery
        self.stats = stats
        self.bans = bans
        self.channels = channels
        self.config = config
        self.max_length = max_length
        self.wire_dtype = wire_dtype
        self.position = 0
        self.batch_size: int | None = None
        self.history: list[StepLog] = []
        self.streams: list[_HopStream] = []
        self.num_failovers = 0
        self.closed = False
        prefix = uuid.uuid4().hex
        self._session_ids = (f"{prefix}-{n}" for n in itertools.count())
        self._step_ids = itertools.count()
        self._waiting: dict[int, _Waiting] = {}
        self._sent: dict[int, StepLog] = {}  # every send's step: reports may come after its result
        self._restart_from = 0  # the first block of hops opened since the step in flight was sent
        self._lock = asyncio.Lock()

    @property
    def route(self) -> list[Hop]:
        return [stream.hop for stream in self.streams]

    @property
    def num_blocks(self) -> int:
        return self.streams[-1].hop.end if self.streams else 0

    async def astep(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        *,
        beam_indices: torch.Tensor | None = None,
        rollback_to: int | None = None,
    ) -> torch.Tensor:
        """Send new positions through every hop; returns the last hop's output [batch, seq, hidden]."""
        if self.closed:
            raise InvalidInputError("the inference session is closed")
        base = self.position if rollback_to is None else rollback_to
        if not 0 <= base <= self.position or base + hidden.shape[1] > self.max_length:
            raise InvalidInputError(
                f"step of {hidden.shape[1]} positions at {base} does not fit the session "
                f"(holds {self.position}, max_length {self.max_length})"
            )
        log = StepLog(base, positions.to(torch.int64), beam_indices, rollback_to, {0: hidden})
        async with self._lock:
            output = await self._with_failover(log, hidden.shape[0])
            self.history.append(log)
            self.position = base + hidden.shape[1]
        return output.to(hidden.dtype)

    async def _with_failover(self, log: StepLog, batch_size: int) -> torch.Tensor:
        failures: list[CorollaError] = []
        recovering: PeerFailure | None = None
        while True:
            try:
                if recovering is not None:
                    await self._recover(recovering)
                elif not self.streams:
                    self.batch_size = batch_size
                    await self._replace(0, 0, None, refresh=bool(failures))
                recovering = None
                return await self._run(log)
            except SwarmError as error:
                # the view may miss peers (a frozen DHT replica, peers still joining): look again, later
                failures.append(error)
                await self._reset()
                recovering = None
                if len(failures) > self.config.max_retries:
                    raise
                await asyncio.sleep(min(0.25 * 2 ** len(failures), 4.0))
            except PeerFailure as failure:
                if failure.code == grpc.StatusCode.INVALID_ARGUMENT:
                    raise InvalidInputError(str(failure)) from failure
                failures.append(failure)
                if len(failures) > self.config.max_retries:
                    await self._reset()
                    raise SwarmUnavailableError(
                        f"gave up after {len(failures)} failures: " + "; ".join(map(str, failures[-3:]))
                    ) from failure
                self.num_failovers += 1
                if failure.code in _BAN_CODES:
                    self.bans.ban(failure.peer_id, failure.code.name)
                if recovering is not None:  # the repair itself failed: rebuild the whole route next
                    await self._reset()
                    recovering = None
                else:
                    recovering = failure

    async def _reset(self) -> None:
        streams, self.streams = self.streams, []
        for stream in streams:
            await stream.close()

    async def _recover(self, failure: PeerFailure) -> None:
        """Replace the failed hop; the whole route when the failure cannot be placed on one hop."""
        index = next((i for i, s in enumerate(self.streams) if s.hop.peer_id == failure.peer_id), None)
        first, last = (index, index + 1) if index is not None else (0, len(self.streams))
        try:
            await self._replace(first, last, failure)
        except NoRouteError:
            if (first, last) == (0, len(self.streams)):
                raise
            await self._replace(0, len(self.streams), failure)  # the rest of the route may do better

    async def _replace(
        self, first: int, last: int, failure: PeerFailure | None, *, refresh: bool = False
    ) -> None:
        """Put freshly planned hops in place of streams[first:last] and rebuild their caches from history."""
        if any(
            self.streams[first].hop.start not in log.inputs
            for log in self.history
            if first < len(self.streams)
        ):
            first, last = 0, len(self.streams)  # a hop died before reporting: rebuild from the embeddings
        old = self.streams[first:last]
        start = old[0].hop.start if old else 0
        end = old[-1].hop.end if old else None
        others = {s.hop.peer_id for s in self.streams[:first] + self.streams[last:]}
        banned = frozenset(self.bans.banned() | others)  # a peer holds one session per id
        measured = self.stats.block_times() if self.stats is not None else None
        try:  # the last view usually knows a replacement; a DHT read can stall on a frozen node
            view = await self.discovery.view(refresh=refresh)
            hops = plan_inference_route(view, start=start, end=end, banned=banned, block_time=measured)
        except NoRouteError:
            if refresh:
                raise
            view = await self.discovery.view(refresh=True)
            hops = plan_inference_route(view, start=start, end=end, banned=banned, block_time=measured)
        for stream in old:
            await stream.close()
        following = self.streams[last:]
        new = [_HopStream(hop, self.channels.get(hop.address), self, next(self._session_ids)) for hop in hops]
        try:
            for index, stream in enumerate(new):
                request = self._open_request(stream, [*new[index + 1 :], *following])
                await stream.open(request, self.config.connect_timeout)
            await self._replay(new)
        except BaseException:
            for stream in new:
                await stream.close()
            await self._reset()
            raise
        self.streams[first:last] = new
        self._restart_from = min(self._restart_from, start)
        if first > 0:  # the hop before the new ones pushes to them from now on
            request = peer_pb2.Reroute(next_hops=[s.message() for s in [*new, *following]])
            self.streams[first - 1].send(peer_pb2.SessionRequest(reroute=request))
        replaced = " ".join(f"...{h.peer_id[-8:]}[{h.start},{h.end})" for h in hops)
        if failure is None:
            logger.info("route opened hops=%s", replaced)
        else:
            logger.warning(
                "failover peer=...%s reason=%s replacement=%s replay_steps=%d replay_positions=%d",
                failure.peer_id[-8:],
                failure.code.name,
                replaced,
                len(self.history),
                self.position,
            )

    def _open_request(self, stream: _HopStream, next_streams: list[_HopStream]) -> peer_pb2.OpenSession:
        return peer_pb2.OpenSession(
            session_id=stream.session_id,
            start=stream.hop.start,
            end=stream.hop.end,
            max_length=self.max_length,
            batch_size=self.batch_size or 1,
            dtype=self.wire_dtype,
            next_hops=[s.message() for s in next_streams],
            report_outputs=True,
        )

    async def _replay(self, streams: list[_HopStream]) -> None:
        """Resend every past step to the new hops, one hop at a time, with the very same chunks."""
        for log in self.history:
            for stream in streams:
                output = await self._send(log, stream, expect=[stream], local_only=True)
                expected = log.inputs.get(stream.hop.end)
                if expected is not None and not torch.equal(output, expected):
                    logger.warning("replay differs at block %d position %d", stream.hop.end, log.position)
                log.inputs[stream.hop.end] = output

    async def _run(self, log: StepLog) -> torch.Tensor:
        """Send the step from the first hop that has not reported it; the last hop's output ends it."""
        for stream in self.streams:
            if stream.failure is not None:
                raise stream.failure
        # hops opened since this step was first sent have not seen it, whatever the old hops reported
        for block in [b for b in log.inputs if b > self._restart_from]:
            del log.inputs[block]
        self._restart_from = self.num_blocks
        frontier = next(
            i for i, s in enumerate(self.streams) if s.hop.end not in log.inputs or i == len(self.streams) - 1
        )
        # a partly sent step restarts at the frontier: outputs past it are recomputed
        for block in [b for b in log.inputs if b > self.streams[frontier].hop.start]:
            del log.inputs[block]
        streams = self.streams
        return await self._send(log, streams[frontier], expect=streams[frontier:], local_only=False)

    async def _send(
        self,
        log: StepLog,
        stream: _HopStream,
        *,
        expect: list[_HopStream],
        local_only: bool,
    ) -> torch.Tensor:
        step_id = next(self._step_ids)  # a fresh id per send: late errors about an abandoned send are ignored
        step = peer_pb2.Step(
            session_id="",
            step_id=step_id,
            position=log.position,
            hidden=to_message(log.inputs[stream.hop.start], dtype=dtype_from_name(self.wire_dtype)),
            position_ids=to_message(log.positions),
            local_only=local_only,
        )
        if log.beam_indices is not None:
            step.beam_indices.CopyFrom(to_message(log.beam_indices.to(torch.int64)))
        if log.rollback_to is not None:
            step.rollback_to = log.rollback_to
        waiting = _Waiting(log, expect, asyncio.get_running_loop().create_future(), time.perf_counter())
        self._waiting[step_id] = waiting
        self._sent[step_id] = log
        started = time.perf_counter()
        try:
            stream.send(peer_pb2.SessionRequest(step=step))
            await self._wait(waiting)
        finally:
            del self._waiting[step_id]
            if not waiting.done.done():
                waiting.done.cancel()
        logger.debug(
            "step positions=%d ms=%.2f", log.positions.shape[1], (time.perf_counter() - started) * 1000
        )
        return log.inputs[expect[-1].hop.end]

    def _on_result(self, stream: _HopStream, step_id: int, hidden: torch.Tensor) -> None:
        log = self._sent.get(step_id)
        if log is None or stream.closed:
            return
        log.inputs.setdefault(stream.hop.end, hidden)
        waiting = self._waiting.get(step_id)
        if waiting is None:
            return
        self._measure(waiting, stream)
        if waiting.complete() and not waiting.done.done():
            waiting.done.set_result(None)

    def _measure(self, waiting: _Waiting, stream: _HopStream) -> None:
        """A decode step's time at one hop: from the previous hop's output (or the send) to this one's."""
        now = time.perf_counter()
        waiting.arrivals[stream.hop.end] = now
        if self.stats is None or waiting.log.positions.shape[1] != 1:
            return  # prefills and replays are not comparable with decode steps
        started = waiting.sent_at if stream is waiting.expect[0] else waiting.arrivals.get(stream.hop.start)
        if started is not None:
            self.stats.observe_step(stream.hop.peer_id, stream.hop.end - stream.hop.start, now - started)

    def _on_error(self, step_id: int, failure: PeerFailure) -> None:
        waiting = self._waiting.get(step_id)
        if waiting is not None and not waiting.done.done():
            waiting.done.set_exception(failure)

    def _on_stream_end(self, stream: _HopStream, failure: PeerFailure) -> None:
        if stream.closed:
            return
        for waiting in self._waiting.values():
            # a step this hop already passed on can still complete downstream
            passed = stream.hop.end in waiting.log.inputs
            if not passed and not waiting.done.done():
                waiting.done.set_exception(failure)

    async def _wait(self, waiting: _Waiting) -> None:
        """Wait for the step. Every `step_timeout` without an answer, ping the hops that have not reported
        it: one that does not answer is stuck and blamed; hops that answer are busy (a long prefill) and
        are given up to `forward_timeout` in all."""
        deadline = time.monotonic() + self.config.forward_timeout
        while True:
            try:
                await asyncio.wait_for(asyncio.shield(waiting.done), self.config.step_timeout)
                return
            except TimeoutError:
                pending = [s for s in waiting.expect if s.hop.end not in waiting.log.inputs] or waiting.expect
                for stream in pending:
                    stub = peer_pb2_grpc.PeerStub(self.channels.get(stream.hop.address))
                    try:
                        await stub.Info(peer_pb2.InfoRequest(), timeout=self.config.connect_timeout)
                    except grpc.aio.AioRpcError:
                        stuck = grpc.StatusCode.DEADLINE_EXCEEDED
                        raise PeerFailure(
                            stuck, "no answer to a step or a ping", stream.hop.peer_id
                        ) from None
                if time.monotonic() > deadline:
                    slow = grpc.StatusCode.DEADLINE_EXCEEDED
                    raise PeerFailure(slow, "step over forward_timeout", pending[0].hop.peer_id) from None

    async def aclose(self) -> None:
        self.closed = True
        self._sent.clear()
        streams, self.streams = self.streams, []
        for stream in streams:
            stream.send(peer_pb2.SessionRequest(close=peer_pb2.Close()))
            await stream.close()
        self.history.clear()


class ChannelPool:
    """One gRPC channel per peer address, reused by every session and request of a client."""

    def __init__(self, *, max_message_bytes: int) -> None:
        self._options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ]
        self._channels: dict[str, grpc.aio.Channel] = {}

    def get(self, address: str) -> grpc.aio.Channel:
        if address not in self._channels:
            self._channels[address] = grpc.aio.insecure_channel(address, options=self._options)
        return self._channels[address]

    async def close(self) -> None:
        channels, self._channels = self._channels, {}
        for channel in channels.values():
            await channel.close()
