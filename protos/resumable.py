"""A byte pipe that survives the resets of the streams that carry it. A libp2p relay resets every circuit it
carries past its limits (hivemind's relays: 128 KiB each way, 2 minutes), far less than one session moves, so
a relayed gRPC connection rides on a `Pipe`: each end keeps the bytes the other has not acknowledged, and when
the carrier breaks the caller opens a new one and both ends resend from what the other says it received.

    carrier stream:  hello (caller: pipe id + bytes received) -> hello (peer: bytes received) -> frames
    frame:           kind (1 byte) + length (4) + payload      DATA: bytes; ACK: 8-byte count; CLOSE: none

Knows nothing of libp2p or gRPC: carriers are (reader, writer) pairs, the local side one more pair.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections.abc import Awaitable, Callable

logger = logging.getLogger(__name__)

MAGIC = b"crp1"
HELLO_BYTES = len(MAGIC) + 16 + 8
DATA, ACK, CLOSE = 0, 1, 2
MAX_FRAME_BYTES = 1 << 14  # well under a relay circuit's 128 KiB: each carrier moves several frames
ACK_EVERY = 1 << 14  # bytes received between two acknowledgements
MAX_UNACKED = 1 << 20  # bytes a side sends ahead of the other's acknowledgement; then it stops reading
_HEADER = struct.Struct("!BI")
_COUNT = struct.Struct("!Q")

Carrier = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class PipeBroken(Exception):
    """The pipe cannot go on: the other end does not know it, or answered nonsense."""


def hello(pipe_id: bytes, received: int) -> bytes:
    return MAGIC + pipe_id + _COUNT.pack(received)


REPLY_BYTES = 8


def hello_reply(received: int) -> bytes:
    """The relayed end's answer to a hello: the bytes it received so far (0 for a new pipe)."""
    return _COUNT.pack(received)


def parse_reply(data: bytes) -> int:
    if len(data) != REPLY_BYTES:
        raise PipeBroken("not a pipe reply")
    return int(_COUNT.unpack(data)[0])


def parse_hello(data: bytes) -> tuple[bytes, int]:
    """(pipe id, bytes received) of a caller's hello; `PipeBroken` for anything else."""
    if len(data) != HELLO_BYTES or not data.startswith(MAGIC):
        raise PipeBroken("not a pipe hello")
    return data[4:20], _COUNT.unpack(data[20:])[0]


def _send(writer: asyncio.StreamWriter, frame: bytes) -> None:
    """Write a frame to a carrier unless it is closing (a reset carrier's bytes are resent on the next)."""
    if not writer.is_closing():
        writer.write(frame)


class Pipe:
    """One end of a resumable pipe between `local` (a socket of this process) and the other end, reached
    through carriers that come and go (`attach`). `run` moves bytes until either side closes or the pipe
    breaks for good, then closes `local`."""

    def __init__(self, local: Carrier, *, pipe_id: bytes) -> None:
        self.pipe_id = pipe_id
        self.local = local
        self.received = 0  # bytes from the other end written to `local`
        self._acked = 0  # bytes this end sent that the other end acknowledged
        self._unacked = bytearray()  # bytes sent from `_acked` on, kept until acknowledged
        self._local_done = False  # `local` ended: CLOSE follows the data
        self._carrier: Carrier | None = None
        self._attached = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._finished = asyncio.Event()
        self._released: asyncio.Future[None] | None = None  # resolved when the carrier is let go
        self._last_ack = 0

    @property
    def finished(self) -> bool:
        return self._finished.is_set()

    def attach(self, carrier: Carrier, other_received: int) -> None:
        """Carry the pipe on `carrier` from now on: drop what the other end has, resend the rest. Runs
        without awaiting, so no new byte can slip between the resend and later sends."""
        if not self._acked <= other_received <= self._acked + len(self._unacked):
            raise PipeBroken(f"the other end received {other_received} bytes, this end sent {self._acked}+")
        self._trim(other_received)
        self._detach()
        _, writer = self._carrier = carrier
        self._released = asyncio.get_running_loop().create_future()
        view = memoryview(self._unacked)
        for start in range(0, len(view), MAX_FRAME_BYTES):
            chunk = view[start : start + MAX_FRAME_BYTES]
            _send(writer, _HEADER.pack(DATA, len(chunk)) + bytes(chunk))
        if self._local_done:
            _send(writer, _HEADER.pack(CLOSE, 0))
        self._attached.set()

    def _detach(self) -> None:
        if self._carrier is not None:
            self._carrier[1].close()
            self._carrier = None
        if self._released is not None and not self._released.done():
            self._released.set_result(None)
        self._attached.clear()

    def release(self) -> None:
        """Stop reading and writing the current carrier: a caller does so before it tells a new carrier how
        much it received, so that nothing arrives on the old one after the count."""
        self._detach()

    async def released(self) -> None:
        """Until the carrier attached last is let go (a newer one came, it broke, or the pipe ended): a
        stream handler that attached a carrier keeps it open this long."""
        if self._released is not None:
            await self._released

    def _trim(self, acknowledged: int) -> None:
        if acknowledged > self._acked:
            del self._unacked[: acknowledged - self._acked]
            self._acked = acknowledged
            if len(self._unacked) < MAX_UNACKED:
                self._room.set()

    async def run(
        self, *, reattach: Callable[[], Awaitable[bool]] | None = None, grace: float = 30.0
    ) -> None:
        """Move bytes until done. When a carrier breaks, `reattach()` (the caller's end) must attach a new one
        and say whether it could; the other end waits `grace` seconds for it."""
        local_task = asyncio.create_task(self._from_local())
        try:
            while not self._finished.is_set():
                if self._carrier is None:
                    if reattach is not None:
                        if not await reattach():
                            break
                    else:
                        try:
                            await asyncio.wait_for(self._attached.wait(), grace)
                        except TimeoutError:
                            break
                carrier = self._carrier
                if carrier is None:
                    continue
                await self._from_remote(carrier)
                if self._carrier is carrier:
                    self._detach()
        finally:
            local_task.cancel()
            await asyncio.gather(local_task, return_exceptions=True)
            self._detach()
            self.local[1].close()
            self._finished.set()

    async def _from_local(self) -> None:
        reader = self.local[0]
        try:
            while data := await reader.read(MAX_FRAME_BYTES):
                await self._room.wait()
                self._unacked += data
                if len(self._unacked) >= MAX_UNACKED:
                    self._room.clear()
                if self._carrier is not None:
                    _send(self._carrier[1], _HEADER.pack(DATA, len(data)) + data)
                    with contextlib.suppress(ConnectionError, OSError):
                        await self._carrier[1].drain()
        except (ConnectionError, OSError):
            pass
        self._local_done = True
        if self._carrier is not None:
            _send(self._carrier[1], _HEADER.pack(CLOSE, 0))

    async def _from_remote(self, carrier: Carrier) -> None:
        """Frames from one carrier until it breaks (return) or the other end closes (finished)."""
        reader, writer = carrier
        local_writer = self.local[1]
        try:
            while True:
                kind, length = _HEADER.unpack(await reader.readexactly(_HEADER.size))
                if length > MAX_FRAME_BYTES:
                    raise PipeBroken(f"a frame of {length} bytes")
                payload = await reader.readexactly(length)
                if self._carrier is not carrier:  # let go meanwhile: its count was told, these come again
                    return
                if kind == DATA:
                    local_writer.write(payload)
                    self.received += length  # before awaiting: a new carrier resumes from this count
                    await local_writer.drain()
                    if self.received - self._last_ack >= ACK_EVERY:
                        self._last_ack = self.received
                        _send(writer, _HEADER.pack(ACK, _COUNT.size) + _COUNT.pack(self.received))
                elif kind == ACK and length == _COUNT.size:
                    acknowledged = _COUNT.unpack(payload)[0]
                    if acknowledged > self._acked + len(self._unacked):
                        raise PipeBroken("an acknowledgement of bytes never sent")
                    self._trim(acknowledged)
                elif kind == CLOSE:
                    if not self._local_done:  # the other end stops: this one too, and says so
                        self._local_done = True
                        _send(writer, _HEADER.pack(CLOSE, 0))
                        with contextlib.suppress(ConnectionError, OSError):
                            await writer.drain()
                    self._finished.set()
                    return
                else:
                    raise PipeBroken(f"a frame of kind {kind}")
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as e:
            logger.debug(
                "pipe carrier lost pipe=%s received=%d reason=%r", self.pipe_id.hex()[:8], self.received, e
            )
        except PipeBroken as e:
            logger.warning("pipe broken pipe=%s reason=%s", self.pipe_id.hex()[:8], e)
            self._finished.set()
