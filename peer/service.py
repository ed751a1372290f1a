"""The gRPC servicer: validates every request, drives the session table and the executor, pushes step
outputs to the next hop, and maps errors to status codes in one place (`_status`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import torch

from peer.blocks import HostedSpan
from peer.cache import NoRoom, PeerSession, SessionExists, SessionTable
from peer.config import PeerConfig
from peer.executor import Executor
from protos import peer_pb2, peer_pb2_grpc
from protos.errors import InvalidInputError
from protos.records import PeerRecord
from protos.tensors import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    dtype_from_name,
    dtype_name,
    from_message,
    optional_from_message,
)
from protos.tensors import to_message as tensor_message

logger = logging.getLogger(__name__)

MAX_SESSION_ID_CHARS = 128
OPEN_TIMEOUT = 30.0  # seconds a new stream may take to send its `open`


class RequestError(Exception):
    """A request that fails with a given status; nothing was changed."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def _status(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The one place that maps failures to gRPC status codes (see the contract in protos/peer.proto)."""
    if isinstance(error, RequestError):
        return error.code, str(error)
    if isinstance(error, InvalidInputError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(error)
    if isinstance(error, NoRoom):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(error)
    if isinstance(error, SessionExists):
        return grpc.StatusCode.ALREADY_EXISTS, str(error)
    if isinstance(error, asyncio.TimeoutError | TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "timed out"
    logger.error("internal error while serving a request", exc_info=error)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}"


@dataclass(frozen=True)
class _End:
    """Ends a session stream, with a status when it is not a normal close."""

    code: grpc.StatusCode | None = None
    message: str = ""


class PeerService(peer_pb2_grpc.PeerServicer):
    def __init__(
        self,
        *,
        span: HostedSpan,
        config: PeerConfig,
        sessions: SessionTable,
        executor: Executor,
        peer_id: str,
        make_record: Callable[[], PeerRecord],
        version: str,
    ) -> None:
        self.span = span
        self.config = config
        self.sessions = sessions
        self.executor = executor
        self.peer_id = peer_id
        self.version = version
        self.make_record = make_record
        self.accepting = True
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[str, peer_pb2_grpc.PeerStub] = {}
        self._tasks: set[asyncio.Task[None]] = set()  # pushes out, pushed steps in

    # ---- Session ---------------------------------------------------------------------------------

    async def Session(
        self, request_iterator: AsyncIterator[peer_pb2.SessionRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[peer_pb2.SessionReply]:
        replies: asyncio.Queue[peer_pb2.SessionReply | _End] = asyncio.Queue()
        opened: list[str] = []
        reader = asyncio.create_task(self._read_session(request_iterator, replies, opened))
        try:
            while True:
                item = await replies.get()
                if isinstance(item, _End):
                    if item.code is not None:
                        await context.abort(item.code, item.message)
                    return
                yield item
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            for session_id in opened:
                self.sessions.close(session_id, reason="stream ended")

    async def _read_session(
        self,
        requests: AsyncIterator[peer_pb2.SessionRequest],
        replies: asyncio.Queue[peer_pb2.SessionReply | _End],
        opened: list[str],
    ) -> None:
        try:
            first = await asyncio.wait_for(anext(requests), OPEN_TIMEOUT)
            if first.WhichOneof("kind") != "open":
                raise RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT, "the first message of a session must be open"
                )
            session = self._open(first.open, replies.put_nowait)
            opened.append(session.session_id)
            replies.put_nowait(
                peer_pb2.SessionReply(
                    opened=peer_pb2.Opened(session_id=session.session_id, max_length=session.max_length)
                )
            )
            async for request in requests:
                kind = request.WhichOneof("kind")
                if kind == "close":
                    break
                if kind == "reroute":
                    hops = self._check_hops(session.end, list(request.reroute.next_hops))
                    async with session.lock:  # after the steps already queued
                        session.next_hops = hops
                    logger.info(
                        "session reroute id=%s next=%s", session.session_id, [h.address for h in hops]
                    )
                    continue
                if kind != "step":
                    raise RequestError(
                        grpc.StatusCode.INVALID_ARGUMENT, f"unexpected {kind} in an open session"
                    )
                if request.step.session_id not in ("", session.session_id):
                    error = RequestError(grpc.StatusCode.INVALID_ARGUMENT, "step for another session")
                    session.reply(self._step_error(request.step.step_id, error))
                    continue
                await self._step_or_report(session, request.step)
            replies.put_nowait(_End())
        except StopAsyncIteration:
            replies.put_nowait(_End())
        except asyncio.CancelledError:
            raise
        except Exception as e:  # every failure ends the stream with its status
            code, message = _status(e)
            replies.put_nowait(_End(code, message))

    def _open(self, request: peer_pb2.OpenSession, reply: Callable[[Any], None]) -> PeerSession:
        if not self.accepting:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "peer is draining: it takes no new sessions")
        session_id = request.session_id
        if not session_id or len(session_id) > MAX_SESSION_ID_CHARS or not session_id.isprintable():
            raise InvalidInputError(f"session_id must be 1..{MAX_SESSION_ID_CHARS} printable characters")
        start, end = self._check_span(request.start, request.end)
        if not 1 <= request.batch_size <= self.config.max_batch_size:
            raise InvalidInputError(
                f"batch_size {request.batch_size} is outside 1..{self.config.max_batch_size}"
            )
        if not 1 <= request.max_length <= self.config.max_length:
            raise InvalidInputError(f"max_length {request.max_length} is outside 1..{self.config.max_length}")
        if request.dtype and request.dtype not in ("float32", "float16", "bfloat16"):
            raise InvalidInputError(f"unknown wire dtype {request.dtype!r}")
        hops = self._check_hops(end, list(request.next_hops))
        session = PeerSession(
            session_id=session_id,
            start=start,
            end=end,
            batch_size=request.batch_size,
            max_length=request.max_length,
            cache=None,
            next_hops=hops,
            reply=reply,
            wire_dtype=dtype_from_name(request.dtype or dtype_name(self.span.dtype)),
            report_outputs=request.report_outputs,
        )
        self.sessions.open(session)  # raises NoRoom / SessionExists before anything is allocated
        session.span = self.span
        session.cache = self.span.new_cache(start=start, end=end)
        return session

    def _check_hops(self, end: int, hops: list[peer_pb2.Hop]) -> list[peer_pb2.Hop]:
        if len(hops) > self.span.anatomy.num_blocks:
            raise InvalidInputError("more next hops than blocks in the model")
        previous_end = end
        for hop in hops:
            if hop.start != previous_end or hop.end <= hop.start or hop.end > self.span.anatomy.num_blocks:
                raise InvalidInputError(
                    f"next hops must continue the route: expected a span from {previous_end}, "
                    f"got [{hop.start}, {hop.end})"
                )
            _check_address(hop.address)
            previous_end = hop.end
        return hops

    # ---- steps -------------------------------------------------------------------------------------

    async def _step_or_report(self, session: PeerSession, step: peer_pb2.Step) -> None:
        """Run a step; a failure is reported on the session's stream and leaves the session as it was."""
        try:
            await self._step(session, step)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # reported to the client, the session stays usable
            session.reply(self._step_error(step.step_id, e))

    async def _step(self, session: PeerSession, step: peer_pb2.Step) -> None:
        async with session.lock:
            if self.sessions.get(session.session_id) is not session:
                raise RequestError(grpc.StatusCode.NOT_FOUND, f"session {session.session_id!r} is closed")
            hidden, positions, beam, base = self._check_step(session, step)
            seq = hidden.shape[1]

            def compute() -> torch.Tensor:
                if base != session.position:
                    session.cache.crop(base - session.position)
                if beam is not None:
                    session.cache.reorder_cache(beam)
                return session.span.forward(
                    hidden, session.cache, positions, start=session.start, end=session.end
                )

            output = await self.executor.run(compute)
            session.position = base + seq
            session.touch()
        push = bool(session.next_hops) and not step.local_only
        hidden_message = tensor_message(output, dtype=session.wire_dtype)  # serialized once for both uses
        if push:
            task = asyncio.create_task(self._push(session, step, hidden_message, session.next_hops[0]))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if not push or session.report_outputs:  # the report goes out before the push can fail
            session.reply(
                peer_pb2.SessionReply(
                    result=peer_pb2.StepResult(
                        step_id=step.step_id,
                        hidden=hidden_message,
                        position=session.position,
                        peer_id=self.peer_id,
                    )
                )
            )

    def _check_step(
        self, session: PeerSession, step: peer_pb2.Step
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, int]:
        """Decode and validate a step before anything changes; returns (hidden, positions, beam, base)."""
        max_bytes = self.config.max_message_bytes
        hidden = from_message(
            step.hidden, max_bytes=max_bytes, expected_dtypes=FLOAT_DTYPES, expected_ndim=3, name="hidden"
        )
        batch, seq, width = hidden.shape
        if batch != session.batch_size:
            raise InvalidInputError(
                f"hidden batch {batch} does not match the session's batch {session.batch_size}"
            )
        if width != self.span.hidden_size:
            raise InvalidInputError(f"hidden size {width} does not match the model's {self.span.hidden_size}")
        if seq < 1:
            raise InvalidInputError("a step needs at least one new position")
        base = session.position
        if step.HasField("rollback_to"):
            if step.rollback_to > session.position:
                raise InvalidInputError(
                    f"rollback_to {step.rollback_to} is past the cache's {session.position} positions"
                )
            base = step.rollback_to
        if step.position != base:
            raise RequestError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"step starts at position {step.position} but the cache holds {base} positions",
            )
        if base + seq > session.max_length:
            raise InvalidInputError(
                f"{base + seq} positions exceed the session's max_length {session.max_length}"
            )
        positions = optional_from_message(
            step.position_ids,
            max_bytes=max_bytes,
            expected_dtypes=INDEX_DTYPES,
            expected_ndim=2,
            name="position_ids",
        )
        if positions is not None and tuple(positions.shape) != (batch, seq):
            raise InvalidInputError(f"position_ids must be [{batch}, {seq}], got {list(positions.shape)}")
        if positions is not None and (positions.min() < 0 or positions.max() >= self.config.max_length):
            raise InvalidInputError("position_ids are outside 0..max_length")
        beam = optional_from_message(
            step.beam_indices,
            max_bytes=max_bytes,
            expected_dtypes=INDEX_DTYPES,
            expected_ndim=1,
            name="beam_indices",
        )
        if beam is not None and (beam.shape[0] != batch or beam.min() < 0 or beam.max() >= batch):
            raise InvalidInputError(f"beam_indices must be {batch} indices in 0..{batch - 1}")
        return hidden.to(self.span.dtype), positions, beam, base

    def _step_error(
        self, step_id: int, error: BaseException, *, peer_id: str | None = None
    ) -> peer_pb2.SessionReply:
        code, message = _status(error)
        return peer_pb2.SessionReply(
            error=peer_pb2.StepError(
                step_id=step_id, code=code.value[0], message=message, peer_id=peer_id or self.peer_id
            )
        )

    # ---- Push --------------------------------------------------------------------------------------

    async def _push(
        self, session: PeerSession, step: peer_pb2.Step, hidden: peer_pb2.Tensor, hop: peer_pb2.Hop
    ) -> None:
        pushed = peer_pb2.Step(
            session_id=hop.session_id or session.session_id,
            step_id=step.step_id,
            position=step.position,
            hidden=hidden,
            position_ids=step.position_ids,
        )
        if step.HasField("rollback_to"):
            pushed.rollback_to = step.rollback_to
        if step.HasField("beam_indices"):
            pushed.beam_indices.CopyFrom(step.beam_indices)
        try:
            await self._stub(hop.address).Push(
                peer_pb2.PushRequest(step=pushed), timeout=self.config.step_timeout
            )
        except grpc.aio.AioRpcError as e:
            logger.warning(
                "push failed session=%s step=%d next=%s code=%s",
                session.session_id,
                step.step_id,
                hop.address,
                e.code(),
            )
            error = RequestError(e.code(), f"push to {hop.address} failed: {e.details()}")
            session.reply(self._step_error(step.step_id, error, peer_id=hop.peer_id))

    async def Push(
        self, request: peer_pb2.PushRequest, context: grpc.aio.ServicerContext
    ) -> peer_pb2.PushReply:
        session = self.sessions.get(request.step.session_id)
        if session is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown session {request.step.session_id!r}")
        else:
            # accepted: the step runs in order behind the session's earlier steps, and a failure goes to
            # the client on this hop's stream, so the sender waits only for delivery, never for compute
            task = asyncio.create_task(self._step_or_report(session, request.step))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return peer_pb2.PushReply()

    def _stub(self, address: str) -> peer_pb2_grpc.PeerStub:
        if address not in self._stubs:
            size = self.config.max_message_bytes
            channel = grpc.aio.insecure_channel(
                address,
                options=[("grpc.max_send_message_length", size), ("grpc.max_receive_message_length", size)],
            )
            self._channels[address] = channel
            self._stubs[address] = peer_pb2_grpc.PeerStub(channel)
        return self._stubs[address]

    # ---- Forward / Backward / Info -------------------------------------------------------------------

    async def Forward(
        self, request: peer_pb2.ForwardRequest, context: grpc.aio.ServicerContext
    ) -> peer_pb2.ForwardReply:
        try:
            span = self.span  # the hosted span may be swapped at run time: one span per request
            start, end = self._check_span(request.start, request.end)
            hidden = self._stateless_tensor(request.hidden, "hidden")
            self._check_stateless_size(hidden, span)
            prompts = self._optional_prompts(request, "prompts")
            wire = hidden.dtype
            output = await self.executor.run(
                lambda: span.forward(
                    hidden.to(span.dtype),
                    start=start,
                    end=end,
                    prompts=None if prompts is None else prompts.to(span.dtype),
                )
            )
            return peer_pb2.ForwardReply(hidden=tensor_message(output, dtype=wire))
        except Exception as e:  # mapped to a status in one place
            code, message = _status(e)
            await context.abort(code, message)
            raise  # unreachable: abort raises

    async def Backward(
        self, request: peer_pb2.BackwardRequest, context: grpc.aio.ServicerContext
    ) -> peer_pb2.BackwardReply:
        """Gradients of a stateless Forward: the peer recomputes the span's forward and keeps nothing."""
        try:
            span = self.span
            start, end = self._check_span(request.start, request.end)
            hidden = self._stateless_tensor(request.hidden, "hidden")
            self._check_stateless_size(hidden, span)
            grad_output = self._stateless_tensor(request.grad_output, "grad_output")
            if grad_output.shape != hidden.shape:
                raise InvalidInputError(
                    f"grad_output shape {list(grad_output.shape)} does not match hidden {list(hidden.shape)}"
                )
            prompts = self._optional_prompts(request, "prompts")
            wire = hidden.dtype

            def compute() -> tuple[torch.Tensor, torch.Tensor | None]:
                return span.backward(
                    hidden.to(span.dtype),
                    grad_output.to(span.dtype),
                    start=start,
                    end=end,
                    prompts=None if prompts is None else prompts.to(span.dtype),
                )

            grad_input, grad_prompts = await self.executor.run(compute)
            reply = peer_pb2.BackwardReply(grad_input=tensor_message(grad_input, dtype=wire))
            if grad_prompts is not None and prompts is not None:
                reply.grad_prompts.CopyFrom(tensor_message(grad_prompts, dtype=prompts.dtype))
            return reply
        except Exception as e:  # mapped to a status in one place
            code, message = _status(e)
            await context.abort(code, message)
            raise  # unreachable: abort raises

    def _stateless_tensor(self, message: peer_pb2.Tensor, name: str) -> torch.Tensor:
        return from_message(
            message,
            max_bytes=self.config.max_message_bytes,
            expected_dtypes=FLOAT_DTYPES,
            expected_ndim=3,
            name=name,
        )

    def _check_stateless_size(self, hidden: torch.Tensor, span: HostedSpan) -> None:
        batch, seq, width = hidden.shape
        if batch > self.config.max_batch_size or batch * seq > self.config.max_forward_tokens:
            raise InvalidInputError(
                f"batch {batch} x {seq} positions exceed the peer's limits (batch <= "
                f"{self.config.max_batch_size}, batch x positions <= {self.config.max_forward_tokens})"
            )
        if width != span.hidden_size:
            raise InvalidInputError(f"hidden size {width} does not match the model's {span.hidden_size}")

    def _optional_prompts(
        self, request: peer_pb2.ForwardRequest | peer_pb2.BackwardRequest, name: str
    ) -> torch.Tensor | None:
        # shapes are checked against the hidden states and the span by `HostedSpan` before any compute
        return optional_from_message(
            getattr(request, name),
            max_bytes=self.config.max_message_bytes,
            expected_dtypes=FLOAT_DTYPES,
            expected_ndim=4,
            name=name,
        )

    async def Info(
        self, request: peer_pb2.InfoRequest, context: grpc.aio.ServicerContext
    ) -> peer_pb2.InfoReply:
        record = self.make_record()
        return peer_pb2.InfoReply(
            model_id=self.config.model_id or "",
            peer_id=self.peer_id,
            start=self.span.start,
            end=self.span.end,
            num_blocks=self.span.anatomy.num_blocks,
            dtype=dtype_name(self.span.dtype),
            version=self.version,
            free_cache_tokens=self.sessions.free_tokens,
            max_cache_tokens=self.sessions.max_cache_tokens,
            num_sessions=len(self.sessions),
            throughput=record.throughput,
            max_batch_size=self.config.max_batch_size,
            max_length=self.config.max_length,
            max_message_bytes=self.config.max_message_bytes,
        )

    # ---- lifecycle ---------------------------------------------------------------------------------

    def swap_span(self, span: HostedSpan) -> tuple[HostedSpan, list[PeerSession]]:
        """Serve `span` from now on; returns the old span and the sessions still open on it."""
        old, self.span = self.span, span
        sessions = [s for sid in self.sessions.session_ids() if (s := self.sessions.get(sid)) is not None]
        return old, [session for session in sessions if session.span is old]

    async def retire(self, sessions: list[PeerSession], reason: str) -> None:
        """End sessions of a span this peer no longer serves: each finishes the step it is running, then
        its client gets UNAVAILABLE and moves the hop elsewhere by the normal failover."""
        for session in sessions:
            async with session.lock:
                if self.sessions.close(session.session_id, reason="span moved") is not None:
                    session.reply(_End(grpc.StatusCode.UNAVAILABLE, reason))

    def expire_idle(self) -> None:
        for session in self.sessions.expire():
            session.reply(_End(grpc.StatusCode.NOT_FOUND, "session expired after being idle"))

    async def close(self) -> None:
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for channel in self._channels.values():
            await channel.close()

    def _check_span(self, start: int, end: int) -> tuple[int, int]:
        if not self.span.start <= start < end <= self.span.end:
            raise InvalidInputError(
                f"span [{start}, {end}) is not served here; this peer hosts "
                f"[{self.span.start}, {self.span.end})"
            )
        return start, end


def _check_address(address: str) -> None:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or len(address) > 260:
        raise InvalidInputError(f"next hop address {address!r} is not host:port")
