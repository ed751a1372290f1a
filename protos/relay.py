"""Reaching peers that nobody can dial: gRPC carried over hivemind's libp2p streams (circuit relay v2 through
public peers), on pipes that outlive the relay's circuit resets (`protos.resumable`). Whether a peer needs
this is the dial-back probe's to say (`protos.dialback`).

A relayed peer speaks the same gRPC messages with the same TLS check: only how the bytes travel changes.

    caller's channel ─▶ unix socket (RelayDialer) ─▶ p2pd ─▶ relay ─▶ p2pd ─▶ RelayedServer ─▶ its gRPC port

Knows nothing of sessions, records or routes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import ipaddress
import logging
import secrets
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hivemind.p2p import P2P, PeerID
from hivemind.p2p.p2p_daemon_bindings.datastructures import StreamInfo
from hivemind.utils.multiaddr import Multiaddr

from protos.errors import CorollaError, InvalidInputError
from protos.records import MAX_RELAY_MADDR_CHARS, MAX_RELAYS
from protos.resumable import (
    HELLO_BYTES,
    REPLY_BYTES,
    Carrier,
    Pipe,
    PipeBroken,
    hello,
    hello_reply,
    parse_hello,
    parse_reply,
)

logger = logging.getLogger(__name__)

GRPC_PROTOCOL = "/corolla/grpc/1"  # a libp2p stream of this protocol is a byte pipe to the peer's gRPC port
MAX_PIPES = 256  # relayed connections a peer serves at once (each one caller's gRPC connection)
MAX_CALLER_PIPES = 32  # of them, from one caller (a libp2p peer id); each holds at most 1 MiB unacknowledged
PIPE_GRACE = 30.0  # seconds a relayed connection waits for a new carrier after its circuit was reset
RESUME_TRIES = 5  # new carriers a caller tries for a pipe in a row (about 3 s of backoff)
MAX_RELAYED_PEERS = 64  # relayed peers a process keeps a local socket for
CONNECT_TIMEOUT = 10.0  # seconds to reach a relayed peer through its relay (a relay's first dial is slow)
_P2P_CODE = bytes([0xA5, 0x03])  # multiaddr code 421 (p2p) as a varint
_CIRCUIT_CODE = bytes([0xA2, 0x02])  # multiaddr code 290 (p2p-circuit) as a varint


class Unreachable(CorollaError):
    """The peer can be reached only through a relay, and this process has no libp2p node to use one."""


def encode_multiaddr(text: str) -> Multiaddr:
    """`text` as a multiaddress whose /p2p/ parts are plain multihashes. hivemind's `Multiaddr("/p2p/...")`
    writes an Ed25519 peer id as a CID, which p2pd cannot read ("length greater than remaining number of
    bytes in buffer"), so relay addresses are built here part by part."""
    if len(text) > MAX_RELAY_MADDR_CHARS or not text.startswith("/"):
        raise InvalidInputError(f"not a multiaddress of at most {MAX_RELAY_MADDR_CHARS} characters: {text!r}")
    encoded = b""
    plain: list[str] = []
    parts = text.strip("/").split("/")
    index = 0
    try:
        while index < len(parts):
            name = parts[index]
            if name == "p2p" and index + 1 < len(parts):
                if plain:
                    encoded += Multiaddr("/" + "/".join(plain)).to_bytes()
                    plain = []
                digest = PeerID.from_base58(parts[index + 1]).to_bytes()
                encoded += _P2P_CODE + _varint(len(digest)) + digest
                index += 2
            elif name == "p2p-circuit":
                if plain:
                    encoded += Multiaddr("/" + "/".join(plain)).to_bytes()
                    plain = []
                encoded += _CIRCUIT_CODE
                index += 1
            else:
                plain.append(name)
                index += 1
        if plain:
            encoded += Multiaddr("/" + "/".join(plain)).to_bytes()
        return Multiaddr(encoded)
    except Exception as e:  # the multiaddr library raises many types on bad input
        raise InvalidInputError(f"not a multiaddress: {text!r} ({e})") from None


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def validate_relay_maddrs(maddrs: Sequence[str]) -> tuple[str, ...]:
    """Relay addresses as a record or a hop carries them: at most `MAX_RELAYS`, each a multiaddress of a
    relay ending in /p2p-circuit; `InvalidInputError` otherwise."""
    if len(maddrs) > MAX_RELAYS:
        raise InvalidInputError(f"at most {MAX_RELAYS} relay addresses, got {len(maddrs)}")
    for maddr in maddrs:
        if not isinstance(maddr, str) or not maddr.endswith("/p2p-circuit") or "/p2p/" not in maddr:
            raise InvalidInputError(
                f"relay address {maddr!r} is not RELAY_MULTIADDR/p2p/RELAY_ID/p2p-circuit"
            )
        encode_multiaddr(maddr)
    return tuple(maddrs)


def circuit_maddrs(relays: Sequence[str]) -> tuple[str, ...]:
    """The addresses through which callers reach a peer holding reservations on `relays` (multiaddresses
    with /p2p/RELAY_ID): each relay's address followed by /p2p-circuit."""
    return tuple(f"{relay.rstrip('/')}/p2p-circuit" for relay in relays[:MAX_RELAYS])


def loopback_source(peer_id: str) -> str:
    """A 127.x.y.z address for the caller `peer_id`: the peer's gRPC server counts calls and sessions per
    client address, and every relayed caller would otherwise be 127.0.0.1."""
    digest = hashlib.sha256(peer_id.encode()).digest()
    return f"127.{digest[0]}.{digest[1]}.{1 + digest[2] % 254}"


class RelayedServer:
    """The relayed peer's side: each caller's pipe (`protos.resumable`) becomes a TCP connection to the local
    gRPC port, from a loopback address of its own per caller; a pipe's later carriers (after a relay reset
    its circuit) resume it. At most `max_pipes` at once, `MAX_CALLER_PIPES` of one caller; a pipe without a
    carrier ends after `PIPE_GRACE`."""

    def __init__(self, p2p: P2P, grpc_port: int, *, grpc_host: str = "127.0.0.1", max_pipes: int = MAX_PIPES):
        self.p2p = p2p
        self.grpc_host = grpc_host
        self.grpc_port = grpc_port
        self.max_pipes = max_pipes
        self._pipes: dict[tuple[str, bytes], Pipe] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        await self.p2p.add_binary_stream_handler(GRPC_PROTOCOL, self._handle)

    async def _handle(
        self, info: StreamInfo, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        caller = info.peer_id.to_base58()
        if task is not None:
            self._tasks.add(task)
        try:
            pipe_id, received = parse_hello(
                await asyncio.wait_for(reader.readexactly(HELLO_BYTES), CONNECT_TIMEOUT)
            )
            pipe = self._pipes.get((caller, pipe_id))
            if pipe is None and received == 0:
                await self._serve(caller, pipe_id, (reader, writer))
            elif pipe is not None:
                writer.write(hello_reply(pipe.received))
                pipe.attach((reader, writer), received)
                await pipe.released()
            else:
                raise PipeBroken("an unknown pipe cannot be resumed")
        except (PipeBroken, asyncio.IncompleteReadError, TimeoutError, ConnectionError, OSError) as e:
            logger.debug("relayed connection dropped caller=%s reason=%r", caller, e)
        finally:
            writer.close()
            if task is not None:
                self._tasks.discard(task)

    async def _serve(self, caller: str, pipe_id: bytes, carrier: Carrier) -> None:
        own = sum(1 for other, _ in self._pipes if other == caller)
        if len(self._pipes) >= self.max_pipes or own >= MAX_CALLER_PIPES:
            logger.warning(
                "relayed connection refused caller=%s reason=full pipes=%d", caller, len(self._pipes)
            )
            return
        local = ipaddress.ip_address(self.grpc_host).is_loopback
        source = (loopback_source(caller), 0) if local else None
        try:
            upstream = await asyncio.wait_for(
                asyncio.open_connection(self.grpc_host, self.grpc_port, local_addr=source), CONNECT_TIMEOUT
            )
        except (OSError, TimeoutError) as e:
            logger.warning("relayed connection failed caller=%s reason=%r", caller, e)
            return
        pipe = self._pipes[(caller, pipe_id)] = Pipe(upstream, pipe_id=pipe_id)
        try:
            carrier[1].write(hello_reply(0))
            pipe.attach(carrier, 0)
            await pipe.run(grace=PIPE_GRACE)
        finally:
            del self._pipes[(caller, pipe_id)]

    async def close(self) -> None:
        with contextlib.suppress(Exception):  # the daemon may be gone already
            await self.p2p.remove_binary_stream_handler(GRPC_PROTOCOL)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


@dataclass
class _Relayed:
    peer_id: str
    maddrs: tuple[str, ...]
    path: Path
    server: asyncio.AbstractServer | None = None


class RelayDialer:
    """The caller's side: one unix socket per relayed peer (in a private folder), each accepted connection
    piped into a libp2p stream to that peer through one of its relays. A gRPC channel to `path()` then does
    the TLS handshake with the peer itself, end to end. The least recently used of `max_peers` is closed."""

    def __init__(self, p2p: P2P, *, max_peers: int = MAX_RELAYED_PEERS) -> None:
        self.p2p = p2p
        self.max_peers = max_peers
        self._folder = tempfile.TemporaryDirectory(prefix="corolla-relay-")  # mode 0700: only this user
        self._peers: collections.OrderedDict[str, _Relayed] = collections.OrderedDict()
        self._tasks: set[asyncio.Task[Any]] = set()

    def target(self, peer_id: str, maddrs: Sequence[str]) -> str:
        """The gRPC target (`unix:PATH`) that reaches `peer_id` through the relays `maddrs`."""
        entry = self._peers.get(peer_id)
        maddrs = tuple(maddrs)
        if entry is None:
            name = hashlib.sha256(peer_id.encode()).hexdigest()[:24]
            entry = self._peers[peer_id] = _Relayed(peer_id, maddrs, Path(self._folder.name) / f"{name}.sock")
            self._spawn(self._listen(entry))
            while len(self._peers) > self.max_peers:
                _, evicted = self._peers.popitem(last=False)
                if evicted.server is not None:
                    evicted.server.close()
        entry.maddrs = maddrs  # the latest record's relays
        self._peers.move_to_end(peer_id)
        return f"unix:{entry.path}"

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _listen(self, entry: _Relayed) -> None:
        entry.path.unlink(missing_ok=True)
        entry.server = await asyncio.start_unix_server(
            lambda reader, writer: self._accept(entry, reader, writer), path=str(entry.path)
        )

    async def _accept(
        self, entry: _Relayed, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        pipe = Pipe((reader, writer), pipe_id=secrets.token_bytes(16))

        async def reattach() -> bool:
            for attempt in range(RESUME_TRIES):
                try:
                    await asyncio.wait_for(self._carry(entry, pipe), CONNECT_TIMEOUT)
                    return True
                except Exception as e:  # p2pd reports failures as several types: try again, a few times
                    logger.debug("relay dial failed peer=%s attempt=%d reason=%r", entry.peer_id, attempt, e)
                    if attempt == 0 and pipe.received == 0 and not pipe.finished:
                        logger.warning("relay dial failed peer=%s reason=%r", entry.peer_id, e)
                    await asyncio.sleep(min(0.2 * 2**attempt, 2.0))
            return False

        if await reattach():
            await pipe.run(reattach=reattach)
        else:
            writer.close()  # the gRPC call fails as UNAVAILABLE

    async def _carry(self, entry: _Relayed, pipe: Pipe) -> None:
        """A new carrier for `pipe`: a libp2p stream to the peer through one of its relays."""
        peer = PeerID.from_base58(entry.peer_id)
        with contextlib.suppress(Exception):  # already connected, or a relay is down: the stream open says
            await self.p2p._client.connect(peer, [encode_multiaddr(maddr) for maddr in entry.maddrs])
        _, reader, writer = await self.p2p.call_binary_stream_handler(peer, GRPC_PROTOCOL)
        try:
            pipe.release()  # the old carrier (if any) carries nothing more: the count below is final
            writer.write(hello(pipe.pipe_id, pipe.received))
            other_received = parse_reply(await reader.readexactly(REPLY_BYTES))
            pipe.attach((reader, writer), other_received)
        except BaseException:
            writer.close()
            raise

    async def close(self) -> None:
        for entry in self._peers.values():
            if entry.server is not None:
                entry.server.close()
        self._peers.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._folder.cleanup()
