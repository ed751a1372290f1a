"""The gateway's admission (`client/admission.py`), table-driven without a server: who generates, who waits,
who gets 429, and which waiting API key a freed slot goes to."""

from __future__ import annotations

import pytest

from client.admission import Admission, Ticket


@pytest.mark.parametrize(
    ("slots", "waiting", "per_key", "arrivals", "refused"),
    [
        (2, 2, 4, "aaaaa", ["full"]),  # one key alone may use every place
        (2, 2, 2, "aaab", ["key_full"]),  # a key's share: b still gets a place
        (1, 0, 1, "ab", ["full"]),  # no waiting room: the second request is refused
        (2, 4, 3, "aaaabbbb", ["key_full", "full"]),  # the whole room is checked first
    ],
)
def test_refusals(slots: int, waiting: int, per_key: int, arrivals: str, refused: list[str]) -> None:
    admission = Admission(num_slots=slots, num_waiting=waiting, max_per_key=per_key)
    results = [admission.admit(key) for key in arrivals]
    assert [r for r in results if isinstance(r, str)] == refused
    admission.grant()
    assert admission.num_running == min(slots, sum(isinstance(r, Ticket) for r in results))


def test_a_freed_slot_goes_to_the_waiting_key_holding_fewest_then_least_recently_granted() -> None:
    admission = Admission(num_slots=2, num_waiting=8, max_per_key=8)
    a1, a2, a3, _ = (admission.admit("a") for _ in range(4))
    assert admission.grant() == [a1, a2]  # a alone: both slots
    b1, b2 = admission.admit("b"), admission.admit("b")
    c1 = admission.admit("c")
    assert admission.grant() == []  # no free slot
    admission.leave(a1)
    assert admission.grant() == [b1]  # b and c hold none; b queued first, neither was ever granted
    admission.leave(a2)
    assert admission.grant() == [c1]  # c holds none
    admission.leave(b1)
    assert admission.grant() == [a3]  # a and b hold none now; b was granted more recently than a
    admission.leave(c1)
    assert admission.grant() == [b2]
    assert (admission.num_running, admission.num_queued) == (2, 1)


def test_leaving_twice_or_while_waiting_frees_exactly_one_place() -> None:
    admission = Admission(num_slots=1, num_waiting=1, max_per_key=2)
    first, second = admission.admit("a"), admission.admit("a")
    assert admission.grant() == [first]
    assert isinstance(second, Ticket)
    admission.leave(second)  # gave up waiting (the client left)
    admission.leave(second)
    assert (admission.num_running, admission.num_queued) == (1, 0)
    assert isinstance(first, Ticket)
    admission.leave(first)
    admission.leave(first)
    assert (admission.num_running, admission.num_queued, admission.admitted("a")) == (0, 0, 0)
    assert isinstance(admission.admit("a"), Ticket) and admission.grant() != []
