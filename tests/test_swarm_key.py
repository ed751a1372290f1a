"""Swarm keys without processes: key files (private, never overwritten, refused when malformed or open to
others), `corolla keygen`, the options that take a key, the DHT authorizer against forged, stale, replayed
and foreign messages, and the gRPC guard against callers without the token, with a wrong one, or with one
bound to another server (an in-process TLS server)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from hivemind.proto import dht_pb2
from hivemind.utils.timed_storage import get_dht_time
from pydantic import ValidationError

from client.config import ClientConfig
from peer import wire
from peer.config import DhtConfig, PeerConfig
from protos import cli, peer_pb2, peer_pb2_grpc
from protos.channels import ChannelPool
from protos.identity import Identity
from protos.swarm_key import MAX_CLOCK_SKEW, METADATA_KEY, SwarmGuard, SwarmKey, SwarmKeyError
from protos.tls import ServerTls


def test_a_new_key_is_private_random_and_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "swarm.key"
    key = SwarmKey.create(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert SwarmKey.load(path).secret == key.secret and len(key.secret) == 32
    assert SwarmKey.create(tmp_path / "other.key").secret != key.secret
    with pytest.raises(SwarmKeyError, match="never overwritten"):
        SwarmKey.create(path)
    assert SwarmKey.load(path).secret == key.secret
    assert key.secret.hex() not in repr(key)  # logs and tracebacks never show it


@pytest.mark.parametrize(
    ("content", "mode", "error"),
    [
        ("ab" * 32 + "\n", 0o640, "readable by others"),
        ("ab" * 32 + "\n", 0o604, "readable by others"),
        ("ab" * 31 + "\n", 0o600, "not a swarm key"),
        ("zz" * 32 + "\n", 0o600, "not a swarm key"),
        ("ab" * 2000, 0o600, "not a swarm key"),
        ("", 0o600, "not a swarm key"),
    ],
)
def test_unusable_key_files_are_refused(tmp_path: Path, content: str, mode: int, error: str) -> None:
    path = tmp_path / "swarm.key"
    path.write_text(content)
    path.chmod(mode)
    with pytest.raises(SwarmKeyError, match=error):
        SwarmKey.load(path)


def test_a_missing_key_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SwarmKeyError, match="cannot read"):
        SwarmKey.load(tmp_path / "absent.key")


def test_keygen_writes_a_key_and_refuses_to_overwrite_it(tmp_path: Path, capsys) -> None:
    path = tmp_path / "swarm.key"
    assert cli.main(["keygen", str(path)]) == 0
    key = SwarmKey.load(path)
    assert key.fingerprint in capsys.readouterr().out
    with pytest.raises(SystemExit) as exited:
        cli.main(["keygen", str(path)])
    assert exited.value.code == 1 and "never overwritten" in capsys.readouterr().err
    assert SwarmKey.load(path).secret == key.secret


def test_every_command_takes_a_key_and_none_takes_it_with_plaintext(tmp_path: Path) -> None:
    path = tmp_path / "swarm.key"
    SwarmKey.create(path)
    assert PeerConfig(model="m", blocks="0:1", swarm_key=path).swarm_key == path
    assert DhtConfig(swarm_key=path).swarm_key == path
    assert ClientConfig(swarm_key=path).swarm_key == path
    with pytest.raises(ValidationError, match="needs TLS"):
        PeerConfig(model="m", blocks="0:1", swarm_key=path, insecure=True)
    with pytest.raises(ValidationError, match="needs TLS"):
        ClientConfig(swarm_key=path, insecure=True)
    with pytest.raises(ValueError, match="TLS only"):
        ChannelPool(max_message_bytes=2**20, insecure=True, swarm_key=SwarmKey.load(path))
    path.chmod(0o644)
    for make in (lambda: DhtConfig(swarm_key=path), lambda: ClientConfig(swarm_key=path)):
        with pytest.raises(ValidationError, match="readable by others"):
            make()


def test_sub_keys_differ_per_use_and_per_swarm() -> None:
    one, two = SwarmKey(b"\x01" * 32), SwarmKey(b"\x02" * 32)
    assert len({one.derive("dht"), one.derive("grpc"), two.derive("dht"), one.secret}) == 4
    assert one.grpc_token(b"certificate A") != one.grpc_token(b"certificate B")
    assert one.grpc_token(b"certificate A") != two.grpc_token(b"certificate A")


# ---- the DHT authorizer ---------------------------------------------------------------------------


def _ping() -> dht_pb2.PingRequest:
    return dht_pb2.PingRequest(peer=dht_pb2.NodeInfo(node_id=b"node"), validate=True)


def test_members_requests_and_responses_pass_and_forged_ones_do_not() -> None:
    async def scenario() -> None:
        member, other = SwarmKey(b"\x01" * 32).dht_authorizer(), SwarmKey(b"\x01" * 32).dht_authorizer()
        stranger = SwarmKey(b"\x02" * 32).dht_authorizer()

        request = _ping()
        await member.sign_request(request, None)
        assert await other.validate_request(dht_pb2.PingRequest.FromString(request.SerializeToString()))
        response = dht_pb2.PingResponse(dht_time=1.0)
        await other.sign_response(response, request)
        assert await member.validate_response(response, request)

        assert not await other.validate_request(_ping())  # a node without any key
        foreign = _ping()
        await stranger.sign_request(foreign, None)  # a node with another swarm's key
        assert not await other.validate_request(foreign)
        tampered = _ping()
        await member.sign_request(tampered, None)
        tampered.validate = False
        assert not await other.validate_request(tampered)
        assert not await member.validate_response(dht_pb2.PingResponse(dht_time=1.0), request)  # unsigned
        answered_elsewhere = dht_pb2.PingResponse(dht_time=1.0)
        another = _ping()
        await member.sign_request(another, None)
        await other.sign_response(answered_elsewhere, another)
        assert not await member.validate_response(answered_elsewhere, request)
        assert other.refused.count == 3

    asyncio.run(scenario())


def test_replayed_and_stale_requests_are_dropped() -> None:
    async def scenario() -> None:
        member, other = SwarmKey(b"\x01" * 32).dht_authorizer(), SwarmKey(b"\x01" * 32).dht_authorizer()
        request = _ping()
        await member.sign_request(request, None)
        wire_bytes = request.SerializeToString()
        assert await other.validate_request(dht_pb2.PingRequest.FromString(wire_bytes))
        assert not await other.validate_request(dht_pb2.PingRequest.FromString(wire_bytes))  # replayed

        stale = _ping()
        await member.sign_request(stale, None)
        stale.auth.time = get_dht_time() - 2 * MAX_CLOCK_SKEW  # re-signed: only the time is wrong
        stale.auth.signature = b""
        stale.auth.signature = member._mac(b"corolla-dht-request\x00", stale)
        assert not await other.validate_request(stale)

    asyncio.run(scenario())


# ---- the gRPC guard -------------------------------------------------------------------------------


class _Echo(peer_pb2_grpc.PeerServicer):
    async def Info(self, request, context):
        return peer_pb2.InfoReply(model_id="private")

    async def Session(self, request_iterator, context) -> AsyncIterator[peer_pb2.SessionReply]:
        async for _ in request_iterator:
            yield peer_pb2.SessionReply()


async def _calls(stub: peer_pb2_grpc.PeerStub) -> list[str]:
    """The outcome of a unary and a streaming call: "ok" or the status code's name."""
    outcomes = []
    try:
        await stub.Info(peer_pb2.InfoRequest(), timeout=10)
        outcomes.append("ok")
    except grpc.aio.AioRpcError as e:
        outcomes.append(e.code().name)
    call = stub.Session(timeout=10)
    try:
        await call.write(peer_pb2.SessionRequest())
        await call.read()
        outcomes.append("ok")
    except grpc.aio.AioRpcError as e:
        outcomes.append(e.code().name)
    finally:
        call.cancel()
    return outcomes


def test_only_calls_with_this_servers_token_get_through() -> None:
    key = SwarmKey(b"\x01" * 32)
    tls = ServerTls.create(Identity.load_or_create(None))
    other_tls = ServerTls.create(Identity.load_or_create(None))

    async def scenario() -> dict[str, list[str]]:
        guard = SwarmGuard(key.grpc_token(tls.certificate))
        server = grpc.aio.server(interceptors=[guard])
        wire.add_to_server(_Echo(), server)
        port = server.add_secure_port("127.0.0.1:0", tls.server_credentials())
        await server.start()
        address = f"127.0.0.1:{port}"
        pools = {
            "member": ChannelPool(max_message_bytes=2**20, swarm_key=key),
            "keyless": ChannelPool(max_message_bytes=2**20),
            "wrong key": ChannelPool(max_message_bytes=2**20, swarm_key=SwarmKey(b"\x02" * 32)),
        }
        try:
            outcomes = {name: await _calls(p.stub(address, tls.certificate)) for name, p in pools.items()}
            # a member's token for another server (another certificate), presented here
            stolen = key.grpc_token(other_tls.certificate)
            stub = pools["keyless"].stub(address, tls.certificate)
            try:
                await stub.Info(peer_pb2.InfoRequest(), metadata=((METADATA_KEY, stolen),), timeout=10)
                outcomes["token of another server"] = ["ok"]
            except grpc.aio.AioRpcError as e:
                outcomes["token of another server"] = [e.code().name]
            outcomes["refused"] = [str(guard.refused.count)]
            return outcomes
        finally:
            for pool in pools.values():
                await pool.close()
            await server.stop(None)

    assert asyncio.run(scenario()) == {
        "member": ["ok", "ok"],
        "keyless": ["UNAUTHENTICATED", "UNAUTHENTICATED"],
        "wrong key": ["UNAUTHENTICATED", "UNAUTHENTICATED"],
        "token of another server": ["UNAUTHENTICATED"],
        "refused": ["5"],
    }


async def _code(call: grpc.aio.StreamUnaryCall) -> str:
    try:
        await call
        return "OK"
    except grpc.aio.AioRpcError as e:
        return e.code().name


def test_a_refusal_waits_for_no_request() -> None:
    """Calls without the token that send their headers and never a request (nor the end of their requests)
    are refused at once: a unary refusal that waited for the request would hold the call's slot for good,
    so a stranger could fill `maximum_concurrent_rpcs` and keep members out."""

    async def scenario() -> tuple[list[str], float, str]:
        server = grpc.aio.server(interceptors=[SwarmGuard("token")], maximum_concurrent_rpcs=4)
        wire.add_to_server(_Echo(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                started = time.monotonic()
                codes: list[str] = []
                for _ in range(2):  # twice the server's 4 slots: the first four must have let go
                    silent = [
                        channel.stream_unary(f"/corolla.peer.v1.Peer/{method}")(timeout=5)
                        for method in ("Info", "Forward", "Push", "Backward")
                    ]
                    codes += await asyncio.gather(*map(_code, silent))
                elapsed = time.monotonic() - started
                member = await peer_pb2_grpc.PeerStub(channel).Info(
                    peer_pb2.InfoRequest(), metadata=((METADATA_KEY, "token"),), timeout=1
                )
                return codes, elapsed, member.model_id
        finally:
            await server.stop(None)

    codes, elapsed, model_id = asyncio.run(scenario())
    assert set(codes) == {"UNAUTHENTICATED"}
    assert elapsed < 2.0
    assert model_id == "private"


def test_keygen_names_every_command_that_takes_a_swarm_key(capsys: pytest.CaptureFixture[str]) -> None:
    from protos.cli import COMMANDS, main

    def help_of(command: str) -> str:
        with pytest.raises(SystemExit):
            main([command, "--help"])
        return " ".join(capsys.readouterr().out.split())

    takers = [command for command in COMMANDS if command != "keygen" and "--swarm-key" in help_of(command)]
    assert {"dht", "serve", "generate", "api", "monitor", "health"} <= set(takers)
    keygen = help_of("keygen")
    assert all(command in keygen for command in takers), (takers, keygen)
