"""The session table's bookkeeping, without a model or gRPC: reservations, closes, idle expiry, and refusals
that leave the table as it was."""

from __future__ import annotations

import re
import time

import pytest
import torch

from peer import sessions
from peer.sessions import NoRoom, PeerSession, QuotaExceeded, SessionExists, SessionTable, log_id
from protos.errors import CorollaError

BUDGET = 1000
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
        max_length=length,
        wire_dtype=torch.float32,
        last_used=last_used,
    )


def _state(table: SessionTable) -> tuple[int, list[str]]:
    return table.free_tokens, sorted(table.session_ids())


# each step: ("open", id, batch, length) | ("close", id); then the expected (free tokens, open ids)
SCENARIOS = {
    "one session reserves batch x max_length": ([("open", "a", 2, 100)], (800, ["a"])),
    "two sessions add up": ([("open", "a", 2, 100), ("open", "b", 1, 300)], (500, ["a", "b"])),
    "the whole budget": ([("open", "a", 4, 250)], (0, ["a"])),
    "close returns the room": ([("open", "a", 2, 100), ("close", "a")], (BUDGET, [])),
    "close of one keeps the other": (
        [("open", "a", 2, 100), ("open", "b", 1, 300), ("close", "a")],
        (700, ["b"]),
    ),
    "close twice is a no-op": ([("open", "a", 2, 100), ("close", "a"), ("close", "a")], (BUDGET, [])),
    "close of an unknown id is a no-op": ([("open", "a", 1, 10), ("close", "zzz")], (990, ["a"])),
    "room freed by a close fits a new session": (
        [("open", "a", 1, 600), ("close", "a"), ("open", "b", 1, 1000)],
        (0, ["b"]),
    ),
}


@pytest.mark.parametrize(("steps", "expected"), SCENARIOS.values(), ids=SCENARIOS.keys())
def test_budget_accounting(steps: list[tuple], expected: tuple[int, list[str]]) -> None:
    table = SessionTable(BUDGET, idle_timeout=IDLE)
    for kind, session_id, *size in steps:
        if kind == "open":
            table.open(_session(session_id, *size))
        else:
            table.close(session_id)
    assert _state(table) == expected
    assert len(table) == len(expected[1])


REFUSALS = {
    "no room": ([("a", 2, 400)], ("b", 1, 201), NoRoom, "no cache room: session needs 201 tokens"),
    "no room at all": ([("a", 4, 250)], ("b", 1, 1), NoRoom, "0 of 1000 free"),
    "more than the whole budget": ([], ("a", 2, 501), NoRoom, "(batch 2 x length 501), 1000 of 1000 free"),
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
    table = SessionTable(BUDGET, idle_timeout=IDLE)
    sessions = [_session(*args) for args in opened]
    for session in sessions:
        table.open(session)
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
    table = SessionTable(BUDGET, idle_timeout=IDLE)
    for session_id, used in last_used.items():
        table.open(_session(session_id, 1, 100, last_used=used))
    closed = [session for session, reason in table.expire(now) if reason == "idle"]
    assert sorted(s.session_id for s in closed) == expired
    assert all(s.cache is None for s in closed)
    assert _state(table) == (BUDGET - 100 * len(left), left)


def test_touch_keeps_a_session_alive() -> None:
    table = SessionTable(BUDGET, idle_timeout=IDLE)
    session = _session("a", 1, 100, last_used=-1e9)
    table.open(session)
    session.touch()  # now, by the monotonic clock
    assert table.expire() == [] and table.get("a") is session


def test_close_returns_the_session_and_drops_its_cache() -> None:
    table = SessionTable(BUDGET, idle_timeout=IDLE)
    session = _session("a", 1, 100)
    table.open(session)
    session.cache = object()  # type: ignore[assignment]  # stands in for the span's KV cache
    assert table.close("a", reason="test") is session
    assert session.cache is None and table.get("a") is None and table.close("a") is None


def test_a_closed_id_is_refused_until_the_reuse_timeout() -> None:
    # a stale push addressed to a closed id must never land in a new session that took the same id
    table = SessionTable(BUDGET, idle_timeout=IDLE)
    table.open(_session("a", 1, 10))
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
    reusable = SessionTable(BUDGET, idle_timeout=IDLE, reuse_timeout=0.0)
    reusable.open(_session("a", 1, 10))
    reusable.close("a")
    reusable.open(_session("a", 1, 10))
    assert _state(reusable) == (990, ["a"])


def test_closed_ids_are_remembered_up_to_a_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sessions, "MAX_CLOSED_IDS", 2)
    table = SessionTable(BUDGET, idle_timeout=IDLE)
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
        table = SessionTable(BUDGET, idle_timeout=IDLE)
        table.open(_session(secret, 1, 10))
        table.close(secret)
    assert len(caplog.records) == 2 and secret not in caplog.text and "secret" not in caplog.text
    assert f"id={log_id(secret)}" in caplog.text and len(log_id(secret)) == 8


# quotas: (sessions opened as (id, client, batch, length), the refused one, message), on a table of
# BUDGET tokens, 3 sessions in all, 2 per client, 500 tokens per client
QUOTAS = {
    "a client's sessions": (
        [("a", "x", 1, 10), ("b", "x", 1, 10)],
        ("c", "x", 1, 10),
        "client quota: 2 sessions open here, at most 2",
    ),
    "a client's tokens": (
        [("a", "x", 1, 400)],
        ("b", "x", 1, 101),
        "client quota: 400 cache tokens reserved",
    ),
    "a client's tokens in one session": ([], ("a", "x", 2, 251), "would pass the 500 one client may hold"),
    "the peer's sessions": (
        [("a", "x", 1, 10), ("b", "y", 1, 10), ("c", "z", 1, 10)],
        ("d", "w", 1, 10),
        "this peer holds as many sessions as it takes (3)",
    ),
}


def _quota_table() -> SessionTable:
    return SessionTable(
        BUDGET, idle_timeout=IDLE, max_sessions=3, max_client_sessions=2, max_client_tokens=500
    )


@pytest.mark.parametrize(("opened", "refused", "message"), QUOTAS.values(), ids=QUOTAS.keys())
def test_quotas_refuse_and_change_nothing(
    opened: list[tuple[str, str, int, int]], refused: tuple[str, str, int, int], message: str
) -> None:
    table = _quota_table()
    for session_id, client, batch, length in opened:
        table.open(_session(session_id, batch, length, client=client))
    before = _state(table), [table.client_usage(c) for c in "xyzw"]
    session_id, client, batch, length = refused
    with pytest.raises(QuotaExceeded, match=re.escape(message)) as caught:
        table.open(_session(session_id, batch, length, client=client))
    assert isinstance(caught.value, NoRoom)  # RESOURCE_EXHAUSTED: the client tries another peer
    assert (_state(table), [table.client_usage(c) for c in "xyzw"]) == before


def test_a_client_at_its_quota_leaves_room_for_another() -> None:
    table = _quota_table()
    table.open(_session("a", 1, 400, client="x"))
    with pytest.raises(QuotaExceeded):
        table.open(_session("b", 1, 200, client="x"))
    table.open(_session("c", 1, 500, client="y"))
    assert table.client_usage("x") == (1, 400) and table.client_usage("y") == (1, 500)
    table.close("a")
    assert table.client_usage("x") == (0, 0)
    table.open(_session("d", 1, 100, client="x"))  # what a client closes counts no more


def test_a_reservation_without_a_step_is_released() -> None:
    table = SessionTable(BUDGET, idle_timeout=1000.0, first_step_timeout=5.0)
    now = time.monotonic()
    waiting, stepping = _session("a", 1, 100, last_used=now), _session("b", 1, 100, last_used=now)
    table.open(waiting)
    table.open(stepping)
    stepping.touch()
    assert table.expire(waiting.opened_at + 4.0) == []
    assert table.expire(waiting.opened_at + 6.0) == [(waiting, "no first step")]
    assert table.session_ids() == ["b"] and table.free_tokens == BUDGET - 100
