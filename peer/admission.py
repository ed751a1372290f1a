"""Which calls the gRPC server takes on, and how their request messages come in: a cap on the calls one
client holds at once, turns to receive a request message (a few at once per client and over all), and a
deadline for a unary request to arrive. Knows call slots, clients' addresses and messages' arrival, not
what the messages mean.

gRPC reads a unary request whole before any handler runs, and a call that never sends it would hold its
slot of `maximum_concurrent_rpcs` for good. On the wire a unary call is a stream like any other, so the
guard serves each unary method with a request-streaming handler of its own: it admits the caller before
anything is read, waits for a turn, reads exactly one message within the deadline, then runs the method.
HTTP/2 flow control holds back what is not being read (a stream's window, 64 KiB), so the turns bound
the requests in memory: `max_receives` messages of up to `max_message_bytes` (and their parsed copies).
A Session stream's first message (its `open`) must come by the deadline too, but takes no turn: a client
may start several streams before it opens each (a turn held by one would stall the others); its later
messages are read as they come, without a deadline (an open session idles between steps). What streams
hold is bounded by the calls and sessions a client may have, not by turns. `Info`'s request is empty by
protocol and never read at all.

    unary call ─▶ admit (calls of this client < max_client_calls, else RESOURCE_EXHAUSTED, nothing read)
               ─▶ turn (this client's < max_client_receives, all < max_receives; the wait counts in the
                  deadline) ─▶ read one message (by request_timeout, else DEADLINE_EXCEEDED)
               ─▶ release the turn ─▶ the method
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc

from peer.requests import client_key
from protos.swarm_key import LOG_PERIOD

if TYPE_CHECKING:
    from peer.config import PeerConfig

logger = logging.getLogger(__name__)

# methods whose request is empty by protocol (`InfoRequest {}`): answered without reading it, so a ping
# never waits for a turn behind large messages, and an Info call can bring no bytes in
UNREAD_METHODS = frozenset({"Info"})

_Behavior = Callable[[Any, grpc.aio.ServicerContext], Any]


class _Turns:
    """Turns to receive a message: at most `per_client` at once for one client, `total` over all. A
    client waits for one of its own turns before it queues for a shared one, so it holds at most
    `per_client` of them and never keeps another client from the rest."""

    def __init__(self, *, total: int, per_client: int) -> None:
        self._total = asyncio.Semaphore(total)
        self._per_client = per_client
        self._clients: dict[str, tuple[asyncio.Semaphore, int]] = {}  # its turns, calls using them

    async def acquire(self, client: str, deadline: float) -> bool:
        """Whether `client` got a turn before `deadline` (the event loop's clock); release it after."""
        own, users = self._clients.get(client) or (asyncio.Semaphore(self._per_client), 0)
        self._clients[client] = (own, users + 1)
        try:
            async with asyncio.timeout_at(deadline):
                await own.acquire()
                try:
                    await self._total.acquire()
                except BaseException:
                    own.release()
                    raise
        except TimeoutError:
            self._forget(client)
            return False
        except BaseException:
            self._forget(client)
            raise
        return True

    def release(self, client: str) -> None:
        self._total.release()
        self._clients[client][0].release()
        self._forget(client)

    def _forget(self, client: str) -> None:
        own, users = self._clients[client]
        if users > 1:
            self._clients[client] = (own, users - 1)
        else:
            del self._clients[client]

    def __len__(self) -> int:
        """Clients holding or waiting for a turn."""
        return len(self._clients)


def _drop_frames(error: grpc.aio.AbortError) -> None:
    """Clears the locals of the frames in the tracebacks of `error` and of the errors it chains (all
    finished: they raised it; the one running now is left as it is). gRPC keeps an aborted call's
    exception with the call, and its frames hold the call's context, which holds the call: a cycle that
    keeps each refused request (megabytes) until the garbage collector runs, so a burst of refusals (a
    push flood) piled up hundreds of them."""
    errors, seen = [error], set()
    while errors:
        current = errors.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        traceback.clear_frames(current.__traceback__)
        errors += [chained for chained in (current.__cause__, current.__context__) if chained is not None]


def _consume(reading: asyncio.Future[Any]) -> None:
    """Retrieves a read's outcome nobody waits for any more (it fails once the call has ended)."""
    if not reading.cancelled():
        reading.exception()


async def _read(context: grpc.aio.ServicerContext) -> Any:
    """The call's next message (or `grpc.aio.EOF`). A read is never cancelled: gRPC's core completes it
    into its operation's buffer even then, so an abandoned one is left to fail when the call ends."""
    reading = asyncio.ensure_future(context.read())
    try:
        return await asyncio.shield(reading)
    finally:
        if not reading.done():
            reading.add_done_callback(_consume)


class _Refusals:
    """Counts refusals; logs each kind at most once per `LOG_PERIOD` seconds, naming the last client."""

    def __init__(self) -> None:
        self.count = 0
        self._logged: dict[str, float] = {}

    def __call__(self, reason: str, client: str) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self._logged.get(reason, -LOG_PERIOD) >= LOG_PERIOD:
            self._logged[reason] = now
            logger.warning("call refused: %s client=%s (refused so far: %d)", reason, client, self.count)


class CallGuard(grpc.aio.ServerInterceptor):
    """Admits calls per client, and receives unary requests in turns and in time (see the module doc).
    Goes last among the server's interceptors: a private swarm's guard refuses strangers before this one
    counts or reads anything of theirs."""

    def __init__(
        self, *, max_client_calls: int, max_receives: int, max_client_receives: int, request_timeout: float
    ) -> None:
        self.max_client_calls = max_client_calls
        self.request_timeout = request_timeout
        self._calls: dict[str, int] = {}  # calls under way, by client
        self._turns = _Turns(total=max_receives, per_client=max_client_receives)
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}
        self.refused = _Refusals()

    @classmethod
    def from_config(cls, config: PeerConfig) -> CallGuard:
        return cls(
            max_client_calls=config.client_calls,
            max_receives=config.max_receives,
            max_client_receives=config.max_client_receives,
            request_timeout=config.request_timeout,
        )

    def calls(self, client: str) -> int:
        return self._calls.get(client, 0)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = str(handler_call_details.method)  # type: ignore[attr-defined]
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:  # the servicer's handlers are built once
            return cached[1]
        wrapped = self._wrap(handler, method.rpartition("/")[2])
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, handler: grpc.RpcMethodHandler, name: str) -> grpc.RpcMethodHandler:
        requests = "stream" if handler.request_streaming else "unary"
        inner: _Behavior = getattr(
            handler, f"{requests}_{'stream' if handler.response_streaming else 'unary'}"
        )
        deserializer = handler.request_deserializer
        unread = name in UNREAD_METHODS and not handler.request_streaming

        async def messages(context: grpc.aio.ServicerContext, client: str) -> AsyncIterator[Any]:
            message = await self._receive(context, client, turn=False)  # a session's open comes in time
            while message is not grpc.aio.EOF:
                yield message
                message = await _read(context)  # later ones may take long: an open session idles

        async def request(context: grpc.aio.ServicerContext) -> Any:
            client = await self._admit(context)
            if handler.request_streaming:
                return messages(context, client)
            if unread:
                return deserializer(b"") if deserializer is not None else b""
            message = await self._receive(context, client)
            if message is grpc.aio.EOF:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the call ended without a request")
            return message

        # every kind is served as a request stream: gRPC then reads nothing until `request` asks
        if handler.response_streaming:

            async def streaming(_: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                replies = None
                try:
                    replies = inner(await request(context), context)
                    if inspect.isasyncgen(replies):
                        async for reply in replies:
                            yield reply
                    else:  # a coroutine that writes with `context.write`
                        await replies
                except grpc.aio.AbortError as error:
                    _drop_frames(error)
                    raise
                finally:
                    if inspect.isasyncgen(replies):
                        await replies.aclose()

            return grpc.stream_stream_rpc_method_handler(
                streaming, request_deserializer=deserializer, response_serializer=handler.response_serializer
            )

        async def unary(_: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                return await inner(await request(context), context)
            except grpc.aio.AbortError as error:
                _drop_frames(error)
                raise

        return grpc.stream_unary_rpc_method_handler(
            unary, request_deserializer=deserializer, response_serializer=handler.response_serializer
        )

    async def _admit(self, context: grpc.aio.ServicerContext) -> str:
        """The caller's client key, once its call is counted; RESOURCE_EXHAUSTED past its cap."""
        client = client_key(context.peer())
        calls = self._calls.get(client, 0)
        if calls >= self.max_client_calls:
            self.refused("too many calls from one client", client)
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"too many calls under way from your address (at most {self.max_client_calls})",
            )
        self._calls[client] = calls + 1
        # released when the RPC ends, also when gRPC abandons a handler that was waiting on the client
        context.add_done_callback(lambda _: self._release(client))
        return client

    def _release(self, client: str) -> None:
        calls = self._calls.get(client, 0) - 1
        if calls > 0:
            self._calls[client] = calls
        else:
            self._calls.pop(client, None)

    async def _receive(self, context: grpc.aio.ServicerContext, client: str, *, turn: bool = True) -> Any:
        """The call's next message (or `grpc.aio.EOF`), read in a turn (unless not `turn`) and by the
        deadline; past the deadline the call is aborted, which also ends the read."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.request_timeout
        if not turn:
            return await self._read_by(context, client, deadline)
        if not await self._turns.acquire(client, deadline):
            self.refused("no turn to receive a request in time", client)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many requests being received here")
        try:
            return await self._read_by(context, client, deadline)
        finally:
            self._turns.release(client)

    async def _read_by(self, context: grpc.aio.ServicerContext, client: str, deadline: float) -> Any:
        loop = asyncio.get_running_loop()
        reading = asyncio.ensure_future(context.read())
        try:
            done, _ = await asyncio.wait({reading}, timeout=max(deadline - loop.time(), 0))
        finally:
            if not reading.done():  # it fails once the call has ended: by the abort below, or the client's
                reading.add_done_callback(_consume)
        if not done:
            self.refused("request not received in time", client)
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"the request did not arrive within {self.request_timeout:g} s",
            )
        return reading.result()
