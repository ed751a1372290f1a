"""The gRPC servicer: parses each request (`peer.requests`), drives the session table and the scheduler,
pushes step outputs to the next hop; errors become status codes in one place (`peer.status`)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from peer import requests, stateless, wire
from peer.adapters import gradient_messages
from peer.blocks import BatchItem, HostedSpan
from peer.config import PeerConfig
from peer.gradients import KeptGraphs
from peer.metrics import PeerMetrics
from peer.push_streams import IncomingPushStreams, PushStreams
from peer.pushes import PushBudget
from peer.replies import ReplyQueue
from peer.requests import Limits, PushRefused, Served
from peer.scheduler import Scheduler, StepWork
from peer.session_runtime import SessionRuntime, SessionRuntimes
from peer.sessions import PeerSession, SessionTable, log_id
from peer.stats import StepTimes, info_reply
from peer.status import RequestError, Status, aborts_on_error, encode_output, status_of
from protos import peer_pb2, peer_pb2_grpc, tls
from protos.channels import ChannelPool
from protos.errors import InvalidInputError
from protos.records import PeerRecord
from protos.relay import Unreachable
from protos.swarm_key import SwarmKey

logger = logging.getLogger(__name__)

OPEN_TIMEOUT = 30.0  # seconds a new stream may take to send its `open`
RETIRE_TIMEOUT = 2.0  # seconds retiring sessions waits for the steps they are running
CLOSE_TIMEOUT = 2.0  # seconds `close` waits for pushes under way before it cancels them


@dataclass(frozen=True)
class _End:
    """Ends a session stream: a normal close, or a failure with its status."""

    status: Status | None = None


_Replies = ReplyQueue[peer_pb2.SessionReply, _End]
_STALLED = _End(Status(grpc.StatusCode.RESOURCE_EXHAUSTED, "stream stalled: its replies were not read"))


class PeerService(peer_pb2_grpc.PeerServicer):
    """Serves one hosted span (swappable at run time, see `swap_span`) over the `Peer` gRPC service."""

    def __init__(
        self,
        *,
        span: HostedSpan,
        config: PeerConfig,
        sessions: SessionTable,
        scheduler: Scheduler,
        peer_id: str,
        make_record: Callable[[], PeerRecord],
        version: str,
        channels: ChannelPool | None = None,
        swarm_key: SwarmKey | None = None,
        metrics: PeerMetrics | None = None,
    ) -> None:
        self.span = span
        self.config = config
        self.limits = Limits.from_config(config)
        self.sessions = sessions
        self.runtimes = SessionRuntimes()  # each open session's lock, queued pushes and stream
        self.scheduler = scheduler
        self.peer_id = peer_id
        self.version = version
        self.make_record = make_record
        self.accepting = True
        self._owns_channels = channels is None
        self.channels = channels or ChannelPool(  # pushes carry the swarm token in a private swarm
            max_message_bytes=config.max_message_bytes, insecure=config.insecure, swarm_key=swarm_key
        )
        self._tasks: set[asyncio.Task[None]] = set()  # pushes out, pushed steps in
        self._stateless_in_flight = 0  # Forward/Backward calls admitted and not finished
        self.pushes = PushBudget.from_config(config)  # bytes of pushed steps waiting to run
        self.push_streams = PushStreams.from_config(self.channels, config)  # one per next peer
        self.incoming_pushes = IncomingPushStreams.from_config(config)  # other peers' push streams
        self.step_times = StepTimes()  # where inference steps spend their time (`Info`)
        # training forwards' graphs awaiting their Backward
        self.kept = KeptGraphs(max_bytes=config.max_kept_bytes, timeout=config.kept_timeout)
        self.metrics = metrics if metrics is not None else PeerMetrics(model=config.model_id)

    # ---- Session ---------------------------------------------------------------------------------

    async def Session(
        self, request_iterator: AsyncIterator[peer_pb2.SessionRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[peer_pb2.SessionReply]:
        rpc = asyncio.current_task()  # gRPC's task for this call: it writes the replies yielded here
        limit, timeout = self.config.max_queued_replies, self.config.stalled_stream_timeout
        replies: _Replies = ReplyQueue(
            limit, stall_timeout=timeout, stalled=_STALLED, on_stall=lambda: stalled()
        )
        opened: list[str] = []
        client = requests.client_key(context.peer())
        requests_ = wire.checked(request_iterator)
        reader = asyncio.create_task(self._read_session(requests_, replies, opened, client))

        def ended(_: object = None, *, reason: str = "stream ended") -> None:
            replies.end(_End())  # replies still waiting for room are dropped: nobody reads them
            reader.cancel()
            for session_id in opened:
                self.close_session(session_id, reason=reason)

        def stalled() -> None:  # its client reads nothing (see `ReplyQueue`): free everything the call holds
            ended(reason=f"stream stalled: no reply read for {timeout:.0f}s")
            if rpc is not None:  # always: gRPC runs each call in a task
                rpc.cancel()

        # the RPC's end frees the sessions even when gRPC abandons this generator at a `yield` (a client that
        # went away while a reply was being written): its `finally` would then wait for garbage collection
        context.add_done_callback(ended)
        try:
            while True:
                item = await replies.get()
                if isinstance(item, _End):
                    if item.status is not None:
                        await context.abort(*item.status)
                    return
                yield item
        finally:
            ended()
            await asyncio.gather(reader, return_exceptions=True)

    async def _read_session(
        self,
        stream: AsyncIterator[peer_pb2.SessionRequest],
        replies: _Replies,
        opened: list[str],
        client: str,
    ) -> None:
        try:
            first = await asyncio.wait_for(anext(stream), OPEN_TIMEOUT)
            if first.WhichOneof("kind") != "open":
                raise InvalidInputError("the first message of a session must be open")
            session, runtime = self._open(first.open, replies, client)
            opened.append(session.session_id)
            await replies.put(
                peer_pb2.SessionReply(
                    opened=peer_pb2.Opened(session_id=session.session_id, max_length=session.max_length)
                )
            )
            async for request in stream:
                kind = request.WhichOneof("kind")
                if kind == "close":
                    break
                if kind == "reroute":
                    blocks = self.span.anatomy.num_blocks
                    hops = requests.parse_reroute(request.reroute, end=session.end, num_blocks=blocks)
                    async with runtime.lock:  # after the steps already queued
                        session.next_hops = list(hops)
                    logger.info(
                        "session reroute id=%s next=%r", log_id(session.session_id), [h.address for h in hops]
                    )
                    continue
                if kind != "step":
                    raise InvalidInputError(f"unexpected {kind} in an open session")
                await self._step_or_report(session, runtime, request.step)
            replies.end(_End())
        except (StopAsyncIteration, grpc.aio.AbortError):  # the client's end, or ours (preempted, retired)
            replies.end(_End())
        except asyncio.CancelledError:
            raise
        except Exception as e:  # every failure ends the stream with its status
            replies.end(_End(status_of(e)))

    def _open(
        self, request: peer_pb2.OpenSession, replies: _Replies, client: str
    ) -> tuple[PeerSession, SessionRuntime]:
        if not self.accepting:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "peer is draining: it takes no new sessions")
        span = self.span
        parsed = requests.parse_open(request, served=Served.of(span), limits=self.limits)
        session = PeerSession(
            session_id=parsed.session_id,
            client=client,
            start=parsed.start,
            end=parsed.end,
            batch_size=parsed.batch_size,
            max_length=parsed.max_length,
            wire_dtype=parsed.wire_dtype,
            next_hops=list(parsed.next_hops),
            report_outputs=parsed.report_outputs,
            push_token=parsed.push_token,
            adapter=parsed.adapter,
        )
        # raises NoRoom / SessionExists before anything is allocated; when full, may preempt an idle squatter
        victims = self.sessions.open(session, busy=self._busy)
        runtime = SessionRuntime(reply=replies.put, finish=replies.end)
        self.runtimes.add(session.session_id, runtime)
        for victim in victims:
            reason = "preempted: this peer is full and its sessions are shared out evenly between networks"
            self._ended(victim, Status(grpc.StatusCode.RESOURCE_EXHAUSTED, reason))
        session.span = span
        try:
            session.cache = span.new_cache(start=parsed.start, end=parsed.end)
        except BaseException:  # the stream ends with its status, so nothing else would close the session
            self.close_session(session.session_id, reason="its cache could not be allocated")
            raise
        return session, runtime

    def _busy(self, session: PeerSession) -> bool:
        """A step of `session` is under way or pushed steps wait to run: not preemptible for a new session."""
        runtime = self.runtimes.get(session.session_id)
        return runtime is not None and runtime.busy()

    def _stepping(self, session: PeerSession) -> bool:
        """A step of `session` is under way: its pages cannot be taken for another's step."""
        runtime = self.runtimes.get(session.session_id)
        return runtime is not None and runtime.stepping()

    def _ended(self, session: PeerSession, status: Status | None) -> None:
        """`session` was closed in the session table: drop its runtime (cancelling its queued pushed steps)
        and end its stream with `status` (its client fails over)."""
        runtime = self.runtimes.drop(session.session_id)
        if runtime is not None:
            runtime.finish(_End(status))

    def close_session(self, session_id: str, *, reason: str) -> PeerSession | None:
        """Close a session and drop its runtime (its stream is not ended here); None if it was not open."""
        session = self.sessions.close(session_id, reason=reason)
        self.runtimes.drop(session_id)
        return session

    # ---- steps -------------------------------------------------------------------------------------

    async def _step_or_report(
        self, session: PeerSession, runtime: SessionRuntime, step: peer_pb2.Step, *, pushed: bool = False
    ) -> None:
        """Run a step (`pushed` by the previous hop, or the client's own); a failure is reported on the
        session's stream and leaves the session as it was."""
        deadline = requests.step_deadline(step, time.monotonic())  # counted from its arrival here
        session.touch()  # a step waiting for its turn keeps its session from expiring as idle
        try:
            await self._step(session, runtime, step, deadline, time.perf_counter(), pushed=pushed)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # reported to the client, the session stays usable
            await runtime.reply(self._step_error(step.step_id, e))

    async def _step(
        self,
        session: PeerSession,
        runtime: SessionRuntime,
        step: peer_pb2.Step,
        deadline: float | None,
        arrived: float,
        *,
        pushed: bool,
    ) -> None:
        """parse -> enqueue -> await -> push/reply: the push goes out before anything else is done for the
        step, the reply (a reported output, or the last hop's result) after it."""
        async with runtime.lock:
            span = self._live_span(session)
            started = time.perf_counter()
            parsed = requests.parse_step(
                step, session=session, served=Served.of(span), limits=self.limits, pushed=pushed
            )
            work = self._work(session, span, parsed)
            decoded = time.perf_counter()
            output = await self.scheduler.prefill(
                work,
                chunk_tokens=self.config.prefill_chunk_tokens,
                lone_chunk_tokens=self.config.compute_chunk_tokens,
                deadline=deadline,
            )
            computed = time.perf_counter()
            hidden = encode_output(output, session.wire_dtype)  # serialized once for the push and the reply
            encoded = time.perf_counter()
            result = self._push_or_result(session, runtime, step, hidden, deadline, seconds=encoded - arrived)
            session.position = parsed.base + parsed.hidden.shape[1]
            session.attention_mask = parsed.attention_mask
            session.touch()
            if result is not None:
                result.position = session.position
                # under the lock: replies keep the steps' order, and a client that does not read its
                # stream stalls its own session once the stream's queue is full
                await runtime.reply(peer_pb2.SessionReply(result=result))
            self._count(work, parsed, arrived, started, decoded, computed, encoded)

    def _live_span(self, session: PeerSession) -> HostedSpan:
        span, cache = session.span, session.cache
        if self.sessions.get(session.session_id) is not session or span is None or cache is None:
            raise RequestError(grpc.StatusCode.NOT_FOUND, "the session is closed")
        return span

    def _work(self, session: PeerSession, span: HostedSpan, parsed: requests.StepRequest) -> StepWork:
        """The scheduler's job for a parsed step, after making room for its positions in the cache."""
        cache = session.cache
        if cache is None:  # checked by `_live_span` under the same lock
            raise RequestError(grpc.StatusCode.NOT_FOUND, "the session is closed")
        hidden = parsed.hidden.to(span.dtype)
        self._make_room(session, parsed.base + hidden.shape[1])

        def prepare() -> None:
            cache.rollback(parsed.base)  # also trims sliding layers to their window
            if parsed.beam_indices is not None:
                cache.reorder_cache(parsed.beam_indices)

        item = BatchItem(hidden, cache, parsed.position_ids, parsed.attention_mask, session.adapter)
        return StepWork(span, session.start, session.end, item, prepare)

    def _push_or_result(
        self,
        session: PeerSession,
        runtime: SessionRuntime,
        step: peer_pb2.Step,
        hidden: peer_pb2.Tensor,
        deadline: float | None,
        *,
        seconds: float,
    ) -> peer_pb2.StepResult | None:
        """Push the step's output `hidden` on (its write is issued before this returns), carrying the earlier
        hops' outputs and this one's unless the step is reported; return what this hop replies to the
        client: its reported output, the last hop's result (with every carried output), or None."""
        report = step.report_outputs or session.report_outputs
        if session.next_hops and not step.local_only:
            hop = session.next_hops[0]
            pushed = peer_pb2.Step(
                session_id=hop.session_id,
                step_id=step.step_id,
                position=step.position,
                hidden=hidden,
                position_ids=step.position_ids,
                beam_indices=step.beam_indices,  # an unset tensor stays unset (no dtype)
                attention_mask=step.attention_mask,
                report_outputs=report,
            )
            if step.HasField("rollback_to"):
                pushed.rollback_to = step.rollback_to
            if deadline is not None:  # what is left of the client's wait goes on with the step
                pushed.timeout_ms = max(int((deadline - time.monotonic()) * 1000), 1)
            if not report:  # the earlier hops' outputs stay messages: never decoded here
                pushed.carried.extend(step.carried)
                pushed.carried.append(hidden)
                pushed.carried_seconds.extend(step.carried_seconds)
                pushed.carried_seconds.append(seconds)
                if pushed.ByteSize() > self.limits.max_message_bytes:  # what the next hop would refuse
                    raise InvalidInputError(
                        f"the step's carried outputs pass max_message_bytes {self.limits.max_message_bytes}: "
                        "a step this long must set report_outputs"
                    )
            self._push(session, runtime, pushed, hop)
            return (
                peer_pb2.StepResult(step_id=step.step_id, hidden=hidden, peer_id=self.peer_id)
                if report
                else None
            )
        return peer_pb2.StepResult(
            step_id=step.step_id,
            hidden=hidden,
            peer_id=self.peer_id,
            carried=step.carried,  # copied as messages, never decoded
            carried_seconds=step.carried_seconds,
            seconds=seconds,
        )

    def _count(
        self,
        work: StepWork,
        parsed: requests.StepRequest,
        arrived: float,
        started: float,
        decoded: float,
        computed: float,
        encoded: float,
    ) -> None:
        """Where one step spent its time (`Info`) and the step metrics, once it is out."""
        wait, replied = started - arrived + computed - decoded - work.computed, time.perf_counter()
        self.step_times.add(
            steps=1,
            decode=decoded - started,
            wait=wait,
            compute=work.computed,
            encode=encoded - computed,
            report=replied - encoded,
        )
        batch, length = parsed.hidden.shape[:2]
        # from position 0: a prompt (or its replay); later steps generate (decode, speculative drafts)
        prompt = parsed.base == 0
        self.metrics.step(tokens=batch * length, prompt=prompt, wait=wait, seconds=replied - arrived)

    def _make_room(self, session: PeerSession, positions: int) -> None:
        """Pages for `positions` cached positions of `session`; the sessions preempted for them end with
        RESOURCE_EXHAUSTED, so their clients move them to another peer and replay."""
        for victim in self.sessions.resize(session, positions, busy=self._stepping):
            reason = "preempted: this peer ran out of cache pages"
            self._ended(victim, Status(grpc.StatusCode.RESOURCE_EXHAUSTED, reason))

    def _step_error(
        self, step_id: int, error: BaseException, *, peer_id: str | None = None
    ) -> peer_pb2.SessionReply:
        code, message, _ = status_of(error)
        error_message = peer_pb2.StepError(step_id=step_id, code=code.value[0], message=message)
        error_message.peer_id = peer_id or self.peer_id
        return peer_pb2.SessionReply(error=error_message)

    async def _reply(self, runtime: SessionRuntime, reply: peer_pb2.SessionReply) -> None:
        await runtime.reply(reply)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ---- Push --------------------------------------------------------------------------------------

    def _push(
        self, session: PeerSession, runtime: SessionRuntime, pushed: peer_pb2.Step, hop: peer_pb2.Hop
    ) -> None:
        """Start delivering `pushed` to the next hop `hop`: the call is issued before this returns (its
        write is the next thing the loop runs); a failure reaches the session's client as a StepError
        naming the next hop."""
        step_id = pushed.step_id
        try:
            if not self.channels.insecure and not tls.binds(hop.certificate, hop.peer_id):
                raise RequestError(
                    grpc.StatusCode.UNAUTHENTICATED, "next hop's certificate is not its peer's"
                )
            request = peer_pb2.PushRequest(step=pushed, push_token=hop.push_token)
            started = time.perf_counter()
            if (
                self.config.push_stream
            ):  # a frame on the stream to that peer: no call, no answer unless refused
                fail = functools.partial(self._push_failed, runtime, step_id, hop)
                self.push_streams.push(hop, request, fail)
                self.metrics.pushed(pushed)
                self.step_times.add(push=time.perf_counter() - started)  # queued for the stream's writer
                return
            relay = (hop.peer_id, tuple(hop.relay_maddrs)) if hop.relay_maddrs else None
            stub = self.channels.stub(hop.address, hop.certificate, relay=relay)
            call = stub.Push(request, timeout=self.config.step_timeout)
        except RequestError as e:
            self._spawn(self._reply(runtime, self._step_error(step_id, e, peer_id=hop.peer_id)))
            return
        except Unreachable as e:  # a relayed next hop, and this peer has no libp2p node (in-process tests)
            error = RequestError(grpc.StatusCode.UNAVAILABLE, str(e))
            self._spawn(self._reply(runtime, self._step_error(step_id, error, peer_id=hop.peer_id)))
            return
        self.metrics.pushed(pushed)
        self._spawn(self._delivered(session, runtime, call, step_id, hop, started))

    async def _delivered(
        self,
        session: PeerSession,
        runtime: SessionRuntime,
        call: Awaitable[peer_pb2.PushReply],
        step_id: int,
        hop: peer_pb2.Hop,
        started: float,
    ) -> None:
        """Wait for a push's answer; a refusal or a failure goes to the session's client."""
        try:
            await call
            self.step_times.add(push=time.perf_counter() - started)
        except Unreachable as e:
            error = RequestError(grpc.StatusCode.UNAVAILABLE, str(e))
            await runtime.reply(self._step_error(step_id, error, peer_id=hop.peer_id))
        except grpc.aio.AioRpcError as e:
            logger.warning(
                "push failed session=%s step=%d next=%r code=%s",
                log_id(session.session_id),
                step_id,
                hop.address,
                e.code(),
            )
            # the next hop's own text stays in this peer's log: echoed, it would map the peer's network
            error = RequestError(e.code(), f"push to the next hop failed: {e.code().name}")
            await runtime.reply(self._step_error(step_id, error, peer_id=hop.peer_id))

    def _push_failed(
        self, runtime: SessionRuntime, step_id: int, hop: peer_pb2.Hop, code: grpc.StatusCode, message: str
    ) -> None:
        """A frame on a push stream was refused or lost with its stream: the session's client hears it."""
        error = RequestError(code, message)
        self._spawn(self._reply(runtime, self._step_error(step_id, error, peer_id=hop.peer_id)))

    @aborts_on_error
    async def Push(
        self, request: peer_pb2.PushRequest, context: grpc.aio.ServicerContext
    ) -> peer_pb2.PushReply:
        await self._accept_push(request)
        return peer_pb2.PushReply()

    async def PushStream(
        self,
        request_iterator: AsyncIterator[peer_pb2.PushRequest | wire.Refused],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[peer_pb2.PushNack]:
        """Pushes from one previous peer, one frame per step: each admitted like a Push, each refusal a nack
        (`peer.push_streams`)."""
        async for nack in self.incoming_pushes.serve(request_iterator, context, self._accept_push):
            yield nack

    async def _accept_push(self, request: peer_pb2.PushRequest) -> None:
        """Admit one pushed step (a Push, or a frame of a PushStream) and queue it behind the session's
        earlier steps; a refusal raises and changes nothing."""
        session_id, token = requests.parse_push(request)
        session, runtime = self.sessions.get(session_id), self.runtimes.get(session_id)
        # an unknown id and a wrong token get the same answer: a push tells a stranger nothing
        if (
            session is None
            or runtime is None
            or not session.push_token
            or not hmac.compare_digest(token, session.push_token)
        ):
            raise PushRefused("push refused")
        nbytes = self.pushes.admit(session, runtime, request, hidden_size=self.span.hidden_size)
        # accepted: the step runs in order behind the session's earlier steps, and a failure goes to the
        # client on this hop's stream, so the sender waits only for delivery, never for compute
        task = self._spawn(self._step_or_report(session, runtime, request.step, pushed=True))
        self.pushes.queued(session, runtime, task, nbytes)

    # ---- Forward / Backward / Info -------------------------------------------------------------------

    @aborts_on_error
    async def Forward(
        self, request: peer_pb2.ForwardRequest, context: grpc.aio.ServicerContext
    ) -> peer_pb2.ForwardReply:
        span = self.span  # the hosted span may be swapped at run time: one span per request
        with self._admitted():
            parsed = requests.parse_forward(request, served=Served.of(span), limits=self.limits)
            chunk_tokens, remaining = self.config.compute_chunk_tokens, context.time_remaining()
            token = b""
            batch, seq = parsed.hidden.shape[:2]
            if parsed.keep and self.kept.max_bytes and batch * seq <= chunk_tokens:  # one piece: keep it
                output, token = await stateless.forward_kept(
                    self.scheduler, span, parsed, self.kept, remaining=remaining
                )
            else:
                output = await stateless.forward(
                    self.scheduler, span, parsed, chunk_tokens=chunk_tokens, remaining=remaining
                )
            applied = len(parsed.lora.modules) if parsed.trainable and parsed.lora is not None else 0
            return peer_pb2.ForwardReply(
                hidden=encode_output(output, parsed.reply_dtype), lora_modules=applied, backward_token=token
            )

    @aborts_on_error
    async def Backward(
        self, request: peer_pb2.BackwardRequest, context: grpc.aio.ServicerContext
    ) -> peer_pb2.BackwardReply:
        """Gradients of a stateless Forward: the peer backpropagates through the forward's graph when it kept
        it for this very input (`peer.gradients`), else recomputes the forward first; it keeps nothing."""
        span = self.span
        with self._admitted():
            parsed = requests.parse_backward(request, served=Served.of(span), limits=self.limits)
            limits = {"chunk_tokens": self.config.compute_chunk_tokens, "remaining": context.time_remaining()}
            grad_lora: list[peer_pb2.LoraModule] = []
            graph = stateless.kept_graph(span, parsed, self.kept)
            if graph is not None:
                grad_input, grad_prompts, grads = await stateless.backprop_kept(
                    self.scheduler, span, parsed, graph, remaining=limits["remaining"]
                )
                if parsed.trainable and parsed.lora is not None:
                    grad_lora = gradient_messages(parsed.lora, grads)
            elif parsed.trainable and parsed.lora is not None:
                grad_input, grad_prompts, grads = await stateless.lora_backward(
                    self.scheduler, span, parsed, **limits
                )
                grad_lora = gradient_messages(parsed.lora, grads)
            else:
                grad_input, grad_prompts = await stateless.backward(self.scheduler, span, parsed, **limits)
            reply = peer_pb2.BackwardReply(grad_input=encode_output(grad_input, parsed.hidden.dtype))
            reply.grad_lora.extend(grad_lora)
            if grad_prompts is not None and parsed.prompts is not None:
                reply.grad_prompts.CopyFrom(encode_output(grad_prompts, parsed.prompts.dtype))
            return reply

    @contextlib.contextmanager
    def _admitted(self) -> Iterator[None]:
        """Admits one Forward/Backward before its tensors are decoded, at most `max_stateless_in_flight`."""
        if self._stateless_in_flight >= self.config.max_stateless_in_flight:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED, "too many forward/backward calls under way"
            )
        self._stateless_in_flight += 1
        try:
            yield
        finally:
            self._stateless_in_flight -= 1

    async def Info(
        self, request: peer_pb2.InfoRequest, context: grpc.aio.ServicerContext
    ) -> peer_pb2.InfoReply:
        return info_reply(self)

    # ---- lifecycle ---------------------------------------------------------------------------------

    def swap_span(self, span: HostedSpan) -> tuple[HostedSpan, list[PeerSession]]:
        """Serve `span` from now on; returns the old span and the sessions still open on it."""
        old, self.span = self.span, span
        self.kept.clear()  # graphs of the old span's blocks: their Backward recomputes on the new span
        sessions = [s for sid in self.sessions.session_ids() if (s := self.sessions.get(sid)) is not None]
        return old, [session for session in sessions if session.span is old]

    async def retire(
        self, sessions: list[PeerSession], reason: str, *, timeout: float = RETIRE_TIMEOUT
    ) -> None:
        """End sessions this peer no longer serves (a move, a drain): each finishes the step it is running
        (within `timeout` seconds for all), then its client gets UNAVAILABLE and fails over."""
        deadline = asyncio.get_running_loop().time() + timeout
        for session in sessions:
            runtime, locked = self.runtimes.get(session.session_id), False
            if runtime is not None:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout_at(deadline):
                        locked = await runtime.lock.acquire()
            try:
                if self.sessions.close(session.session_id, reason=reason) is not None:
                    self._ended(session, Status(grpc.StatusCode.UNAVAILABLE, reason))
            finally:
                if runtime is not None and locked:
                    runtime.lock.release()

    async def retire_all(self, reason: str, *, timeout: float = RETIRE_TIMEOUT) -> None:
        await self.retire(
            [s for i in self.sessions.session_ids() if (s := self.sessions.get(i))], reason, timeout=timeout
        )

    def expire_idle(self) -> None:
        for session, reason in self.sessions.expire():
            self._ended(session, Status(grpc.StatusCode.NOT_FOUND, f"session expired: {reason}"))

    async def close(self, *, timeout: float = CLOSE_TIMEOUT) -> None:
        """Wait at most `timeout` seconds for pushes under way, cancel the rest; end the push streams
        (within `timeout` too) and close the channels."""
        tasks = list(self._tasks)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await self.push_streams.close(timeout=timeout)
        if self._owns_channels:
            await self.channels.close()
