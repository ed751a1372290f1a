"""protos/relay.py and peer/reach.py without namespaces: relay addresses as records, hops and p2pd carry them,
the byte pipe between two real p2pd daemons on 127.0.0.1, and the dial-back probe with hostile requests.
The same pieces across a real NAT are tests/test_wan_swarm.py's."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from hivemind.p2p import P2P, PeerID
from records_factory import peer_record

from peer import reach
from peer.reach import UnreachableError
from peer.requests import parse_hops
from protos import peer_pb2
from protos.channels import ChannelPool
from protos.dht import _p2p_class
from protos.dialback import DIALBACK_PROTOCOL, DialBack, Reachability, check_reachability
from protos.errors import InvalidInputError
from protos.identity import Identity
from protos.records import MAX_RELAY_MADDR_CHARS, PeerRecord
from protos.relay import (
    GRPC_PROTOCOL,
    RelayDialer,
    RelayedServer,
    Unreachable,
    circuit_maddrs,
    encode_multiaddr,
    loopback_source,
    validate_relay_maddrs,
)
from protos.resumable import REPLY_BYTES, Carrier, Pipe, PipeBroken, hello, parse_reply
from protos.tls import ServerTls

RELAY_ID = "12D3KooWDY581LyNmYEZgrRC1YLemdSNxwMdQa8HLG4GKZqS2VXM"
RELAY = f"/ip4/10.1.0.1/tcp/4001/p2p/{RELAY_ID}"
CIRCUIT = f"{RELAY}/p2p-circuit"


# ---- addresses ---------------------------------------------------------------------------------------------


def test_a_circuit_address_encodes_the_relay_id_as_p2pd_reads_it() -> None:
    encoded = encode_multiaddr(CIRCUIT).to_bytes()
    digest = PeerID.from_base58(RELAY_ID).to_bytes()
    # /p2p/ is code 421 with the peer id's multihash (no CID prefix), /p2p-circuit is code 290
    assert encoded.endswith(bytes([0xA5, 0x03, len(digest)]) + digest + bytes([0xA2, 0x02]))
    assert str(encode_multiaddr(CIRCUIT)) == CIRCUIT


@pytest.mark.parametrize(
    "maddr",
    [
        "",
        "ip4/1.2.3.4",
        "/ip4/1.2.3.4/tcp/1/p2p/not-a-peer-id/p2p-circuit",
        "/ip4/999.1.1.1/tcp/1/p2p-circuit",
        "/" + "a" * MAX_RELAY_MADDR_CHARS,
    ],
)
def test_a_malformed_multiaddress_is_refused(maddr: str) -> None:
    with pytest.raises(InvalidInputError):
        encode_multiaddr(maddr)


@pytest.mark.parametrize(
    ("maddrs", "valid"),
    [
        ((), True),
        ((CIRCUIT,), True),
        ((CIRCUIT,) * 4, True),
        ((CIRCUIT,) * 5, False),  # more relays than a record may name
        ((RELAY,), False),  # a relay's own address, not a circuit through it
        (("/ip4/10.1.0.1/tcp/4001/p2p-circuit",), False),  # no relay id
        ((CIRCUIT.replace(RELAY_ID, "Qm" + "0" * 44),), False),  # not base58 ("0" is not a digit of it)
    ],
)
def test_relay_addresses_of_a_hop_are_checked(maddrs: tuple[str, ...], valid: bool) -> None:
    if valid:
        assert validate_relay_maddrs(maddrs) == maddrs
    else:
        with pytest.raises(InvalidInputError):
            validate_relay_maddrs(maddrs)


def test_a_record_names_at_most_four_circuits_and_only_circuits() -> None:
    assert peer_record(0, 1, relay_maddrs=(CIRCUIT,)).relay_maddrs == (CIRCUIT,)
    assert circuit_maddrs([RELAY, RELAY + "/"]) == (CIRCUIT, CIRCUIT)
    for bad in [(CIRCUIT,) * 5, (RELAY,), ("/x y/p2p-circuit",)]:
        with pytest.raises(ValueError):
            peer_record(0, 1, relay_maddrs=bad)


def test_a_next_hop_with_bad_relays_is_refused_before_anything_is_kept() -> None:
    hop = peer_pb2.Hop(
        peer_id="p", address="10.0.0.1:1", start=1, end=2, session_id="s", push_token=b"t" * 16
    )
    assert parse_hops([hop], end=1, num_blocks=2)
    hop.relay_maddrs.extend([RELAY])
    with pytest.raises(InvalidInputError, match="next hop"):
        parse_hops([hop], end=1, num_blocks=2)


def test_a_relayed_peer_needs_a_libp2p_node_and_gets_its_own_channel() -> None:
    async def main() -> None:
        pool = ChannelPool(max_message_bytes=1 << 20, insecure=True)
        record = peer_record(0, 1, relay_maddrs=(CIRCUIT,))
        with pytest.raises(Unreachable):
            pool.record_stub("peer", record)
        direct = pool.stub(record.address)
        assert direct is not None and len(pool) == 1  # the same address, dialed directly, is another channel
        await pool.close()

    asyncio.run(main())


def test_p2pd_gets_the_flags_hivemind_does_not_take() -> None:
    args = _p2p_class(["-relayDiscovery=0"])._make_process_args("p2pd", relay=True)
    assert args[0] == "p2pd" and args[-1] == "-relayDiscovery=0"
    assert _p2p_class([]) is P2P


def test_each_relayed_caller_gets_its_own_loopback_address() -> None:
    first, second = loopback_source("a"), loopback_source("b")
    assert first != second and first.startswith("127.") and first != "127.0.0.1"
    assert loopback_source("a") == first


# ---- the announced host and the verdict --------------------------------------------------------------------


def test_the_route_toward_the_swarm_gives_the_host_to_announce() -> None:
    assert reach.route_source([f"/ip4/127.0.0.1/tcp/1/p2p/{RELAY_ID}"]) == "127.0.0.1"
    assert reach.bracketed("::1") == "[::1]" and reach.bracketed("10.0.0.1") == "10.0.0.1"


def test_an_unreachable_peer_serves_through_its_initial_peers_or_stops_naming_the_fix() -> None:
    verdict = Reachability(asked=3, answered=3, reached=0, errors=("no handshake within 3s",))
    assert verdict.reachable is False
    assert Reachability(asked=2, answered=0, reached=0).reachable is None
    assert Reachability(asked=3, answered=3, reached=2).reachable is True
    relays = reach.relays_for([RELAY, "/ip4/1.2.3.4/tcp/1"], relay=True, address="1.2.3.4:5", result=verdict)
    assert relays == [RELAY]
    with pytest.raises(UnreachableError, match=r"forward TCP port 5.*--announce-host.*--no-relay"):
        reach.relays_for([RELAY], relay=False, address="1.2.3.4:5", result=verdict)
    with pytest.raises(UnreachableError, match="no --initial-peers can relay"):
        reach.relays_for([], relay=True, address="1.2.3.4:5", result=verdict)


# ---- two real p2pd daemons on loopback ---------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _two_nodes(identity: Identity | None = None) -> AsyncIterator[tuple[P2P, P2P]]:
    """Two connected daemons; the second holds `identity` (its libp2p id is that identity's peer id)."""
    options = {"host_maddrs": ["/ip4/127.0.0.1/tcp/0"], "nat_port_map": False, "use_relay": False}
    first = await P2P.create(**options, auto_nat=False)
    try:
        second = await P2P.create(
            **options,
            auto_nat=False,
            initial_peers=await first.get_visible_maddrs(),
            identity_path=str(identity.path) if identity is not None else None,
            check_if_identity_free=False,
        )
        try:
            yield first, second
        finally:
            await second.shutdown()
    finally:
        await first.shutdown()


async def _echo_server() -> tuple[asyncio.AbstractServer, list[str]]:
    """A TCP server on 127.0.0.1 that echoes and records each client's address."""
    seen: list[str] = []

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(writer.get_extra_info("peername")[0])
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
        writer.close()

    return await asyncio.start_server(echo, "127.0.0.1", 0), seen


def test_bytes_reach_the_relayed_peers_port_through_libp2p_and_back(tmp_path: Path) -> None:
    async def main() -> None:
        server, seen = await _echo_server()
        port = server.sockets[0].getsockname()[1]
        async with _two_nodes() as (peer, caller):
            relayed = RelayedServer(peer, port)
            await relayed.start()
            dialer = RelayDialer(caller)
            target = dialer.target(peer.peer_id.to_base58(), ())  # no relay needed: they are connected
            assert target.startswith("unix:")
            await asyncio.sleep(0.2)  # the socket is made by a task of the caller's loop
            reader, writer = await asyncio.open_unix_connection(target.removeprefix("unix:"))
            payload = bytes(range(256)) * 1024  # 256 KiB, several frames each way
            writer.write(payload)
            echoed = await asyncio.wait_for(reader.readexactly(len(payload)), 10)
            writer.close()
            assert echoed == payload
            assert seen == [loopback_source(caller.peer_id.to_base58())]
            await dialer.close()
            await relayed.close()
        server.close()

    asyncio.run(main())


@pytest.mark.parametrize("bound", ["all callers", "one caller"])
def test_the_relayed_peer_refuses_pipes_past_its_bound_and_unknown_resumes(
    bound: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if bound == "one caller":
        monkeypatch.setattr("protos.relay.MAX_CALLER_PIPES", 1)

    async def main() -> None:
        server, _ = await _echo_server()
        port = server.sockets[0].getsockname()[1]
        async with _two_nodes() as (peer, caller):
            relayed = RelayedServer(peer, port, max_pipes=1 if bound == "all callers" else 256)
            await relayed.start()

            async def open_pipe(pipe_id: bytes, received: int = 0) -> tuple[asyncio.StreamReader, Any]:
                _, reader, writer = await caller.call_binary_stream_handler(peer.peer_id, GRPC_PROTOCOL)
                writer.write(hello(pipe_id, received))
                return reader, writer

            reader, writer = await open_pipe(b"a" * 16)
            assert parse_reply(await asyncio.wait_for(reader.readexactly(REPLY_BYTES), 10)) == 0  # taken
            second, _ = await open_pipe(b"b" * 16)
            assert await asyncio.wait_for(second.read(1), 10) == b""  # past the bound: closed at once
            stranger, _ = await open_pipe(b"c" * 16, received=5)
            assert await asyncio.wait_for(stranger.read(1), 10) == b""  # resuming a pipe it never had
            garbage, garbage_writer = await open_pipe(b"")
            garbage_writer.write(b"x" * 100)
            assert await asyncio.wait_for(garbage.read(1), 10) == b""
            writer.close()
            await relayed.close()
        server.close()

    asyncio.run(main())


async def _carrier_pair() -> tuple[Carrier, Carrier]:
    """Two ends of a local TCP connection, as (reader, writer) pairs."""
    accepted: asyncio.Future[Carrier] = asyncio.get_running_loop().create_future()
    server = await asyncio.start_server(lambda r, w: accepted.set_result((r, w)), "127.0.0.1", 0)
    near = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
    far = await accepted
    server.close()
    return near, far


@pytest.mark.parametrize("limit", [50_000, 150_000])  # resets before the caller moves on; moves first
def test_a_pipe_delivers_every_byte_in_order_across_carrier_resets(limit: int) -> None:
    async def main() -> None:
        (
            caller_app,
            caller_end,
        ) = await _carrier_pair()  # the app writes into caller_app; the pipe reads caller_end
        peer_app, peer_end = await _carrier_pair()
        caller = Pipe(caller_end, pipe_id=b"p" * 16)
        peer = Pipe(peer_end, pipe_id=b"p" * 16)
        carriers = 0
        relays: list[asyncio.Task[None]] = []

        async def relay(a: Carrier, b: Carrier, limit: int) -> None:
            """Copy a -> b until `limit` bytes, then reset both (a relay's data limit)."""
            moved = 0
            try:
                while moved < limit and (data := await a[0].read(4096)):
                    b[1].write(data[: limit - moved])
                    moved += len(data)
            finally:
                a[1].close()
                b[1].close()

        async def reattach() -> bool:
            nonlocal carriers
            carriers += 1
            if carriers > 60:
                return False
            caller_side, relay_in = await _carrier_pair()
            relay_out, peer_side = await _carrier_pair()
            relays.append(asyncio.create_task(relay(relay_in, relay_out, limit)))
            relays.append(asyncio.create_task(relay(relay_out, relay_in, limit)))
            caller.release()  # as RelayDialer does: the old carrier is let go before the counts are told
            received = peer.received
            peer.attach(peer_side, caller.received)
            caller.attach(caller_side, received)
            return True

        await reattach()
        peer_task = asyncio.create_task(peer.run(grace=5))
        caller_task = asyncio.create_task(caller.run(reattach=reattach))
        payload = bytes(range(251)) * 2000  # 502 KB: ten carriers' worth each way
        caller_app[1].write(payload)
        peer_app[1].write(payload[::-1])
        got_peer = await asyncio.wait_for(peer_app[0].readexactly(len(payload)), 30)
        got_caller = await asyncio.wait_for(caller_app[0].readexactly(len(payload)), 30)
        assert got_peer == payload and got_caller == payload[::-1]
        assert carriers > 3
        caller_app[1].close()  # the app closes: both ends finish
        await asyncio.wait_for(asyncio.gather(caller_task, peer_task), 30)
        assert await peer_app[0].read() == b""
        for task in relays:
            task.cancel()
        await asyncio.gather(*relays, return_exceptions=True)

    asyncio.run(main())


def test_dial_back_reaches_a_listening_tls_peer_and_not_a_closed_port(tmp_path: Path) -> None:
    identity = Identity.load_or_create(tmp_path / "peer.key")
    stranger = ServerTls.create(Identity.load_or_create(None))

    async def main() -> None:
        async with _two_nodes(identity) as (prober, peer):
            await DialBack(prober, timeout=2.0).start()
            tls = ServerTls.create(identity)
            server = grpc.aio.server()
            port = server.add_secure_port("127.0.0.1:0", tls.server_credentials())
            await server.start()
            address = f"127.0.0.1:{port}"
            # a certificate another key vouched for: the prober dials nothing for it
            foreign = await check_reachability(peer, address, certificate=stranger.certificate)
            assert (foreign.answered, foreign.reached) == (0, 0)
            assert any("not the sender's" in error for error in foreign.errors)
            own = await check_reachability(peer, address, certificate=tls.certificate, timeout=2.0)
            assert own.reachable is True and own.observed_hosts == ("127.0.0.1",)
            await server.stop(None)
            closed = await check_reachability(peer, address, certificate=tls.certificate, timeout=2.0)
            assert closed.reachable is False
            observed = await check_reachability(peer, None, certificate=None)
            assert observed.answered == 0 and observed.observed_hosts == ("127.0.0.1",)

    asyncio.run(main())


def test_dial_back_refuses_garbage_and_oversized_requests_and_keeps_answering() -> None:
    async def main() -> None:
        async with _two_nodes() as (prober, peer):
            await DialBack(prober, timeout=2.0).start()
            for request in [b"not json\n", b"[1, 2]\n", b'{"address": "unix:1"}\n', b"x" * 200_000 + b"\n"]:
                _, reader, writer = await peer.call_binary_stream_handler(prober.peer_id, DIALBACK_PROTOCOL)
                writer.write(request)
                with contextlib.suppress(ConnectionError):
                    await writer.drain()
                reply = await asyncio.wait_for(reader.read(), 10)
                writer.close()
                assert b'"reached"' not in reply
            observed = await check_reachability(peer, None, certificate=None)
            assert observed.observed_hosts == ("127.0.0.1",)  # still serving

    asyncio.run(main())


def test_a_record_with_relays_round_trips_through_the_dht_format() -> None:
    record = peer_record(0, 1, relay_maddrs=(CIRCUIT,))
    assert PeerRecord.model_validate(record.model_dump(mode="json")) == record


@pytest.mark.parametrize(
    "frame",
    [
        struct.pack("!BI", 0, 1 << 20),  # a data frame larger than any the pipe sends
        struct.pack("!BI", 1, 8) + struct.pack("!Q", 10**6),  # an acknowledgement of bytes never sent
        struct.pack("!BI", 7, 0),  # no such kind
    ],
    ids=["oversized", "ack-beyond-sent", "unknown-kind"],
)
def test_a_pipe_ends_on_a_hostile_frame_without_delivering_anything(frame: bytes) -> None:
    async def main() -> None:
        app, local_end = await _carrier_pair()
        near, far = await _carrier_pair()
        pipe = Pipe(local_end, pipe_id=b"h" * 16)
        with pytest.raises(PipeBroken):
            pipe.attach(near, 5)  # the other end claims bytes this end never sent
        pipe.attach(near, 0)
        running = asyncio.create_task(pipe.run(grace=1.0))
        far[1].write(frame + b"x" * 64)
        await asyncio.wait_for(running, 5)
        assert pipe.finished
        assert await asyncio.wait_for(app[0].read(), 5) == b""  # the local side was closed, nothing written
        far[1].close()

    asyncio.run(main())
