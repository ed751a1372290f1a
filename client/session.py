"""An inference session over a route: one stream per hop with server-to-server push, step results, positions,
and failover that replaces only the hops that failed and rebuilds their caches exactly.

    client ──Step──▶ hop A ──Push[a]──▶ hop B ──Push[a, b]──▶ hop C
       ▲                                                        │ result c, carried [a, b]
       └────────────────────────────────────────────────────────┘
Each hop pushes its output on first and appends it to the step's carried outputs; the last hop returns them
all with its own, so for every step the client holds the hidden states entering every hop boundary
(`StepLog.inputs`) from one message. A long step (more than `max_carried_tokens` rows x positions), a beam
step and a replay have each hop report its output on its own stream instead. When hop B fails, replacement
peers for B's blocks replay B's inputs step by step with the same chunks (their caches come out bit for bit
the same), hop A is rerouted to them, and the failed step resumes at the first hop whose input the client
holds, cropping what the hops from there may already have cached of it (`rollback_to`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import itertools
import logging
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc
import torch

from client.checks import agrees, result_problem, spot_check_agrees
from client.deadlines import HopDeadlines, Waiting
from client.errors import NoRouteError, PeerFailure, Retries, SwarmError, short_id, status_code
from client.route import Hop, Needs, plan_inference_route, usable_peers
from client.streams import MAX_CARRIED, HopResult, HopStream
from client.verify import SpotChecker, WrongOutput
from protos import peer_pb2
from protos.errors import InvalidInputError
from protos.tensors import decoded_dtype, to_message, wire_dtype_from_name

if TYPE_CHECKING:
    from client.swarm import SwarmConnection

logger = logging.getLogger(__name__)

# bytes of hop outputs a step may carry before each hop reports its own instead: a quarter of a peer's
# default max_message_bytes (64 MiB), which a push carrying them must fit
MAX_CARRIED_BYTES = 16 * 2**20
RELAY_RECONNECT_PERIOD = 60.0  # seconds: a relayed hop that drops again sooner is failed over as any hop


@dataclass
class StepLog:
    """One step of the session: enough to resend it to any hop."""

    position: int  # cache length before the step (after a rollback)
    positions: torch.Tensor  # position ids [batch, new_positions]
    beam_indices: torch.Tensor | None
    rollback_to: int | None
    inputs: dict[int, torch.Tensor] = field(default_factory=dict)  # block -> hidden entering it [b, t, h]
    mask: torch.Tensor | None = None  # attention mask of the new positions [batch, new_positions]; None: real
    sent: bool = False  # sent to the route at least once: a resend crops what hops cached of it


class CarriedRefused(Exception):
    """The last hop's result carried outputs the client refuses (a wrong count, shape, dtype or non-finite
    values): any hop of the chain may have garbled them, so nobody is blamed; the step is resent with each
    hop reporting its own output, which places the blame on the hop that sends a bad one."""


@dataclass(frozen=True)
class Failover:
    """One hop replaced after a failure: which peer, why, when (`time.perf_counter()`), what was replayed."""

    peer_id: str
    reason: str  # the status code's name
    failed_at: float  # when the client gave up on the peer
    replaced_at: float  # when the replacement hops had replayed the history
    replay_positions: int
    replacement: tuple[Hop, ...]


class InferenceSession:
    """Peers' caches for one generation (or several calls that continue it) on a route of peers.

    `position` counts what the caches hold. Runs on the swarm connection's loop (`astep`, `aclose`).
    """

    def __init__(self, swarm: SwarmConnection, *, max_length: int, adapter: str = "") -> None:
        self.swarm = swarm
        self.config = swarm.config
        self.max_length = max_length
        self.adapter = adapter  # the served LoRA adapter every hop runs ("" the base model)
        self.position = 0
        self.batch_size: int | None = None
        self.history: list[StepLog] = []
        self.streams: list[HopStream] = []
        self.num_failovers = 0  # failures handled (bans, avoided peers, reopened hops)
        self.failovers: list[Failover] = []  # the hops replaced after a failure, in order
        self.closed = False
        self._failed_at = 0.0
        self._wire_dtype = wire_dtype_from_name(swarm.wire_dtype)  # BLOCKWISE_INT8 for "int8"
        self._step_ids = itertools.count()
        self._waiting: dict[int, Waiting] = {}
        self._sent: dict[int, StepLog] = {}  # every send's step: reports may come after its result
        self._restart_from = 0  # the first block of hops opened since the step in flight was sent
        self._deadlines = HopDeadlines(swarm)
        self._avoided: set[str] = set()  # peers that cannot take this session (full, limits too small)
        self._reporting = False  # every hop reports every step's output (after a refused carried result)
        self._reconnected: dict[str, float] = {}  # relayed peer -> when its hop last reconnected
        self.spot_checks = SpotChecker(swarm)  # `verify_every`; counts in `spot_checks.stats`
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
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Send new positions through every hop; returns the last hop's output [batch, seq, hidden].
        `mask` [batch, seq] marks the new positions that are padding (0), as transformers' attention_mask;
        the peers keep it with their caches."""
        if self.closed:
            raise InvalidInputError("the inference session is closed")
        base = self.position if rollback_to is None else rollback_to
        if not 0 <= base <= self.position or base + hidden.shape[1] > self.max_length:
            raise InvalidInputError(
                f"step of {hidden.shape[1]} positions at {base} does not fit the session "
                f"(holds {self.position}, max_length {self.max_length})"
            )
        if mask is not None and tuple(mask.shape) != tuple(hidden.shape[:2]):
            raise InvalidInputError(f"mask must be {list(hidden.shape[:2])}, got {list(mask.shape)}")
        mask = None if mask is None or bool(mask.all()) else mask.to(torch.int64)  # all real: not sent
        log = StepLog(base, positions.to(torch.int64), beam_indices, rollback_to, {0: hidden}, mask)
        async with self._lock:
            output = await self._with_failover(log, hidden.shape[0], check=self.spot_checks.due())
            self.history.append(log)
            self.position = base + hidden.shape[1]
        return output.to(hidden.dtype)

    async def _with_failover(self, log: StepLog, batch_size: int, *, check: bool) -> torch.Tensor:
        retries = Retries(self.config, self.swarm.bans, what="step")
        retries.avoided = self._avoided  # what this session learnt stays learnt for its later steps
        recovering: PeerFailure | None = None
        lost: PeerFailure | None = None  # the failure whose repair failed: the whole route is rebuilt for it
        while True:
            try:
                if recovering is not None:
                    await self._recover(recovering)
                elif not self.streams:
                    self.batch_size = batch_size
                    await self._replace(0, 0, lost, refresh=bool(retries.failures))
                recovering = lost = None
                output = await self._run(log)
                if check:  # a hop found wrong raises WrongOutput: replaced like a failed one, the step redone
                    await self.spot_checks.check(log, self.history, self.route, needs=self._needs())
                return output
            except SwarmError as error:
                await self._reset()
                recovering = lost = None
                await retries.failed(error)
            except PeerFailure as failure:
                self._failed_at = time.perf_counter()
                if recovering is None and self._reconnects(failure):
                    self.num_failovers += 1
                    recovering = failure
                    continue
                try:
                    await retries.failed(failure)
                except SwarmError:
                    await self._reset()
                    raise
                self.num_failovers += 1
                if recovering is not None:  # the repair itself failed: rebuild the whole route next
                    await self._reset()
                    lost, recovering = recovering, None
                else:
                    recovering = failure

    def _reconnects(self, failure: PeerFailure) -> bool:
        """Whether `failure` is a relayed hop's connection that dropped (its relays were out of reach for
        longer than a relayed pipe waits, `protos.relay.PIPE_GRACE`): its hop is reopened on the same peer
        through its relays and replayed, without a ban, at most once per `RELAY_RECONNECT_PERIOD` for each
        peer; a dead peer then fails over as any other."""
        hop = next((s.hop for s in self.streams if s.hop.peer_id == failure.peer_id), None)
        if hop is None or not hop.relay_maddrs or failure.code is not grpc.StatusCode.UNAVAILABLE:
            return False
        now = time.monotonic()
        if now - self._reconnected.get(hop.peer_id, -math.inf) < RELAY_RECONNECT_PERIOD:
            return False
        self._reconnected[hop.peer_id] = now
        logger.warning("relayed hop dropped peer=%s: reconnecting through its relays", short_id(hop.peer_id))
        return True

    async def _reset(self) -> None:
        streams, self.streams = self.streams, []
        for stream in streams:
            await stream.close()

    async def _recover(self, failure: PeerFailure) -> None:
        """Replace the failed hop (and the hops after a hop whose outputs were wrong: they ran on them); the
        whole route when the failure cannot be placed on one hop."""
        index = next((i for i, s in enumerate(self.streams) if s.hop.peer_id == failure.peer_id), None)
        first, last = (index, index + 1) if index is not None else (0, len(self.streams))
        if isinstance(failure, WrongOutput):
            last = len(self.streams)
        try:
            await self._replace(first, last, failure)
        except NoRouteError:
            if (first, last) == (0, len(self.streams)):
                raise
            await self._replace(0, len(self.streams), failure)  # the rest of the route may do better

    def _needs(self) -> Needs:
        """What a peer must announce to take this session now (and the peers it learnt cannot)."""
        return Needs(
            batch_size=self.batch_size or 1,
            max_length=self.max_length,
            cached=self.position,
            adapter=self.adapter,
        )

    async def _plan(self, start: int, end: int | None, banned: frozenset[str], *, refresh: bool) -> list[Hop]:
        """Hops over [start, end) from the view; peers announcing too little free cache are used only when
        no route avoids them (the announcement may be old; a full peer answers RESOURCE_EXHAUSTED). Routes
        weigh each link's delay: the client's round trips to the usable peers are measured first (waiting
        only for first calls to peers, at most `client.latency.MAX_WAIT`), and a repair's ends link to the
        hops that stay (the hop pushing into it, the hop it pushes to) instead of the client."""
        needs = self._needs()
        view = await self.swarm.discovery.view(refresh=refresh)
        usable = usable_peers(view, banned=banned)
        stop = view.num_blocks if end is None else end
        ends = [p for p, r in usable.items() if r.start <= start < r.end or r.start < stop <= r.end]
        await self.swarm.latency.measure(usable, first=ends)
        plan = functools.partial(  # the Sybil limits: a median per address prefix, a share of the route
            plan_inference_route,
            view,
            start=start,
            end=end,
            banned=banned,
            rtt=self.swarm.latency.rtts(),
            block_time=self.swarm.stats.block_times(),
            median_cap=True,
            max_prefix_share=self.config.max_prefix_share,
            previous_hop=next((s.hop.peer_id for s in self.streams if s.hop.end == start), None),
            next_hop=next((s.hop.peer_id for s in self.streams if s.hop.start == end), None),
        )
        try:
            hops = plan(needs=needs)
        except NoRouteError:
            hops = plan(needs=dataclasses.replace(needs, free_cache=False))
        self._deadlines.expect(view, hops)
        return hops

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
        # a peer holds one session per id, so a route uses each peer once
        banned = frozenset(self.swarm.bans.banned() | self._avoided | others)
        try:  # the last view usually knows a replacement; a DHT read can stall on a frozen node
            hops = await self._plan(start, end, banned, refresh=refresh)
        except NoRouteError:
            if refresh:
                raise
            hops = await self._plan(start, end, banned, refresh=True)
        for stream in old:
            await stream.close()
        following = self.streams[last:]
        # the route's first hop takes no pushes; every other hop is pushed to by the hop before it
        new = [self._stream(hop, pushed=first + index > 0) for index, hop in enumerate(hops)]
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
        replaced = " ".join(f"{short_id(h.peer_id)}[{h.start},{h.end})" for h in hops)
        if failure is None:
            logger.info("route opened hops=%s", replaced)
        else:
            now = time.perf_counter()
            event = Failover(
                failure.peer_id, failure.code.name, self._failed_at, now, self.position, tuple(hops)
            )
            self.failovers.append(event)
            logger.warning(
                "failover peer=%s reason=%s replacement=%s replay_steps=%d replay_positions=%d",
                short_id(failure.peer_id),
                failure.code.name,
                replaced,
                len(self.history),
                self.position,
            )

    def _stream(self, hop: Hop, *, pushed: bool) -> HopStream:
        stub = self.swarm.channels.stub(hop.address, hop.certificate, relay=hop.relay)
        return HopStream(hop, stub, self, pushed=pushed, max_message_bytes=self.config.max_message_bytes)

    def _open_request(self, stream: HopStream, next_streams: list[HopStream]) -> peer_pb2.OpenSession:
        return peer_pb2.OpenSession(
            session_id=stream.session_id,
            start=stream.hop.start,
            end=stream.hop.end,
            max_length=self.max_length,
            batch_size=self.batch_size or 1,
            dtype=self.swarm.wire_dtype,
            next_hops=[s.message() for s in next_streams],
            report_outputs=False,  # each step says (Step.report_outputs)
            push_token=stream.push_token,
            adapter=self.adapter,
        )

    async def _replay(self, streams: list[HopStream]) -> None:
        """Resend every past step to the new hops, one hop at a time, with the very same chunks. A replay
        that does not reproduce what the client holds, within the dtype's tolerance, fails its peer."""
        for log in self.history:
            for stream in streams:
                end = stream.hop.end
                held = log.inputs.pop(end, None)  # taken out, so the replay's own output comes back
                try:
                    output = await self._send(log, stream, expect=[stream], local_only=True)
                finally:
                    if held is not None:  # the later hops' caches were built from it: it stays
                        log.inputs[end] = held
                if held is not None and not torch.equal(output, held):
                    where = f"block {end} position {log.position}"
                    if not agrees(output, held, wire_dtype=self._wire_dtype) and not self._quantized_agree(
                        output, held
                    ):
                        raise PeerFailure(
                            grpc.StatusCode.INTERNAL, f"replay differs at {where}", stream.hop.peer_id
                        )
                    logger.warning("replay differs within tolerance at %s", where)

    def _quantized_agree(self, output: torch.Tensor, held: torch.Tensor) -> bool:
        """A replay through peers of quantized weights (allowed by `quant`) agrees within their error."""
        quantized = self.config.quant != "none"
        return quantized and spot_check_agrees(output, held, dtypes=[self._wire_dtype], quantized=True)

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
        try:
            return await self._send(log, streams[frontier], expect=streams[frontier:], local_only=False)
        except CarriedRefused as refused:
            if self._reporting:
                raise PeerFailure(grpc.StatusCode.INTERNAL, str(refused), streams[-1].hop.peer_id) from None
            logger.warning("carried outputs refused: %s; every hop reports its outputs from now on", refused)
            self._reporting = True
            return await self._run(log)

    async def _send(
        self,
        log: StepLog,
        stream: HopStream,
        *,
        expect: list[HopStream],
        local_only: bool,
    ) -> torch.Tensor:
        step_id = next(self._step_ids)  # a fresh id per send: late errors about an abandoned send are ignored
        hidden = log.inputs[stream.hop.start]
        report = local_only or self._reported(log, hidden, len(expect))
        step = peer_pb2.Step(
            session_id="",
            step_id=step_id,
            position=log.position,
            hidden=to_message(hidden, dtype=self._wire_dtype),
            position_ids=to_message(log.positions),
            local_only=local_only,
            timeout_ms=int(self.config.forward_timeout * 1000),  # peers skip or refuse what comes too late
            report_outputs=report and not local_only,
        )
        if log.beam_indices is not None:
            step.beam_indices.CopyFrom(to_message(log.beam_indices.to(torch.int64)))
        if log.rollback_to is not None:
            step.rollback_to = log.rollback_to
        elif log.sent and not local_only and log.beam_indices is None:
            # a resend: hops from here on may have cached it before the failure; the crop is a no-op for the
            # others. A beam step is reordered again by a crop, so a hop that ran it answers
            # FAILED_PRECONDITION instead and is reopened and replayed (its output was reported).
            step.rollback_to = log.position
        if log.mask is not None:
            step.attention_mask.CopyFrom(to_message(log.mask))
        if not local_only:
            log.sent = True
        waiting = Waiting(log, expect, asyncio.get_running_loop().create_future(), time.perf_counter())
        waiting.carried = not report
        self._waiting[step_id] = waiting
        self._sent[step_id] = log
        try:
            stream.send(peer_pb2.SessionRequest(step=step))
            await self._deadlines.wait(waiting)
        finally:
            del self._waiting[step_id]
            if not waiting.done.done():
                waiting.done.cancel()
        logger.debug(
            "step positions=%d ms=%.2f",
            log.positions.shape[1],
            (time.perf_counter() - waiting.sent_at) * 1000,
        )
        return log.inputs[expect[-1].hop.end]

    def _reported(self, log: StepLog, hidden: torch.Tensor, num_hops: int) -> bool:
        """Whether each hop reports its output of a step on its own stream instead of carrying it to the
        last hop: a long step (carried, it would multiply every push's bytes) and a beam step (a hop that
        ran it cannot be cropped back, so the client must learn each hop's output as soon as it can)."""
        rows, positions, width = hidden.shape
        carried_bytes = rows * positions * width * hidden.element_size() * num_hops
        return (
            self._reporting
            or log.beam_indices is not None
            or rows * positions > self.config.max_carried_tokens
            or num_hops > MAX_CARRIED
            or carried_bytes > MAX_CARRIED_BYTES
        )

    # ---- replies (called by the hop streams) -----------------------------------------------------------

    def on_result(self, stream: HopStream, result: HopResult) -> None:
        log = self._sent.get(result.step_id)
        if log is None or stream.closed or stream.failure is not None:
            return
        waiting = self._waiting.get(result.step_id)
        # the last hop of a carried step returns the outputs entering each later boundary, in route order
        chain = (
            waiting.expect if waiting is not None and waiting.carried and stream is waiting.expect[-1] else []
        )
        problem = self._result_problem(log, result, None if waiting is None else max(len(chain) - 1, 0))
        if problem is not None and chain and problem.startswith("carried"):
            if waiting is not None and not waiting.done.done():  # any hop may have garbled them
                waiting.done.set_exception(CarriedRefused(f"bad result: {problem}"))
            return
        if problem is not None:  # the hop is not trusted for the rest of the session
            stream.fail(PeerFailure(grpc.StatusCode.INTERNAL, f"bad result: {problem}", stream.hop.peer_id))
            return
        for served in chain or [stream]:
            self.swarm.bans.served(served.hop.peer_id)
        for previous, hidden in zip(chain[:-1], result.carried if chain else (), strict=True):
            log.inputs.setdefault(previous.hop.end, hidden)
        log.inputs.setdefault(stream.hop.end, result.hidden)
        if waiting is None:
            return
        if chain:
            self._measure_carried(waiting, result)
        else:
            self._measure(waiting, stream)
        if waiting.complete() and not waiting.done.done():
            waiting.done.set_result(None)

    def _result_problem(self, log: StepLog, result: HopResult, num_carried: int | None) -> str | None:
        """Why a hop's result is refused: a wrong number of carried outputs (`num_carried`; None: not
        checked, for a late result whose carried outputs are ignored), or any tensor of the wrong shape,
        dtype or with non-finite values."""
        if num_carried is not None and len(result.carried) != num_carried:
            return f"carried: {len(result.carried)} outputs, expected {num_carried}"
        shape, dtype = log.inputs[0].shape, decoded_dtype(self._wire_dtype)
        tensors = result.carried if num_carried else ()
        for index, hidden in enumerate([result.hidden, *tensors]):
            problem = result_problem(hidden, shape=shape, dtype=dtype)
            if problem is not None:
                return problem if index == 0 else f"carried[{index - 1}]: {problem}"
        return None

    def _measure(self, waiting: Waiting, stream: HopStream) -> None:
        """A decode step's time at one hop: from the previous hop's output (or the send) to this one's."""
        now = time.perf_counter()
        waiting.arrivals[stream.hop.end] = now
        if waiting.log.positions.shape[1] != 1:
            return  # prefills and replays are not comparable with decode steps
        started = waiting.sent_at if stream is waiting.expect[0] else waiting.arrivals.get(stream.hop.start)
        if started is not None:
            blocks = stream.hop.end - stream.hop.start
            self.swarm.stats.observe_step(stream.hop.peer_id, blocks, now - started)

    def _measure_carried(self, waiting: Waiting, result: HopResult) -> None:
        """A carried decode step's time at each hop, as each hop says it (`carried_seconds`, `seconds`): only
        routing estimates, so each is clamped to the step's whole time here; a wrong count says nothing."""
        now = time.perf_counter()
        for stream in waiting.expect:
            waiting.arrivals[stream.hop.end] = now
        seconds = [*result.carried_seconds, result.seconds]
        if waiting.log.positions.shape[1] != 1 or len(seconds) != len(waiting.expect):
            return
        elapsed = now - waiting.sent_at
        for stream, spent in zip(waiting.expect, seconds, strict=True):
            if math.isfinite(spent):
                blocks = stream.hop.end - stream.hop.start
                self.swarm.stats.observe_step(stream.hop.peer_id, blocks, min(max(spent, 0.0), elapsed))

    def on_error(self, stream: HopStream, error: peer_pb2.StepError) -> None:
        """A hop's StepError may blame itself or a later hop of the route (a failed push); naming any other
        peer is not believed, and the reporting hop takes the blame."""
        waiting = self._waiting.get(error.step_id)
        if waiting is None or waiting.done.done():
            return
        reporter = stream.hop.peer_id
        index = next((i for i, s in enumerate(self.streams) if s is stream), len(self.streams))
        if error.peer_id in {s.hop.peer_id for s in self.streams[index + 1 :]}:
            failure = PeerFailure(status_code(error.code), error.message, error.peer_id, relayed=True)
        else:
            if error.peer_id not in ("", reporter):
                logger.warning("step error blames a peer off the route peer=%s", short_id(reporter))
            failure = PeerFailure(status_code(error.code), error.message, reporter)
        waiting.done.set_exception(failure)

    def on_stream_end(self, stream: HopStream, failure: PeerFailure) -> None:
        if stream.closed:
            return
        for waiting in self._waiting.values():
            # a step this hop already passed on can still complete downstream
            passed = stream.hop.end in waiting.log.inputs
            if not passed and not waiting.done.done():
                waiting.done.set_exception(failure)

    async def aclose(self) -> None:
        self.closed = True
        self._sent.clear()
        streams, self.streams = self.streams, []
        for stream in streams:
            stream.send(peer_pb2.SessionRequest(close=peer_pb2.Close()))
            await stream.close()
        self.history.clear()
