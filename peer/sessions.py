"""The peer's session table and KV-cache budget: open, get, close, idle expiry, token accounting.

Pure bookkeeping: it holds each session's cache object but never computes with it.

    budget (max_cache_tokens) ────────────────────────────────────────────┐
    │ session a: batch 1 x max_length 512 │ session b: 2 x 128 │  free   │
    └─────────────────────────────────────┴────────────────────┴─────────┘
A session reserves batch x max_length tokens when it opens and returns them when it closes or expires,
so a step never fails for lack of room once its session is open. Quotas keep one client from taking it
all: at most `max_sessions` sessions in all and, per client (its network address), `max_client_sessions`
sessions and `max_client_tokens` reserved tokens; a session that gets no step within `first_step_timeout`
seconds of opening gives its reservation back. Session ids are capabilities: they are
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
    from peer.config import PeerConfig
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
    client: str = ""  # who opened it (`requests.client_key`): quotas count per client
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
    opened_at: float = field(default_factory=time.monotonic)
    stepped: bool = False  # a step has arrived (a reservation nobody uses is released early)
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
        self.stepped = True


class NoRoom(CorollaError):
    """The cache budget cannot hold the session's reservation: another peer may have room."""


class QuotaExceeded(NoRoom):
    """The client already holds its share of this peer (sessions or reserved tokens), or the peer holds
    as many sessions as it takes."""


@dataclass
class _Usage:
    sessions: int = 0
    tokens: int = 0


class SessionExists(CorollaError):
    """A session with this id is already open here; the caller chose a duplicate id."""


class SessionTable:
    """Sessions by id with a token budget. Not thread-safe: used from the peer's event loop only."""

    def __init__(
        self,
        max_cache_tokens: int,
        *,
        idle_timeout: float,
        reuse_timeout: float | None = None,
        max_sessions: int = 256,
        max_client_sessions: int = 32,
        max_client_tokens: int | None = None,
        first_step_timeout: float = 30.0,
    ) -> None:
        self.max_cache_tokens = max_cache_tokens
        self.idle_timeout = idle_timeout
        self.reuse_timeout = idle_timeout if reuse_timeout is None else reuse_timeout
        self.max_sessions = max_sessions
        self.max_client_sessions = max_client_sessions
        self.max_client_tokens = max_cache_tokens if max_client_tokens is None else max_client_tokens
        self.first_step_timeout = first_step_timeout
        self._sessions: dict[str, PeerSession] = {}
        self._usage: dict[str, _Usage] = {}  # client -> what its open sessions hold
        self._closed: OrderedDict[bytes, float] = OrderedDict()  # id hash -> when it closed, oldest first
        self._reserved = 0

    @classmethod
    def from_config(cls, config: PeerConfig) -> SessionTable:
        return cls(
            config.max_cache_tokens,
            idle_timeout=config.session_timeout,
            max_sessions=config.max_sessions,
            max_client_sessions=config.max_client_sessions,
            max_client_tokens=config.client_cache_tokens,
            first_step_timeout=config.first_step_timeout,
        )

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
        self._check_quotas(session)
        self._sessions[session.session_id] = session
        self._reserved += session.reserved_tokens
        usage = self._usage.setdefault(session.client, _Usage())
        usage.sessions += 1
        usage.tokens += session.reserved_tokens
        logger.info(
            "session open id=%s client=%s span=[%d,%d) batch=%d max_length=%d free_tokens=%d",
            log_id(session.session_id),
            log_id(session.client),
            session.start,
            session.end,
            session.batch_size,
            session.max_length,
            self.free_tokens,
        )

    def _check_quotas(self, session: PeerSession) -> None:
        if len(self._sessions) >= self.max_sessions:
            raise QuotaExceeded(f"this peer holds as many sessions as it takes ({self.max_sessions})")
        usage = self._usage.get(session.client, _Usage())
        if usage.sessions >= self.max_client_sessions:
            raise QuotaExceeded(
                f"client quota: {usage.sessions} sessions open here, at most {self.max_client_sessions}"
            )
        if usage.tokens + session.reserved_tokens > self.max_client_tokens:
            raise QuotaExceeded(
                f"client quota: {usage.tokens} cache tokens reserved here, {session.reserved_tokens} more "
                f"would pass the {self.max_client_tokens} one client may hold"
            )

    def client_usage(self, client: str) -> tuple[int, int]:
        """(sessions, reserved tokens) that `client` holds here."""
        usage = self._usage.get(client, _Usage())
        return usage.sessions, usage.tokens

    def get(self, session_id: str) -> PeerSession | None:
        return self._sessions.get(session_id)

    def close(self, session_id: str, *, reason: str = "closed") -> PeerSession | None:
        session = self._sessions.pop(session_id, None)
        if session is not None:
            self._reserved -= session.reserved_tokens
            usage = self._usage[session.client]
            usage.sessions -= 1
            usage.tokens -= session.reserved_tokens
            if not usage.sessions:
                del self._usage[session.client]
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

    def expire(self, now: float | None = None) -> list[tuple[PeerSession, str]]:
        """Close sessions idle for longer than `idle_timeout` and sessions that got no step within
        `first_step_timeout` of opening; returns them with the reason."""
        now = time.monotonic() if now is None else now
        expired: list[tuple[str, str]] = []
        for session_id, session in self._sessions.items():
            if now - session.last_used > self.idle_timeout:
                expired.append((session_id, "idle"))
            elif not session.stepped and now - session.opened_at > self.first_step_timeout:
                expired.append((session_id, "no first step"))
        closed = [(self.close(session_id, reason=why), why) for session_id, why in expired]
        return [(session, why) for session, why in closed if session is not None]

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
