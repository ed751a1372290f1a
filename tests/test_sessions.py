"""The session table's bookkeeping, without a model or gRPC: cache pages taken and returned, preemption,
closes, idle expiry, quotas, and refusals that leave the table as it was."""

from __future__ import annotations

import re
import time

import pytest
import torch

from peer import sessions
from peer.sessions import NoRoom, PeerSession, QuotaExceeded, SessionExists, SessionTable, log_id
from protos.errors import CorollaError

BUDGET = 1000
PAGE = 10  # tokens per page: the pool holds 100 pages
IDLE = 10.0


def _session(
    session_id: str, batch: int, length: int, *, last_used: float = 0.0, client: str = "ipv4:10.0.0.1"
) -> PeerSession:
    return PeerSession(
        session_id=session_id,
        client=client,
        start=0,
        end=2,
        batch_size=batch,
        max_length=max(length, 1),
        wire_dtype=torch.float32,
        last_used=last_used,
    )


def _table(**options: float) -> SessionTable:
    return SessionTable(BUDGET, idle_timeout=IDLE, page_tokens=PAGE, **options)  # type: ignore[arg-type]


def _idle(_: PeerSession) -> bool:
    return False


def _open(table: SessionTable, session: PeerSession, positions: int | None = None) -> PeerSession:
    """Open `session` and give it the pages of `positions` cached positions (default: its max_length)."""
    table.open(session)
    table.resize(session, session.max_length if positions is None else positions, busy=_idle)
    return session


def _state(table: SessionTable) -> tuple[int, list[str]]:
    return table.free_tokens, sorted(table.session_ids())


# each step: ("open", id, batch) | ("grow", id, positions) | ("close", id); then (free tokens, open ids)
SCENARIOS = {
    "an open session holds no page": ([("open", "a", 2)], (1000, ["a"])),
    "pages are whole, per row": ([("open", "a", 2), ("grow", "a", 15)], (960, ["a"])),
    "two sessions add up": (
        [("open", "a", 2), ("grow", "a", 15), ("open", "b", 1), ("grow", "b", 300)],
        (660, ["a", "b"]),
    ),
    "growing again takes only the new pages": (
        [("open", "a", 1), ("grow", "a", 15), ("grow", "a", 21), ("grow", "a", 30)],
        (970, ["a"]),
    ),
    "a rollback returns pages": ([("open", "a", 1), ("grow", "a", 95), ("grow", "a", 31)], (960, ["a"])),
    "the whole pool": ([("open", "a", 4), ("grow", "a", 250)], (0, ["a"])),
    "close returns the pages": ([("open", "a", 2), ("grow", "a", 100), ("close", "a")], (BUDGET, [])),
    "close of one keeps the other": (
        [("open", "a", 2), ("grow", "a", 100), ("open", "b", 1), ("grow", "b", 300), ("close", "a")],
        (700, ["b"]),
    ),
    "close twice is a no-op": ([("open", "a", 2), ("close", "a"), ("close", "a")], (BUDGET, [])),
    "close of an unknown id is a no-op": (
        [("open", "a", 1), ("grow", "a", 10), ("close", "z")],
        (990, ["a"]),
    ),
}


@pytest.mark.parametrize(("steps", "expected"), SCENARIOS.values(), ids=SCENARIOS.keys())
def test_page_accounting(steps: list[tuple], expected: tuple[int, list[str]]) -> None:
    table = _table()
    for kind, session_id, *size in steps:
        if kind == "open":
            table.open(_session(session_id, size[0], 2048))
        elif kind == "grow":
            session = table.get(session_id)
            assert session is not None
            assert table.resize(session, size[0], busy=_idle) == []
        else:
            table.close(session_id)
    assert _state(table) == expected
    assert len(table) == len(expected[1])


def test_sixty_four_short_sessions_of_max_length_2048_share_a_pool_of_8192_tokens() -> None:
    table = SessionTable(8192, idle_timeout=IDLE)  # the default page: 16 tokens
    opened = [_open(table, _session(f"s{i}", 1, 2048, client=f"c{i}"), 100) for i in range(64)]
    assert len(table) == 64 and table.preempted == 0
    assert table.free_tokens == 8192 - 64 * 112  # 7 pages of 16 for 100 positions each
    assert all(table.get(session.session_id) is session for session in opened)


def _full_table() -> tuple[SessionTable, list[PeerSession]]:
    """A pool of 100 pages held by a (used first), b and c (used last), 30 pages each, 10 free."""
    table = _table(max_client_tokens=2 * BUDGET)
    held = [
        _open(table, _session(name, 1, positions, last_used=used, client=name), positions)
        for name, used, positions in (("b", 2.0, 300), ("a", 1.0, 300), ("c", 3.0, 300), ("new", 4.0, 0))
    ]
    return table, held


def test_a_step_beyond_the_free_pages_preempts_the_least_recently_used_idle_session() -> None:
    table, (b, a, _, new) = _full_table()
    assert table.resize(new, 350, busy=_idle) == [a]  # 35 pages: 10 free + a's 30
    assert table.get("a") is None and a.cache is None and table.preempted == 1
    assert new.pages == 35 and table.free_tokens == 50
    assert table.resize(new, 700, busy=_idle) == [b]  # then the next least recently used
    assert _state(table) == (0, ["c", "new"])


def test_sessions_with_a_step_under_way_are_not_preempted() -> None:
    table, (b, a, _, new) = _full_table()
    assert table.resize(new, 350, busy=lambda s: s is a) == [b]
    assert _state(table) == (50, ["a", "c", "new"])


REFUSED_GROWTH = {
    "every other session busy": (lambda s: True, 350),
    "more than preempting all could free": (_idle, 1001),
}


@pytest.mark.parametrize(("busy", "positions"), REFUSED_GROWTH.values(), ids=REFUSED_GROWTH.keys())
def test_growth_that_finds_no_room_fails_and_changes_nothing(busy, positions: int) -> None:
    table, held = _full_table()
    before = _state(table), [s.pages for s in held]
    with pytest.raises(NoRoom, match="no cache room: the step needs"):
        table.resize(held[-1], positions, busy=busy)
    assert (_state(table), [s.pages for s in held]) == before and table.preempted == 0


REFUSALS = {
    "same id": (
        [("a", 1, 10)],
        ("a", 1, 10),
        SessionExists,
        "this session id is in use or was used recently",
    ),
    "same id, even when it would not fit": ([("a", 1, 10)], ("a", 9, 999), SessionExists, "in use"),
}


@pytest.mark.parametrize(("opened", "refused", "error", "message"), REFUSALS.values(), ids=REFUSALS.keys())
def test_refused_open_changes_nothing(
    opened: list[tuple[str, int, int]], refused: tuple[str, int, int], error: type[Exception], message: str
) -> None:
    table = _table()
    sessions = [_open(table, _session(*args)) for args in opened]
    before = _state(table)
    with pytest.raises(error, match=re.escape(message)) as caught:
        table.open(_session(*refused))
    assert isinstance(caught.value, CorollaError)
    assert _state(table) == before
    assert [table.get(s.session_id) for s in sessions] == sessions  # the open ones are the same objects


@pytest.mark.parametrize(
    ("last_used", "now", "expired", "left"),
    [
        ({"a": 0.0, "b": 5.0}, 10.0, [], ["a", "b"]),  # idle exactly the timeout: still open
        ({"a": 0.0, "b": 5.0}, 10.5, ["a"], ["b"]),
        ({"a": 0.0, "b": 5.0}, 100.0, ["a", "b"], []),
        ({}, 100.0, [], []),
    ],
)
def test_expire_closes_idle_sessions(
    last_used: dict[str, float], now: float, expired: list[str], left: list[str]
) -> None:
    table = _table()
    for session_id, used in last_used.items():
        _open(table, _session(session_id, 1, 100, last_used=used))
    closed = [session for session, reason in table.expire(now) if reason == "idle"]
    assert sorted(s.session_id for s in closed) == expired
    assert all(s.cache is None for s in closed)
    assert _state(table) == (BUDGET - 100 * len(left), left)


def test_touch_keeps_a_session_alive() -> None:
    table = _table()
    session = _session("a", 1, 100, last_used=-1e9)
    table.open(session)
    session.touch()  # now, by the monotonic clock
    assert table.expire() == [] and table.get("a") is session


def test_close_returns_the_session_and_drops_its_cache() -> None:
    table = _table()
    session = _session("a", 1, 100)
    table.open(session)
    session.cache = object()  # type: ignore[assignment]  # stands in for the span's KV cache
    assert table.close("a", reason="test") is session
    assert session.cache is None and table.get("a") is None and table.close("a") is None


def test_a_closed_id_is_refused_until_the_reuse_timeout() -> None:
    # a stale push addressed to a closed id must never land in a new session that took the same id
    table = _table()
    _open(table, _session("a", 1, 10))
    table.close("a")
    with pytest.raises(SessionExists, match="used recently"):
        table.open(_session("a", 1, 10))
    expired = _session("b", 1, 10, last_used=-1e9)
    table.open(expired)
    assert table.expire() == [(expired, "idle")]
    with pytest.raises(SessionExists):
        table.open(_session("b", 1, 10))
    assert _state(table) == (BUDGET, [])
    table.open(_session("c", 1, 10))  # other ids are not affected
    reusable = _table(reuse_timeout=0.0)
    _open(reusable, _session("a", 1, 10))
    reusable.close("a")
    _open(reusable, _session("a", 1, 10))
    assert _state(reusable) == (990, ["a"])


def test_closed_ids_are_remembered_up_to_a_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sessions, "MAX_CLOSED_IDS", 2)
    table = _table()
    for session_id in "abc":
        table.open(_session(session_id, 1, 10))
        table.close(session_id)
    table.open(_session("a", 1, 10))  # the oldest was forgotten: memory stays bounded
    for session_id in "bc":
        with pytest.raises(SessionExists):
            table.open(_session(session_id, 1, 10))


def test_logs_show_only_a_short_hash_of_an_id(caplog: pytest.LogCaptureFixture) -> None:
    secret = "0123456789abcdef-secret-session-id"
    with caplog.at_level("INFO", logger="peer.sessions"):
        table = _table()
        table.open(_session(secret, 1, 10))
        table.close(secret)
    assert len(caplog.records) == 2 and secret not in caplog.text and "secret" not in caplog.text
    assert f"id={log_id(secret)}" in caplog.text and len(log_id(secret)) == 8


# quotas: (sessions opened as (id, client, batch, positions), the refused one, message), on a pool of
# BUDGET tokens, 3 sessions in all, 2 per client, 500 tokens of pages per client
QUOTAS = {
    "a client's sessions": (
        [("a", "x", 1, 10), ("b", "x", 1, 10)],
        ("c", "x", 1, 10),
        "client quota: 2 sessions open here, at most 2",
    ),
    "a client's tokens": (
        [("a", "x", 1, 400)],
        ("b", "x", 1, 101),
        "client quota: 400 cache tokens held here",
    ),
    "a client's tokens in one session": ([], ("a", "x", 2, 251), "would pass the 500 one client may hold"),
    "the peer's sessions": (
        [("a", "x", 1, 10), ("b", "y", 1, 10), ("c", "z", 1, 10)],
        ("d", "w", 1, 10),
        "this peer holds as many sessions as it takes (3)",
    ),
}


def _quota_table() -> SessionTable:
    return _table(max_sessions=3, max_client_sessions=2, max_client_tokens=500)


@pytest.mark.parametrize(("opened", "refused", "message"), QUOTAS.values(), ids=QUOTAS.keys())
def test_quotas_refuse_and_change_nothing(
    opened: list[tuple[str, str, int, int]], refused: tuple[str, str, int, int], message: str
) -> None:
    table = _quota_table()
    for session_id, client, batch, length in opened:
        _open(table, _session(session_id, batch, length, client=client))
    before = _state(table), [table.client_usage(c) for c in "xyzw"]
    session_id, client, batch, length = refused
    with pytest.raises(QuotaExceeded, match=re.escape(message)) as caught:
        _open(table, _session(session_id, batch, length, client=client))
    assert isinstance(caught.value, NoRoom)  # RESOURCE_EXHAUSTED: the client tries another peer
    opened_ids = {s[0] for s in opened}
    table.close(session_id) if session_id not in opened_ids else None  # a refused growth leaves it open
    assert (_state(table), [table.client_usage(c) for c in "xyzw"]) == before


def test_a_client_at_its_quota_leaves_room_for_another() -> None:
    table = _quota_table()
    _open(table, _session("a", 1, 400, client="x"))
    with pytest.raises(QuotaExceeded):
        _open(table, _session("b", 1, 200, client="x"))
    table.close("b")
    _open(table, _session("c", 1, 500, client="y"))
    assert table.client_usage("x") == (1, 400) and table.client_usage("y") == (1, 500)
    table.close("a")
    assert table.client_usage("x") == (0, 0)
    _open(table, _session("d", 1, 100, client="x"))  # what a client closes counts no more


def test_a_session_without_a_step_is_closed() -> None:
    table = SessionTable(BUDGET, idle_timeout=1000.0, first_step_timeout=5.0, page_tokens=PAGE)
    now = time.monotonic()
    waiting, stepping = _session("a", 1, 100, last_used=now), _session("b", 1, 100, last_used=now)
    table.open(waiting)
    _open(table, stepping)
    stepping.touch()
    assert table.expire(waiting.opened_at + 4.0) == []
    assert table.expire(waiting.opened_at + 6.0) == [(waiting, "no first step")]
    assert table.session_ids() == ["b"] and table.free_tokens == BUDGET - 100


# ---- networks and squatting (security review 3, H2) ----------------------------------------------------

NOW = 1000.0  # the clock of the preemption scenarios; IDLE (10 s) is also their preempt_idle_timeout


def _client(network: str, host: int = 1) -> str:
    """A client key (`requests.client_key`) in a network named by a letter: A is 10.0.1.0/24, B 10.0.2.0/24,
    ...; the v6 networks a and b are /48s, each host a /64 of them."""
    if network.islower():
        return f"ipv6:2001:db8:{ord(network) - ord('a') + 1}:{host}::/64"
    return f"ipv4:10.0.{ord(network) - ord('A') + 1}.{host}"


NETWORKS = {
    "an IPv4 address counts under its /24": ("ipv4:203.0.113.77", "ipv4:203.0.113.0/24"),
    "an IPv6 /64 counts under its /48": ("ipv6:2001:db8:7:9::/64", "ipv6:2001:db8:7::/48"),
    "any other key is a network of its own": ("unknown", "unknown"),
    "a malformed key too": ("ipv4:not-an-address", "ipv4:not-an-address"),
}


@pytest.mark.parametrize(("client", "network"), NETWORKS.values(), ids=NETWORKS.keys())
def test_network_of(client: str, network: str) -> None:
    assert sessions.network_of(client) == network


# each: (open sessions as (id, network, host, seconds since its last step), the newcomer's network and host,
# busy ids) -> the id preempted for it, or None when it is refused; max_sessions is the number opened
PREEMPTIONS = {
    "one network holds all: its oldest idle session goes": (
        [("a1", "A", 1, 50), ("a2", "A", 2, 80), ("a3", "A", 1, 60), ("a4", "A", 3, 70)],
        ("B", 1),
        set(),
        "a2",
    ),
    "a session with a step under way or queued is skipped": (
        [("a1", "A", 1, 50), ("a2", "A", 2, 80), ("a3", "A", 1, 60), ("a4", "A", 3, 70)],
        ("B", 1),
        {"a2"},
        "a4",
    ),
    "a session stepped within the idle timeout is not idle": (
        [("a1", "A", 1, 9), ("a2", "A", 2, 5), ("a3", "A", 1, 1), ("a4", "A", 3, 0)],
        ("B", 1),
        set(),
        None,
    ),
    "idle exactly the timeout counts": (
        [("a1", "A", 1, 10), ("a2", "A", 2, 5), ("a3", "A", 1, 1), ("a4", "A", 3, 0)],
        ("B", 1),
        set(),
        "a1",
    ),
    "the network holding the most goes first, however recent its sessions": (
        [("a1", "A", 1, 20), ("a2", "A", 2, 30), ("a3", "A", 3, 40), ("b1", "B", 1, 500)],
        ("C", 1),
        set(),
        "a3",
    ),
    "then the next network, when the largest has no idle session": (
        [("a1", "A", 1, 1), ("a2", "A", 2, 1), ("a3", "A", 3, 1), ("b1", "B", 1, 500), ("b2", "B", 2, 400)],
        ("C", 1),
        set(),
        "b1",
    ),
    "not from a network at an even share (6 slots / 3 networks = 2)": (
        [
            *[(f"a{host}", "A", host, 1) for host in range(1, 5)],  # all stepped a second ago
            *[("b1", "B", 1, 500), ("b2", "B", 2, 400)],
        ],
        ("C", 1),
        set(),
        None,
    ),
    "one session each: a newcomer takes nobody's": (
        [("a1", "A", 1, 90), ("b1", "B", 1, 80), ("c1", "C", 1, 70), ("d1", "D", 1, 60)],
        ("E", 1),
        set(),
        None,
    ),
    "the newcomer must stay at or below the victim's network": (
        [("a1", "A", 1, 90), ("a2", "A", 1, 80), ("b1", "B", 1, 70), ("b2", "B", 2, 60)],
        ("B", 3),
        set(),
        None,
    ),
    "two more than the newcomer's network: taken": (
        [("a1", "A", 1, 90), ("a2", "A", 1, 80), ("a3", "A", 2, 70), ("b1", "B", 2, 60)],
        ("B", 3),
        set(),
        "a1",
    ),
    "IPv6 /64s of one /48 count together": (
        [("x1", "a", 1, 90), ("x2", "a", 2, 80), ("x3", "a", 3, 70), ("y1", "b", 1, 900)],
        ("b", 2),
        set(),
        "x1",
    ),
}


def _squatted(opened: list[tuple[str, str, int, float]], **options: float) -> SessionTable:
    table = _table(max_sessions=len(opened), preempt_idle_timeout=IDLE, **options)
    for session_id, network, host, idle in opened:
        table.open(_session(session_id, 1, 10, last_used=NOW - idle, client=_client(network, host)))
    return table


@pytest.mark.parametrize(
    ("opened", "newcomer", "busy", "victim"), PREEMPTIONS.values(), ids=PREEMPTIONS.keys()
)
def test_opening_when_full_preempts_the_oldest_idle_session_of_the_largest_holder(
    opened: list[tuple[str, str, int, float]], newcomer: tuple[str, int], busy: set[str], victim: str | None
) -> None:
    table = _squatted(opened)
    ids = sorted(s[0] for s in opened)
    session = _session("new", 1, 10, last_used=NOW, client=_client(*newcomer))
    if victim is None:
        with pytest.raises(QuotaExceeded, match="this peer holds as many sessions as it takes"):
            table.open(session, busy=lambda s: s.session_id in busy, now=NOW)
        assert sorted(table.session_ids()) == ids and table.preempted == 0
        return
    preempted = table.open(session, busy=lambda s: s.session_id in busy, now=NOW)
    assert [s.session_id for s in preempted] == [victim] and preempted[0].cache is None
    assert sorted(table.session_ids()) == sorted([*(set(ids) - {victim}), "new"]) and table.preempted == 1


def test_network_quotas_refuse_and_change_nothing() -> None:
    table = _table(max_network_sessions=2, max_network_tokens=300, max_client_tokens=BUDGET)
    _open(table, _session("a", 1, 200, client=_client("A", 1)))
    _open(table, _session("b", 1, 50, client=_client("A", 2)))  # another address of the same /24
    before = _state(table), table.network_usage("ipv4:10.0.1.0/24")
    assert before[1] == (2, 250)
    with pytest.raises(QuotaExceeded, match=re.escape("network quota: 2 sessions of ipv4:10.0.1.0/24")):
        table.open(_session("c", 1, 10, client=_client("A", 3)))
    b = table.get("b")
    assert b is not None
    with pytest.raises(
        QuotaExceeded, match=re.escape("network quota: 250 cache tokens held here by ipv4:10.0.1.0/24")
    ):
        table.resize(b, 110, busy=_idle)  # 60 more tokens: the address's own quota would allow it
    assert (_state(table), table.network_usage("ipv4:10.0.1.0/24")) == before
    _open(table, _session("d", 1, 300, client=_client("B", 1)))  # another network is not affected
    table.close("a")
    assert table.network_usage("ipv4:10.0.1.0/24") == (1, 50)
    _open(table, _session("c", 1, 10, client=_client("A", 3)))


def _default_table() -> SessionTable:
    from peer.config import PeerConfig

    return SessionTable.from_config(PeerConfig(model="/models/tiny", blocks="0:1"))  # documented defaults


def _squat(table: SessionTable, addresses: list[str], *, stepped: float) -> int:
    """Open sessions from each address until refused (each with a step at `stepped`); returns how many."""
    opened = 0
    for address in addresses:
        for index in range(table.max_sessions):
            session = _session(f"{address}-{index}", 1, 1, last_used=stepped, client=f"ipv4:{address}")
            try:
                table.open(session, now=stepped)
            except QuotaExceeded:
                break
            opened += 1
    return opened


def test_a_client_holding_8_addresses_cannot_keep_a_ninth_from_opening_a_session() -> None:
    # the review's squatter: 8 IPv4 addresses in 8 networks fill all 256 slots with the default limits and
    # keep each session with a 1-token step every 10 minutes
    table, start = _default_table(), time.monotonic()
    squatter = [f"198.51.{network}.7" for network in range(8)]
    assert _squat(table, squatter, stepped=start) == 256 == len(table)
    later = start + 60  # a minute after their last step: idle
    newcomers = [_session(f"new-{n}", 1, 1, last_used=later, client=f"ipv4:203.0.{n}.1") for n in range(8)]
    for newcomer in newcomers:
        (victim,) = table.open(newcomer, now=later)
        assert victim.client.startswith("ipv4:198.51.") and victim.cache is None
    assert len(table) == 256 and table.preempted == 8
    # the squatter cannot take the slots back: its addresses hold 31 or 32 each, a newcomer 1
    with pytest.raises(QuotaExceeded, match="as many sessions as it takes"):
        table.open(_session("again", 1, 1, client=f"ipv4:{squatter[0]}"), now=later + 3600)
    assert all(table.get(n.session_id) is n for n in newcomers)


def test_addresses_of_one_network_hold_at_most_a_quarter_of_the_peer() -> None:
    table = _default_table()
    assert _squat(table, [f"198.51.100.{host}" for host in range(1, 9)], stepped=time.monotonic()) == 64
    assert table.network_usage("ipv4:198.51.100.0/24") == (64, 0)
    table.open(_session("ninth", 1, 1, client="ipv4:203.0.113.1"))  # no preemption needed
    assert table.preempted == 0
