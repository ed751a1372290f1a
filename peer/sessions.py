"""The peer's session table and KV-cache budget: open, get, close, idle expiry, token accounting.

Pure bookkeeping: it holds each session's cache object but never computes with it.

    budget (max_cache_tokens) ────────────────────────────────────────────┐
    │ session a: batch 1 x max_length 512 │ session b: 2 x 128 │  free   │
    └─────────────────────────────────────┴────────────────────┴─────────┘
A session reserves batch x max_length tokens when it opens and returns them when it closes or expires,
so a step never fails for lack of room once its session is open. Session ids are capabilities: they are
logged only as a short hash (`log_id`), and an id closed here is refused for `reuse_timeout` seconds so a
stale push can never land in a new session.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from protos.errors import CorollaError

if TYPE_CHECKING:
    import torch

    from peer.blocks import HostedSpan, SpanCache
    from protos import peer_pb2

logger = logging.getLogger(__name__)

MAX_CLOSED_IDS = 65536  # recently closed ids remembered (as 16-byte hashes) to refuse their reuse


def log_id(session_id: str) -> str:
    """What logs show of a session id: a short hash, useless to push with but stable for grep."""
    return hashlib.blake2b(session_id.encode(), digest_size=4).hexdigest()


def _id_key(session_id: str) -> bytes:
    return hashlib.blake2b(session_id.encode(), digest_size=16).digest()


async def _no_reply(_: Any) -> None:
    return None


@dataclass(kw_only=True)
class PeerSession:
    """One open session: its reservation, its cache and where its outputs go next."""

    session_id: str
    start: int
    end: int
    batch_size: int
    max_length: int
    wire_dtype: torch.dtype  # dtype of the hidden states this peer sends on
    cache: SpanCache | None = None  # the span's KV cache, owned by this session; None once closed
    span: HostedSpan | None = None  # the span the session runs on (the peer may move meanwhile)
    next_hops: list[peer_pb2.Hop] = field(default_factory=list)
    position: int = 0  # positions already in the cache
    last_used: float = field(default_factory=time.monotonic)
    # delivers a reply on the session's own stream; waits while the stream's bounded queue is full
    reply: Callable[[Any], Awaitable[None]] = _no_reply
    finish: Callable[[Any], None] = lambda _: None  # ends the session's stream with a status, never waits
    push_token: bytes = b""  # a push must carry these bytes; empty: the session takes no pushes
    pending_pushes: int = 0  # pushes accepted and not yet run
    tasks: set[asyncio.Task[None]] = field(default_factory=set)  # pushed steps queued on this session
    report_outputs: bool = False  # send every step's output to the client too
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one step at a time, in order

    @property
    def reserved_tokens(self) -> int:
        return self.batch_size * self.max_length

    def touch(self) -> None:
        self.last_used = time.monotonic()


class NoRoom(CorollaError):
    """The cache budget cannot hold the session's reservation: another peer may have room."""


class SessionExists(CorollaError):
    """A session with this id is already open here; the caller chose a duplicate id."""


class SessionTable:
    """Sessions by id with a token budget. Not thread-safe: used from the peer's event loop only."""

    def __init__(
        self, max_cache_tokens: int, *, idle_timeout: float, reuse_timeout: float | None = None
    ) -> None:
        self.max_cache_tokens = max_cache_tokens
        self.idle_timeout = idle_timeout
        self.reuse_timeout = idle_timeout if reuse_timeout is None else reuse_timeout
        self._sessions: dict[str, PeerSession] = {}
        self._closed: OrderedDict[bytes, float] = OrderedDict()  # id hash -> when it closed, oldest first
        self._reserved = 0

    @property
    def free_tokens(self) -> int:
        return self.max_cache_tokens - self._reserved

    def __len__(self) -> int:
        return len(self._sessions)

    def open(self, session: PeerSession) -> None:
        """Reserve room for `session`; raises NoRoom or SessionExists and then changes nothing."""
        if session.session_id in self._sessions or self._recently_closed(session.session_id):
            raise SessionExists("this session id is in use or was used recently: choose a fresh random id")
        if session.reserved_tokens > self.free_tokens:
            raise NoRoom(
                f"no cache room: session needs {session.reserved_tokens} tokens "
                f"(batch {session.batch_size} x length {session.max_length}), {self.free_tokens} of "
                f"{self.max_cache_tokens} free"
            )
        self._sessions[session.session_id] = session
        self._reserved += session.reserved_tokens
        logger.info(
            "session open id=%s span=[%d,%d) batch=%d max_length=%d free_tokens=%d",
            log_id(session.session_id),
            session.start,
            session.end,
            session.batch_size,
            session.max_length,
            self.free_tokens,
        )

    def get(self, session_id: str) -> PeerSession | None:
        return self._sessions.get(session_id)

    def close(self, session_id: str, *, reason: str = "closed") -> PeerSession | None:
        session = self._sessions.pop(session_id, None)
        if session is not None:
            self._reserved -= session.reserved_tokens
            session.cache = None
            self._remember_closed(session_id)
            for task in session.tasks:  # pushed steps still queued would only find the session gone
                task.cancel()
            logger.info(
                "session close id=%s reason=%s position=%d free_tokens=%d",
                log_id(session_id),
                reason,
                session.position,
                self.free_tokens,
            )
        return session

    def expire(self, now: float | None = None) -> list[PeerSession]:
        """Close sessions idle for longer than the timeout; returns them."""
        now = time.monotonic() if now is None else now
        idle = [sid for sid, s in self._sessions.items() if now - s.last_used > self.idle_timeout]
        return [session for sid in idle if (session := self.close(sid, reason="idle")) is not None]

    def session_ids(self) -> list[str]:
        return list(self._sessions)

    def _recently_closed(self, session_id: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        while self._closed and now - next(iter(self._closed.values())) >= self.reuse_timeout:
            self._closed.popitem(last=False)
        return _id_key(session_id) in self._closed

    def _remember_closed(self, session_id: str) -> None:
        key = _id_key(session_id)
        self._closed[key] = time.monotonic()
        self._closed.move_to_end(key)
        while len(self._closed) > MAX_CLOSED_IDS:
            self._closed.popitem(last=False)
