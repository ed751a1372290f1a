"""A stranger's headers-only gRPC calls, spoken in raw HTTP/2 over asyncio: each stream sends its request
headers and never a message nor the end of its request, the way a caller holds a server's call slots.
Raw frames rather than grpc's client, so a flood can come from another loopback address (127.0.0.2) than
the honest caller's, and so nothing on the client side queues, retries or reads for it.

Only what the flood needs: HPACK literals without indexing (no Huffman, no dynamic table), SETTINGS and
PING acknowledged, a stream counted as ended when the server sends its trailers or resets it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_DATA, _HEADERS, _RST_STREAM, _SETTINGS, _PING, _GOAWAY = 0x0, 0x1, 0x3, 0x4, 0x6, 0x7
_END_STREAM, _ACK, _END_HEADERS = 0x1, 0x1, 0x4
_FRAME_HEADER = 9
CONNECT_TIMEOUT = 10.0  # seconds to open a connection (TLS handshake included)


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


def _integer(value: int, prefix_bits: int = 7) -> bytes:
    """HPACK's integer with a `prefix_bits` prefix (RFC 7541 5.1), the prefix's other bits zero."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([value])
    out, value = bytearray([limit]), value - limit
    while value >= 128:
        out.append(value % 128 + 128)
        value //= 128
    out.append(value)
    return bytes(out)


def _literal(name: str, value: str) -> bytes:
    """A header field as a literal without indexing, with a literal name (RFC 7541 6.2.2)."""
    raw_name, raw_value = name.encode(), value.encode()
    return b"\x00" + _integer(len(raw_name)) + raw_name + _integer(len(raw_value)) + raw_value


def request_headers(
    target: str, method: str, *, tls: bool, metadata: Sequence[tuple[str, str]] = ()
) -> bytes:
    """The HPACK block of a gRPC request to `method` ("/package.Service/Method") at `target` (host:port)."""
    fields = [
        (":method", "POST"),
        (":scheme", "https" if tls else "http"),
        (":path", method),
        (":authority", target),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        *metadata,
    ]
    return b"".join(_literal(name, value) for name, value in fields)


@dataclass
class Connection:
    """One HTTP/2 connection carrying headers-only calls; `ended` holds the streams the server ended."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    opened: dict[int, float] = field(default_factory=dict)  # stream id: when it was opened (monotonic)
    ended: dict[int, float] = field(default_factory=dict)  # stream id: when the server ended it
    goaway: bool = False
    _next_stream: int = 1
    _task: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, host: str, port: int, *, source: str | None = None, tls: bool = False) -> Connection:
        context = None
        if tls:  # a stranger trusts any certificate: it only wants the server to take its streams
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            context.set_alpn_protocols(["h2"])
        local = (source, 0) if source is not None else None
        opening = asyncio.open_connection(host, port, ssl=context, local_addr=local)
        reader, writer = await asyncio.wait_for(opening, CONNECT_TIMEOUT)
        connection = cls(reader, writer)
        writer.write(PREFACE + _frame(_SETTINGS, 0, 0))
        await writer.drain()
        connection._task = asyncio.create_task(connection._read())
        return connection

    async def calls(self, headers: bytes, count: int) -> None:
        """`count` more streams, each sending `headers` and nothing else (the request stays open)."""
        now = time.monotonic()
        for _ in range(count):
            self.opened[self._next_stream] = now
            self.writer.write(_frame(_HEADERS, _END_HEADERS, self._next_stream, headers))
            self._next_stream += 2
        await self.writer.drain()

    async def refill(self, headers: bytes, open_streams: int) -> None:
        """New calls in place of those the server ended, up to `open_streams` open ones."""
        if not self.goaway and open_streams > self.open_streams:
            await self.calls(headers, open_streams - self.open_streams)

    def held(self) -> list[float]:
        """How long the server has held each stream: until it ended it, or until now."""
        now = time.monotonic()
        return [self.ended.get(stream, now) - opened for stream, opened in self.opened.items()]

    async def _read(self) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            while True:
                header = await self.reader.readexactly(_FRAME_HEADER)
                length, kind, flags = int.from_bytes(header[:3], "big"), header[3], header[4]
                stream = int.from_bytes(header[5:], "big") & 0x7FFFFFFF
                payload = await self.reader.readexactly(length)
                if kind == _SETTINGS and not flags & _ACK:
                    self.writer.write(_frame(_SETTINGS, _ACK, 0))
                elif kind == _PING and not flags & _ACK:
                    self.writer.write(_frame(_PING, _ACK, 0, payload))
                elif kind == _RST_STREAM or (kind in (_HEADERS, _DATA) and flags & _END_STREAM):
                    self.ended.setdefault(stream, time.monotonic())
                elif kind == _GOAWAY:
                    self.goaway = True

    @property
    def open_streams(self) -> int:
        return len(self.opened) - len(self.ended)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError, TimeoutError):
            await asyncio.wait_for(self.writer.wait_closed(), 2.0)


@dataclass
class Flood:
    """Connections that each keep `calls_per_connection` headers-only calls open (see `refill`)."""

    connections: list[Connection]
    headers: bytes
    calls_per_connection: int

    async def refill(self) -> None:
        """Opens new calls in place of those the server ended: the stranger never lets go."""
        for connection in self.connections:
            await connection.refill(self.headers, self.calls_per_connection)

    @property
    def open_streams(self) -> int:
        return sum(connection.open_streams for connection in self.connections)

    @property
    def ended(self) -> int:
        return sum(len(connection.ended) for connection in self.connections)

    def longest_held(self) -> float:
        """Seconds the server held the call it held longest (ended or not)."""
        return max((held for connection in self.connections for held in connection.held()), default=0.0)


@contextlib.asynccontextmanager
async def flood(
    address: str,
    method: str,
    *,
    num_connections: int,
    calls_per_connection: int,
    source: str | None = None,
    tls: bool = False,
    metadata: Sequence[tuple[str, str]] = (),
) -> AsyncIterator[Flood]:
    """`num_connections` connections to `address` (host:port) from `source`, each with
    `calls_per_connection` headers-only calls to `method` ("/package.Service/Method"); all closed on exit."""
    host, _, port = address.rpartition(":")
    headers = request_headers(address, method, tls=tls, metadata=metadata)
    connections: list[Connection] = []
    try:
        for _ in range(num_connections):
            connection = await Connection.open(host, int(port), source=source, tls=tls)
            connections.append(connection)
            await connection.calls(headers, calls_per_connection)
        yield Flood(connections, headers, calls_per_connection)
    finally:
        await asyncio.gather(*(connection.close() for connection in connections), return_exceptions=True)
