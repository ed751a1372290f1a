"""One hop's `Session` stream: sends requests in order, decodes replies and hands them to a listener (the
inference session), and turns every way a stream can end into a `PeerFailure`. Knows nothing of routes."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

import grpc
import torch

from client.errors import PeerFailure, short_id
from client.route import Hop
from protos import peer_pb2, peer_pb2_grpc
from protos.errors import LIMIT_METADATA_KEY, CorollaError, InvalidInputError
from protos.tensors import from_message

logger = logging.getLogger(__name__)

ID_BYTES = 16  # a hop's session id and push token: 128 random bits each, independent of every other hop's


MAX_CARRIED = 64  # hop outputs one result may carry (the peers' limit, `peer.requests.MAX_CARRIED`)


@dataclass(frozen=True, eq=False)
class HopResult:
    """A step's output at a hop; the last hop of a carried step also returns the earlier hops' outputs."""

    step_id: int
    hidden: torch.Tensor  # this hop's output [batch, seq, hidden]
    carried: tuple[torch.Tensor, ...] = ()  # the earlier hops' outputs, in route order, each like `hidden`
    carried_seconds: tuple[float, ...] = ()  # what each earlier hop says its step took (untrusted)
    seconds: float = 0.0  # what this hop says its step took (untrusted)


class StreamListener(Protocol):
    """Who receives what a hop's stream brings; called on the client's loop."""

    def on_result(self, stream: HopStream, result: HopResult) -> None: ...

    def on_error(self, stream: HopStream, error: peer_pb2.StepError) -> None: ...

    def on_stream_end(self, stream: HopStream, failure: PeerFailure) -> None: ...


def rpc_failure(error: grpc.aio.AioRpcError, peer_id: str, default: str) -> PeerFailure:
    """A failed RPC as a `PeerFailure`, with the peer's own limit when its trailing metadata names one."""
    limit = None
    for key, value in error.trailing_metadata() or ():
        if key == LIMIT_METADATA_KEY:
            limit = value if isinstance(value, str) else value.decode(errors="replace")
    return PeerFailure(error.code(), error.details() or default, peer_id, limit=limit)


class HopStream:
    """One hop's Session stream; its replies go to the listener, tagged with the stream.

    Each stream draws its own random session id, so a reopened hop never meets an old one and no peer can
    derive another hop's id; a hop that the previous hop pushes to (`pushed`) also draws a push token,
    which only this hop's OpenSession and the previous hop's `Hop` message carry."""

    def __init__(
        self,
        hop: Hop,
        stub: peer_pb2_grpc.PeerStub,
        listener: StreamListener,
        *,
        pushed: bool,
        max_message_bytes: int,
    ) -> None:
        self.hop = hop
        self.listener = listener
        self.session_id = secrets.token_hex(ID_BYTES)
        self.push_token = secrets.token_bytes(ID_BYTES) if pushed else b""
        self.max_message_bytes = max_message_bytes
        self.failure: PeerFailure | None = None
        self.num_results = 0  # StepResults read: reported outputs, replays' and last-hop results
        self.closed = False
        self._requests: asyncio.Queue[peer_pb2.SessionRequest | None] = asyncio.Queue()
        self._call = stub.Session(self._request_iterator())
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
        try:
            async for reply in self._call:
                kind = reply.WhichOneof("kind")
                if kind == "opened":
                    self._opened.set_result(None)
                elif kind == "result":
                    self.num_results += 1
                    self.listener.on_result(self, self._result(reply.result))
                elif kind == "error":
                    self.listener.on_error(self, reply.error)
            self._end(PeerFailure(grpc.StatusCode.UNAVAILABLE, "stream ended", self.hop.peer_id))
        except grpc.aio.AioRpcError as e:
            self._end(rpc_failure(e, self.hop.peer_id, "stream failed"))
        except CorollaError as e:  # a garbled reply: this hop is not trusted for the rest of the session
            self._end(PeerFailure(grpc.StatusCode.INTERNAL, f"bad reply: {e}", self.hop.peer_id))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # any other way a reply can break the reader still ends this hop at once
            logger.warning("hop reader failed peer=%s error=%r", short_id(self.hop.peer_id), e)
            self._end(PeerFailure(grpc.StatusCode.INTERNAL, f"bad reply: {e!r}", self.hop.peer_id))

    def _result(self, result: peer_pb2.StepResult) -> HopResult:
        if len(result.carried) > MAX_CARRIED or len(result.carried_seconds) > MAX_CARRIED:
            raise InvalidInputError(f"more than {MAX_CARRIED} carried outputs")

        def decode(message: peer_pb2.Tensor, name: str) -> torch.Tensor:
            return from_message(message, max_bytes=self.max_message_bytes, expected_ndim=3, name=name)

        return HopResult(
            result.step_id,
            decode(result.hidden, "hidden"),
            tuple(decode(t, f"carried[{i}]") for i, t in enumerate(result.carried)),
            tuple(result.carried_seconds),
            result.seconds,
        )

    def fail(self, failure: PeerFailure) -> None:
        """End this hop for the session (a reply the listener refused); later replies are ignored."""
        self._end(failure)

    def _end(self, failure: PeerFailure) -> None:
        if self.failure is not None:
            return  # the first failure is the reason
        self.failure = failure
        if not self._opened.done():
            self._opened.set_exception(failure)
        self.listener.on_stream_end(self, failure)

    def message(self) -> peer_pb2.Hop:
        hop = self.hop
        return peer_pb2.Hop(
            peer_id=hop.peer_id,
            address=hop.address,
            start=hop.start,
            end=hop.end,
            session_id=self.session_id,
            push_token=self.push_token,
            certificate=hop.certificate or b"",
            relay_maddrs=hop.relay_maddrs,
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
