"""The peer's session table and KV-cache budget: open, get, close, idle expiry, token accounting.

Pure bookkeeping: it holds each session's cache object but never computes with it.

    budget (max_cache_tokens) ────────────────────────────────────────────┐
    │ session a: batch 1 x max_length 512 │ session b: 2 x 128 │  free   │
    └─────────────────────────────────────┴────────────────────┴─────────┘
A session reserves batch x max_length tokens when it opens and returns them when it closes or expires,
so a step never fails for lack of room once its session is open.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from protos.errors import CorollaError

if TYPE_CHECKING:
    import torch

    from peer.blocks import HostedSpan, SpanCache
    from protos import peer_pb2

logger = logging.getLogger(__name__)


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
    reply: Callable[[Any], None] = lambda _: None  # delivers a reply (or end) on the session's own stream
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

    def __init__(self, max_cache_tokens: int, *, idle_timeout: float) -> None:
        self.max_cache_tokens = max_cache_tokens
        self.idle_timeout = idle_timeout
        self._sessions: dict[str, PeerSession] = {}
        self._reserved = 0

    @property
    def free_tokens(self) -> int:
        return self.max_cache_tokens - self._reserved

    def __len__(self) -> int:
        return len(self._sessions)

    def open(self, session: PeerSession) -> None:
        """Reserve room for `session`; raises NoRoom or SessionExists and then changes nothing."""
        if session.session_id in self._sessions:
            raise SessionExists(f"session {session.session_id!r} is already open")
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
            session.session_id,
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
            logger.info(
                "session close id=%s reason=%s position=%d free_tokens=%d",
                session_id,
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
