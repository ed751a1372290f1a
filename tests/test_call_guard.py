"""The call guard (`peer.admission`) on an in-process gRPC server, and the server options around it: a
client past its share of calls is refused before anything of its is read; a request that never comes
ends the call at the deadline; requests are received in turns, per client and over all, and `Info` needs
none; a refused request is freed at once, not when the garbage collector runs; compressed requests and
connections past the cap are refused; the bounds are options of `corolla serve`."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
import weakref
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
from pydantic import ValidationError

from peer import wire
from peer.admission import CallGuard, _Turns
from peer.config import PeerConfig
from peer.main import server_options
from protos import peer_pb2, peer_pb2_grpc
from protos.settings import add_config_arguments

CLIENT = "ipv4:127.0.0.1"
SERVICE = "/corolla.peer.v1.Peer/"


class _Servicer(peer_pb2_grpc.PeerServicer):
    """Forward holds its call until `release` is set; Backward refuses after building a local `Sentinel`."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.forwards = 0
        self.sentinel: weakref.ref[object] | None = None

    async def Info(self, request, context):
        return peer_pb2.InfoReply(model_id="guarded")

    async def Forward(self, request, context):
        self.forwards += 1
        await self.release.wait()
        return peer_pb2.ForwardReply()

    async def Backward(self, request, context):
        held = _Sentinel()  # stands for the request a handler holds while it refuses the call
        self.sentinel = weakref.ref(held)
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, "refused")

    async def Session(self, request_iterator, context):
        async for request in request_iterator:
            yield peer_pb2.SessionReply(opened=peer_pb2.Opened(session_id=request.open.session_id))


class _Sentinel:
    pass


@contextlib.asynccontextmanager
async def _server(**limits: float) -> AsyncIterator[tuple[grpc.aio.Channel, CallGuard, _Servicer]]:
    options = dict(max_client_calls=8, max_receives=8, max_client_receives=8, request_timeout=10.0)
    guard = CallGuard(**(options | limits))  # type: ignore[arg-type]
    servicer = _Servicer()
    server = grpc.aio.server(interceptors=[guard])
    wire.add_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel, guard, servicer
    finally:
        servicer.release.set()
        await server.stop(None)


def _silent(channel: grpc.aio.Channel, method: str) -> grpc.aio.StreamUnaryCall:
    """A call that sends its headers and never a request message (nor the end of its requests)."""
    return channel.stream_unary(SERVICE + method, response_deserializer=bytes)(timeout=30)


async def _code(call: object) -> grpc.StatusCode:
    try:
        await call  # type: ignore[misc]
        return grpc.StatusCode.OK
    except grpc.aio.AioRpcError as e:
        return e.code()


async def _until(condition, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_a_client_past_its_calls_is_refused_before_anything_is_read() -> None:
    async def scenario() -> None:
        async with _server(max_client_calls=2) as (channel, guard, servicer):
            stub = peer_pb2_grpc.PeerStub(channel)
            holders = [_silent(channel, "Forward") for _ in range(2)]
            await _until(lambda: guard.calls(CLIENT) == 2)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Info(peer_pb2.InfoRequest(), timeout=2)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "too many calls under way from your address (at most 2)" in refused.value.details()
            holders[0].cancel()
            await _until(lambda: guard.calls(CLIENT) == 1)
            assert (await stub.Info(peer_pb2.InfoRequest(), timeout=2)).model_id == "guarded"
            holders[1].cancel()
            await _until(lambda: guard.calls(CLIENT) == 0)
            assert servicer.forwards == 0  # no request ever came: no handler ran

    asyncio.run(scenario())


def test_a_request_that_never_comes_ends_the_call_at_the_deadline() -> None:
    async def scenario() -> None:
        async with _server(request_timeout=0.5) as (channel, guard, _):
            started = time.monotonic()
            assert await _code(_silent(channel, "Forward")) == grpc.StatusCode.DEADLINE_EXCEEDED
            assert await _code(_silent(channel, "Push")) == grpc.StatusCode.DEADLINE_EXCEEDED
            assert time.monotonic() - started < 3.0
            silent_session = channel.stream_stream(SERVICE + "Session")(timeout=30)
            assert await _code(silent_session.read()) == grpc.StatusCode.DEADLINE_EXCEEDED
            # a session's first message comes in time; the next may idle past the deadline
            stub = peer_pb2_grpc.PeerStub(channel)
            session = stub.Session(timeout=30)
            await session.write(peer_pb2.SessionRequest(open=peer_pb2.OpenSession(session_id="a")))
            assert (await session.read()).opened.session_id == "a"
            await asyncio.sleep(1.0)
            await session.write(peer_pb2.SessionRequest(open=peer_pb2.OpenSession(session_id="b")))
            assert (await session.read()).opened.session_id == "b"
            await session.done_writing()
            assert await session.code() == grpc.StatusCode.OK
            # a call that ends its requests without sending one is refused
            nothing = channel.stream_unary(SERVICE + "Forward", response_deserializer=bytes)(
                iter(()), timeout=5
            )
            assert await _code(nothing) == grpc.StatusCode.INVALID_ARGUMENT
            await _until(lambda: guard.calls(CLIENT) == 0)

    asyncio.run(scenario())


def test_requests_are_received_in_turns_and_info_needs_none() -> None:
    async def scenario() -> None:
        async with _server(max_receives=1, max_client_receives=1, request_timeout=0.5) as (channel, _, _):
            stub = peer_pb2_grpc.PeerStub(channel)
            started = time.monotonic()
            holder = _silent(channel, "Forward")  # takes the only turn until its deadline
            await asyncio.sleep(0.1)
            waiting = asyncio.ensure_future(_code(stub.Push(peer_pb2.PushRequest(), timeout=5)))
            info = await stub.Info(peer_pb2.InfoRequest(), timeout=0.3)  # never read: needs no turn
            assert info.model_id == "guarded"
            assert await _code(_silent(channel, "Info")) == grpc.StatusCode.OK  # nor a request at all
            assert not waiting.done()
            assert await _code(holder) == grpc.StatusCode.DEADLINE_EXCEEDED
            assert await waiting == grpc.StatusCode.UNIMPLEMENTED  # read once the turn was free
            assert time.monotonic() - started >= 0.4

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "requests",
    [
        # (client, whether it gets a turn) in order, with 2 turns in all and 1 per client
        [("a", True), ("a", False), ("b", True)],
        [("a", True), ("b", True), ("c", False)],
    ],
)
def test_turns_per_client_and_over_all(requests: list[tuple[str, bool]]) -> None:
    async def scenario() -> None:
        turns = _Turns(total=2, per_client=1)
        loop = asyncio.get_running_loop()
        for client, expected in requests:
            assert await turns.acquire(client, loop.time() + 0.05) is expected, client
        assert len(turns) == 2  # clients holding a turn; those that gave up are forgotten
        for client, held in requests:
            if held:
                turns.release(client)
        assert len(turns) == 0
        assert await turns.acquire("c", loop.time() + 0.05)

    asyncio.run(scenario())


def test_a_refused_request_is_freed_without_the_garbage_collector() -> None:
    async def scenario() -> bool:
        async with _server() as (channel, _, servicer):
            request = peer_pb2.BackwardRequest(start=0, end=1)
            assert await _code(peer_pb2_grpc.PeerStub(channel).Backward(request, timeout=5)) == (
                grpc.StatusCode.PERMISSION_DENIED
            )
            await asyncio.sleep(0.1)  # the call's end has run
            return servicer.sentinel is not None and servicer.sentinel() is None

    gc.disable()
    try:
        assert asyncio.run(scenario())
    finally:
        gc.enable()


def test_compressed_requests_and_connections_past_the_cap_are_refused() -> None:
    config = PeerConfig(model="m", blocks="0:1", max_connections=2, handshake_timeout=1.0)

    async def scenario() -> None:
        server = grpc.aio.server(options=server_options(config))
        wire.add_to_server(_Servicer(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        address = f"127.0.0.1:{port}"
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                stub = peer_pb2_grpc.PeerStub(channel)
                assert await _code(stub.Info(peer_pb2.InfoRequest(), timeout=5)) == grpc.StatusCode.OK
                gzip = stub.Info(peer_pb2.InfoRequest(), timeout=5, compression=grpc.Compression.Gzip)
                assert await _code(gzip) == grpc.StatusCode.UNIMPLEMENTED
            connections = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
            try:
                # the first two wait for their handshake (then time out); the third is closed at once
                closed = await asyncio.wait_for(connections[2][0].read(), 0.5)
                assert closed == b""
                started = time.monotonic()
                await asyncio.wait_for(connections[0][0].read(), 5)  # the handshake's deadline
                assert time.monotonic() - started < 3.0
            finally:
                for _, writer in connections:
                    writer.close()
        finally:
            await server.stop(None)

    asyncio.run(scenario())


def _options() -> Iterator[str]:
    import argparse

    parser = argparse.ArgumentParser()
    add_config_arguments(parser, PeerConfig, positional=("model",))
    return iter(parser.format_help().split())


def test_the_bounds_are_options_with_defaults() -> None:
    options = set(_options())
    for option in (
        "--max-client-calls",
        "--request-timeout",
        "--max-receives",
        "--max-client-receives",
        "--max-connections",
        "--handshake-timeout",
    ):
        assert option in options
    config = PeerConfig(model="m", blocks="0:1")
    assert config.client_calls == config.max_concurrent_rpcs // 4 == 256
    assert PeerConfig(model="m", blocks="0:1", max_concurrent_rpcs=128).client_calls == 64
    assert PeerConfig(model="m", blocks="0:1", max_concurrent_rpcs=8).client_calls == 8
    with pytest.raises(ValidationError, match="max-client-calls"):
        PeerConfig(model="m", blocks="0:1", max_client_calls=2000)
    with pytest.raises(ValidationError, match="max-client-receives"):
        PeerConfig(model="m", blocks="0:1", max_receives=2, max_client_receives=3)
