"""The peer's session table and KV cache in pages: open, get, close, growth, preemption, idle expiry.

Pure bookkeeping: it holds each session's state and cache object but never computes with it; the locks,
queued pushed steps and reply streams of sessions live with the servicer (`peer.session_runtime`).

    pool (max_cache_tokens / page_tokens pages) ──────────────────────────────────────────┐
    │ a: 7 pages │ b: 2 rows x 1 page │ c: 13 pages │              free pages            │
    └────────────┴────────────────────┴─────────────┴────────────────────────────────────┘
A session holds `batch_size x ceil(positions / page_tokens)` pages: it takes pages as its cache grows and
gives them back when it rolls back or ends, so a session's `max_length` is a limit, not a reservation,
and many short sessions share a pool that would hold few at their full length. When a step needs pages
the pool no longer has, the least recently used sessions with no step under way are preempted (closed;
their clients move them by the usual failover, replaying exactly) to make room; a step that finds no
such room fails alone and leaves its session as it was.

Quotas keep one client from taking it all: at most `max_sessions` sessions in all; per client (its
address, `requests.client_key`) `max_client_sessions` sessions and `max_client_tokens` tokens of pages
held; per network (the client's IPv4 /24 or IPv6 /48: one host's many addresses) `max_network_sessions`
and `max_network_tokens`. A session that gets no step within `first_step_timeout` seconds of opening is
closed. When every session slot is taken, a new session preempts an idle one (no step for
`preempt_idle_timeout` seconds, none under way) of the network holding the most sessions, and only when
that network holds more than an even share (`max_sessions` over the networks holding sessions, the
newcomer's included) and, afterwards, still at least as many as the newcomer's: holders even out and
nobody at or under an even share is ever preempted; the oldest such session goes first.

    full, 3 networks + a newcomer: even share 256 / 4 = 64
    A: 128 ██████████████  ◀── preempt A's oldest idle session
    B:  96 ██████████
    C:  32 ███                 (C and the newcomer are never taken from)
    new: 0

Session ids are capabilities: they are logged only as a short hash (`log_id`), and an id closed here is
refused for `reuse_timeout` seconds so a stale push can never land in a new session.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from peer.planner import Holder, preempt, preempt_slot
from protos.errors import CorollaError

if TYPE_CHECKING:
    import torch

    from peer.adapters import Lora
    from peer.blocks import HostedSpan, SpanCache
    from peer.config import PeerConfig
    from protos import peer_pb2

logger = logging.getLogger(__name__)

MAX_CLOSED_IDS = 65536  # recently closed ids remembered (as 16-byte hashes) to refuse their reuse
DEFAULT_PAGE_TOKENS = 16  # positions of one row per page
IPV4_NETWORK = 24  # one provider's subnet: a host with many IPv4 addresses usually holds them in one /24
IPV6_NETWORK = 48  # one site: providers hand out /48 to /64, so a /48 bounds what one customer holds


def log_id(session_id: str) -> str:
    """What logs show of a session id: a short hash, useless to push with but stable for grep."""
    return hashlib.blake2b(session_id.encode(), digest_size=4).hexdigest()


@functools.lru_cache(maxsize=4096)
def network_of(client: str) -> str:
    """The network a client key (`requests.client_key`: "ipv4:ADDRESS" or "ipv6:NETWORK/64") counts under
    for quotas: its IPv4 /24 or IPv6 /48. Any other key is a network of its own."""
    family, _, address = client.partition(":")
    try:
        if family == "ipv4":
            return f"ipv4:{ipaddress.IPv4Network((address, IPV4_NETWORK), strict=False)}"
        if family == "ipv6":
            network = ipaddress.IPv6Network(address, strict=False)
            if network.prefixlen > IPV6_NETWORK:
                network = network.supernet(new_prefix=IPV6_NETWORK)
            return f"ipv6:{network}"
    except ValueError:
        pass
    return client


def _never(_: PeerSession) -> bool:
    return False


def _id_key(session_id: str) -> bytes:
    return hashlib.blake2b(session_id.encode(), digest_size=16).digest()


@dataclass(kw_only=True)
class PeerSession:
    """One open session's state: its reservation, its cache and where its outputs go next (its lock, queued
    pushes and stream are the servicer's `SessionRuntime`)."""

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
    attention_mask: torch.Tensor | None = None  # [batch, position] bool; None while nothing is padding
    pages: int = 0  # pages of the pool this session holds
    last_used: float = field(default_factory=time.monotonic)
    opened_at: float = field(default_factory=time.monotonic)
    stepped: bool = False  # a step has arrived (a reservation nobody uses is released early)
    push_token: bytes = b""  # a push must carry these bytes; empty: the session takes no pushes
    report_outputs: bool = False  # send every step's output to the client too
    adapter: Lora | None = None  # the served LoRA adapter its steps run with; None: the base model

    def touch(self) -> None:
        self.last_used = time.monotonic()
        self.stepped = True


class NoRoom(CorollaError):
    """The cache pool cannot hold what a session needs: another peer may have room."""


class QuotaExceeded(NoRoom):
    """The client already holds its share of this peer (sessions or cache tokens), or the peer holds as
    many sessions as it takes."""


@dataclass
class _Usage:
    sessions: int = 0
    pages: int = 0


class SessionExists(CorollaError):
    """A session with this id is already open here; the caller chose a duplicate id."""


class SessionTable:
    """Sessions by id over a pool of cache pages. Not thread-safe: used from the peer's event loop only."""

    def __init__(
        self,
        max_cache_tokens: int,
        *,
        idle_timeout: float,
        page_tokens: int = DEFAULT_PAGE_TOKENS,
        reuse_timeout: float | None = None,
        max_sessions: int = 256,
        max_client_sessions: int = 32,
        max_client_tokens: int | None = None,
        max_network_sessions: int | None = None,
        max_network_tokens: int | None = None,
        first_step_timeout: float = 30.0,
        preempt_idle_timeout: float = 30.0,
    ) -> None:
        self.page_tokens = page_tokens
        self.num_pages = max_cache_tokens // page_tokens
        self.max_cache_tokens = self.num_pages * page_tokens
        self.idle_timeout = idle_timeout
        self.reuse_timeout = idle_timeout if reuse_timeout is None else reuse_timeout
        self.max_sessions = max_sessions
        self.max_client_sessions = max_client_sessions
        self.max_client_tokens = max_cache_tokens if max_client_tokens is None else max_client_tokens
        self.max_network_sessions = max_sessions if max_network_sessions is None else max_network_sessions
        self.max_network_tokens = self.max_client_tokens if max_network_tokens is None else max_network_tokens
        self.first_step_timeout = first_step_timeout
        self.preempt_idle_timeout = preempt_idle_timeout
        self.preempted = 0  # sessions closed to make room for others' steps or sessions
        self._sessions: dict[str, PeerSession] = {}
        self._usage: dict[str, _Usage] = {}  # client -> what its open sessions hold
        self._networks: dict[str, _Usage] = {}  # network (`network_of`) -> what its clients' sessions hold
        self._closed: OrderedDict[bytes, float] = OrderedDict()  # id hash -> when it closed, oldest first
        self._used_pages = 0

    @classmethod
    def from_config(cls, config: PeerConfig) -> SessionTable:
        return cls(
            config.max_cache_tokens,
            idle_timeout=config.session_timeout,
            page_tokens=config.page_tokens,
            max_sessions=config.max_sessions,
            max_client_sessions=config.max_client_sessions,
            max_client_tokens=config.client_cache_tokens,
            max_network_sessions=config.max_network_sessions,
            max_network_tokens=config.network_cache_tokens,
            first_step_timeout=config.first_step_timeout,
            preempt_idle_timeout=config.preempt_idle_timeout,
        )

    @property
    def free_pages(self) -> int:
        return self.num_pages - self._used_pages

    @property
    def free_tokens(self) -> int:
        return self.free_pages * self.page_tokens

    def __len__(self) -> int:
        return len(self._sessions)

    def pages_for(self, batch_size: int, positions: int) -> int:
        return batch_size * -(-positions // self.page_tokens)

    def open(
        self, session: PeerSession, *, busy: Callable[[PeerSession], bool] = _never, now: float | None = None
    ) -> list[PeerSession]:
        """Add `session` (it holds no page until its first step). When every slot is taken, preempts (closes)
        the session `preemptible` names; returns the preempted sessions. Raises QuotaExceeded or
        SessionExists and then changes nothing."""
        if session.session_id in self._sessions or self._recently_closed(session.session_id):
            raise SessionExists("this session id is in use or was used recently: choose a fresh random id")
        usage = self._usage.get(session.client, _Usage())
        if usage.sessions >= self.max_client_sessions:
            raise QuotaExceeded(
                f"client quota: {usage.sessions} sessions open here, at most {self.max_client_sessions}"
            )
        network = network_of(session.client)
        held = self._networks.get(network, _Usage()).sessions
        if held >= self.max_network_sessions:
            raise QuotaExceeded(
                f"network quota: {held} sessions of {network} open here, at most {self.max_network_sessions}"
            )
        victims: list[PeerSession] = []
        if len(self._sessions) >= self.max_sessions:
            victim = self.preemptible(network, busy=busy, now=now)
            if victim is None:
                raise QuotaExceeded(f"this peer holds as many sessions as it takes ({self.max_sessions})")
            self.close(victim.session_id, reason="preempted for a new session")
            self.preempted += 1
            victims.append(victim)
        self._sessions[session.session_id] = session
        self._usage.setdefault(session.client, _Usage()).sessions += 1
        self._networks.setdefault(network, _Usage()).sessions += 1
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
        return victims

    def preemptible(
        self, network: str, *, busy: Callable[[PeerSession], bool] = _never, now: float | None = None
    ) -> PeerSession | None:
        """The session a newcomer from `network` may take the slot of (see the module doc): idle and not
        `busy`, of the network holding the most sessions, over an even share and at least two more than
        `network`; the oldest of them. None when no session qualifies."""
        now = time.monotonic() if now is None else now
        holders = [
            Holder(
                session.session_id,
                session.pages,
                session.last_used,
                busy(session),
                self._networks[network_of(session.client)].sessions,
            )
            for session in self._sessions.values()
        ]
        chosen = preempt_slot(
            holders,
            mine=self._networks.get(network, _Usage()).sessions,
            networks=len(self._networks) + (network not in self._networks),
            max_sessions=self.max_sessions,
            now=now,
            idle_timeout=self.preempt_idle_timeout,
        )
        return None if chosen is None else self._sessions[chosen]

    def resize(
        self, session: PeerSession, positions: int, *, busy: Callable[[PeerSession], bool]
    ) -> list[PeerSession]:
        """Give `session` the pages for `positions` cached positions. Pages beyond them go back to the
        pool; missing ones come from the free pages and, when those run short, from preempting (closing)
        the least recently used sessions for which `busy` is False. Returns the preempted sessions; raises
        QuotaExceeded or NoRoom, and then changes nothing, when the room cannot be found."""
        extra = self.pages_for(session.batch_size, positions) - session.pages
        usage = self._usage[session.client]
        if extra <= 0:
            self._take(session, usage, extra)
            return []
        if (usage.pages + extra) * self.page_tokens > self.max_client_tokens:
            raise QuotaExceeded(
                f"client quota: {usage.pages * self.page_tokens} cache tokens held here, "
                f"{extra * self.page_tokens} more would pass the {self.max_client_tokens} one client may hold"
            )
        network = network_of(session.client)
        network_pages = self._networks[network].pages
        if (network_pages + extra) * self.page_tokens > self.max_network_tokens:
            raise QuotaExceeded(
                f"network quota: {network_pages * self.page_tokens} cache tokens held here by {network}, "
                f"{extra * self.page_tokens} more would pass the {self.max_network_tokens} it may hold"
            )
        victims: list[PeerSession] = []
        if extra > self.free_pages:  # the choice is the planner's (`peer.planner.preempt`)
            holders = [
                Holder(other.session_id, other.pages, other.last_used, busy(other))
                for other in self._sessions.values()
                if other is not session and other.pages
            ]
            chosen = preempt(holders, needed=extra, free=self.free_pages)
            if chosen is None:
                raise NoRoom(
                    f"no cache room: the step needs {extra * self.page_tokens} more tokens, "
                    f"{self.free_tokens} of {self.max_cache_tokens} free and every other session is busy"
                )
            victims = [v for session_id in chosen if (v := self.close(session_id, reason="preempted"))]
        self.preempted += len(victims)
        self._take(session, usage, extra)
        return victims

    def _take(self, session: PeerSession, usage: _Usage, pages: int) -> None:
        session.pages += pages
        usage.pages += pages
        self._networks[network_of(session.client)].pages += pages
        self._used_pages += pages

    def client_usage(self, client: str) -> tuple[int, int]:
        """(sessions, cache tokens held) of `client` here."""
        usage = self._usage.get(client, _Usage())
        return usage.sessions, usage.pages * self.page_tokens

    def network_usage(self, network: str) -> tuple[int, int]:
        """(sessions, cache tokens held) of the clients of `network` (`network_of`) here."""
        usage = self._networks.get(network, _Usage())
        return usage.sessions, usage.pages * self.page_tokens

    def get(self, session_id: str) -> PeerSession | None:
        return self._sessions.get(session_id)

    def close(self, session_id: str, *, reason: str = "closed") -> PeerSession | None:
        session = self._sessions.pop(session_id, None)
        if session is not None:
            usage, network = self._usage[session.client], network_of(session.client)
            self._take(session, usage, -session.pages)
            usage.sessions -= 1
            if not usage.sessions:
                del self._usage[session.client]
            self._networks[network].sessions -= 1
            if not self._networks[network].sessions:
                del self._networks[network]
            session.cache = None
            self._remember_closed(session_id)
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
