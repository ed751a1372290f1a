"""The peer's planner (`peer.planner`), table-tested with exact plans: which queued jobs run in the next
forward (priority, arrival order, batch keys, token budgets), how prompts are cut into chunks, which jobs
expire or are dropped, and which idle sessions are preempted for cache pages. Pure: no threads, no torch."""

from __future__ import annotations

import itertools

import pytest

from peer.planner import (
    BatchKey,
    BatchPlan,
    Budget,
    Holder,
    Kind,
    Planned,
    Priority,
    Queued,
    plan,
    preempt,
    preempt_slot,
)

SPAN = BatchKey(span=1, start=0, end=4)
OTHER_SPAN = BatchKey(span=2, start=0, end=4)  # another hosted span (the peer moved) with the same blocks
OTHER_BLOCKS = BatchKey(span=1, start=0, end=2)
BACKWARD = BatchKey(span=1, start=0, end=4, kind=Kind.BACKWARD)
UNBATCHED = BatchKey(span=3, start=0, end=4, batches=False)  # a family that cannot batch
BUDGET = Budget(max_batch_tokens=8, max_stateless_tokens=6)
NOW = 10.0
CHUNK, LONE = 128, 4096  # the peer's defaults: --prefill-chunk-tokens, --compute-chunk-tokens


def step(job_id: int, *, order: int | None = None, rows: int = 1, positions: int = 1, **fields) -> Queued:
    """A session step (arrival order = its id unless given)."""
    fields.setdefault("key", SPAN)
    return Queued(
        job_id, Priority.STEP, job_id if order is None else order, rows=rows, remaining=positions, **fields
    )


def prompt(
    job_id: int,
    positions: int,
    *,
    rows: int = 1,
    chunk: int = CHUNK,
    lone: int | None = LONE,
    whole: int | None = None,
    **fields,
) -> Queued:
    """A session step submitted through `Scheduler.prefill` with `positions` left of `whole` (default: all
    of it): a prompt when longer than its chunk."""
    return step(
        job_id,
        rows=rows,
        positions=positions,
        chunk_tokens=chunk,
        lone_chunk_tokens=lone,
        prompt=rows * (positions if whole is None else whole) > chunk,
        **fields,
    )


def stateless(job_id: int, *, rows: int = 1, positions: int = 1, key: BatchKey = SPAN) -> Queued:
    """A piece of a Forward (or Backward) call."""
    return Queued(job_id, Priority.STATELESS, job_id, key, rows=rows, remaining=positions)


def function(job_id: int, priority: Priority = Priority.STEP) -> Queued:
    """An opaque function (`Scheduler.run`)."""
    return Queued(job_id, priority, job_id)


def runs(*pairs: tuple[int, int]) -> tuple[Planned, ...]:
    return tuple(Planned(job_id, positions) for job_id, positions in pairs)


BATCHING = {
    "steps of one span and blocks join": ([step(0), step(1), step(2)], runs((0, 1), (1, 1), (2, 1))),
    "another span does not join": ([step(0), step(1, key=OTHER_SPAN), step(2)], runs((0, 1), (2, 1))),
    "other blocks do not join": ([step(0), step(1, key=OTHER_BLOCKS)], runs((0, 1))),
    "a padded head runs alone": ([step(0, padded=True), step(1)], runs((0, 1))),
    "a padded step does not join": ([step(0), step(1, padded=True), step(2)], runs((0, 1), (2, 1))),
    "a span that cannot batch runs one step": (
        [step(0, key=UNBATCHED), step(1, key=UNBATCHED)],
        runs((0, 1)),
    ),
    # 4 + 5 > 8: passed over; 4 + 2x2 = 8 fits
    "the budget passes over what does not fit": (
        [step(0, positions=4), step(1, positions=5), step(2, rows=2, positions=2)],
        runs((0, 4), (2, 2)),
    ),
    "a head over the budget still runs, alone": ([step(0, positions=20), step(1)], runs((0, 20))),
    "steps before stateless before background": (
        [function(0, Priority.STATELESS), function(1, Priority.BACKGROUND), step(2)],
        runs((2, 1)),
    ),
    "stateless before background": ([function(0, Priority.BACKGROUND), stateless(1)], runs((1, 1))),
    "arrival order within a priority": ([step(5, order=9), step(6, order=3, key=OTHER_SPAN)], runs((6, 1))),
    "companions in arrival order": (
        [step(0, order=0, positions=4), step(1, order=7, positions=4), step(2, order=5, positions=4)],
        runs((0, 4), (2, 4)),
    ),
    "a function runs alone": ([function(0), step(1)], runs((0, 1))),
    "priorities do not mix": ([step(0), stateless(1)], runs((0, 1))),
    "forward and backward pieces do not mix": (
        [stateless(0), stateless(1, key=BACKWARD), stateless(2)],
        runs((0, 1), (2, 1)),
    ),
    # 4 + 3 > 6 (the stateless budget, though 8 would hold it), 4 + 2 = 6
    "stateless pieces batch within their own budget": (
        [stateless(0, rows=2, positions=2), stateless(1, positions=3), stateless(2, positions=2)],
        runs((0, 2), (2, 2)),
    ),
    "backward pieces batch among themselves": (
        [stateless(0, key=BACKWARD), stateless(1), stateless(2, key=BACKWARD)],
        runs((0, 1), (2, 1)),
    ),
}


@pytest.mark.parametrize(("queued", "expected"), BATCHING.values(), ids=BATCHING.keys())
def test_batching(queued: list[Queued], expected: tuple[Planned, ...]) -> None:
    assert plan(queued, budget=BUDGET, now=NOW, decoding=False) == BatchPlan(expected)


LARGE = Budget(max_batch_tokens=1024, max_stateless_tokens=4096)
CHUNKING = {
    "a 1000-token prompt alone: the lone chunk": ([prompt(0, 1000)], False, runs((0, 1000))),
    "a lone chunk smaller than the prompt": ([prompt(0, 1000, lone=512)], False, runs((0, 512))),
    "no lone chunk: the chunk": ([prompt(0, 1000, lone=None)], False, runs((0, 128))),
    "while a session decodes: the chunk": ([prompt(0, 1000)], True, runs((0, 128))),
    "a decode step waiting counts as decoding; the prompt's piece runs without it": (
        [prompt(0, 1000), step(1)],
        False,
        runs((0, 128)),
    ),
    "its rows divide the chunk": ([prompt(0, 1000, rows=3)], True, runs((0, 42))),
    "more rows than the chunk: one position": ([prompt(0, 100, rows=200)], True, runs((0, 1))),
    "the last chunk is what remains": ([prompt(0, 30, whole=1000)], True, runs((0, 30))),
    "a short step is never cut": ([prompt(0, 100)], True, runs((0, 100))),
    "decode steps run together, the prompt's piece after them": (
        [step(0), prompt(1, 1000), step(2)],
        True,
        runs((0, 1), (2, 1)),
    ),
    "pieces of two prompts share a forward": (
        [prompt(0, 1000), prompt(1, 1000), step(2, order=9)],
        True,
        runs((0, 128), (1, 128)),
    ),
    "a stateless piece is never cut": ([stateless(0, rows=4, positions=1000)], True, runs((0, 1000))),
}


@pytest.mark.parametrize(("queued", "decoding", "expected"), CHUNKING.values(), ids=CHUNKING.keys())
def test_chunking(queued: list[Queued], decoding: bool, expected: tuple[Planned, ...]) -> None:
    assert plan(queued, budget=LARGE, now=NOW, decoding=decoding) == BatchPlan(expected)


def _play(*, decoder: bool) -> list[list[tuple[int, int]]]:
    """The executor's loop played on the planner: a 300-token prompt (job 0), and maybe a session (job 1)
    whose next decode step arrives while each forward computes; the prompt's remainder goes back behind
    it (a fresh arrival order). Returns the (job, positions) of each forward."""
    orders = itertools.count()
    queue, remaining, forwards = [prompt(0, 300, order=next(orders))], 300, []
    if decoder:
        queue.append(step(1, order=next(orders)))
    while remaining:
        decided = plan(queue, budget=LARGE, now=NOW, decoding=False)
        ran = {planned.job_id: planned.positions for planned in decided.run}
        forwards.append(list(ran.items()))
        queue = [job for job in queue if job.job_id not in ran]
        if decoder and all(job.job_id != 1 for job in queue):
            queue.append(step(1, order=next(orders)))
        if 0 in ran:
            remaining -= ran[0]
            if remaining:
                queue.append(prompt(0, remaining, order=next(orders), whole=300))
    return forwards


def test_a_prompt_alone_runs_whole_and_beside_a_decoding_session_one_chunk_between_its_steps() -> None:
    assert _play(decoder=False) == [[(0, 300)]]
    assert _play(decoder=True) == [[(0, 128)], [(1, 1)], [(0, 128)], [(1, 1)], [(0, 44)]]


LEAVING = {
    "a passed deadline anywhere in the queue expires": (
        [step(0), step(1, deadline=5.0), step(2, deadline=20.0)],
        BatchPlan(runs((0, 1), (2, 1)), expired=(1,)),
    ),
    "an expired head: the next one runs": (
        [step(0, deadline=5.0), step(1)],
        BatchPlan(runs((1, 1)), expired=(0,)),
    ),
    "a deadline of exactly now still runs": ([step(0, deadline=NOW)], BatchPlan(runs((0, 1)))),
    "a cancelled job is dropped": ([step(0, cancelled=True), step(1)], BatchPlan(runs((1, 1)), dropped=(0,))),
    "cancelled and past its deadline: dropped, not expired": (
        [function(0), step(1, cancelled=True, deadline=1.0)],
        BatchPlan(runs((0, 1)), dropped=(1,)),
    ),
    "everything gone: nothing runs": (
        [step(0, cancelled=True), step(1, deadline=1.0)],
        BatchPlan((), expired=(1,), dropped=(0,)),
    ),
    "an empty queue": ([], BatchPlan()),
}


@pytest.mark.parametrize(("queued", "expected"), LEAVING.values(), ids=LEAVING.keys())
def test_expiry_and_cancellation(queued: list[Queued], expected: BatchPlan) -> None:
    assert plan(queued, budget=BUDGET, now=NOW, decoding=False) == expected


HOLDERS = [  # pages held, last step at
    Holder("a", pages=30, last_used=1.0),
    Holder("b", pages=20, last_used=2.0),
    Holder("c", pages=10, last_used=3.0),
    Holder("empty", pages=0, last_used=0.0),  # holds nothing: preempting it gives no room
]
PREEMPTION = {
    "the free pages suffice": (HOLDERS, 10, 10, ()),
    "the least recently used first": (HOLDERS, 35, 10, ("a",)),
    "just enough of them": (HOLDERS, 45, 10, ("a", "b")),
    "every idle one": (HOLDERS, 70, 10, ("a", "b", "c")),
    "no room even with all of them: nobody": (HOLDERS, 71, 10, None),
    "a busy session is never preempted": (
        [Holder("a", pages=30, last_used=1.0, busy=True), *HOLDERS[1:]],
        35,
        10,
        ("b", "c"),
    ),
    "every other session busy: no room": ([Holder("a", 30, 1.0, busy=True)], 35, 10, None),
    "ties in the given order": ([Holder("x", 5, 1.0), Holder("y", 5, 1.0)], 5, 0, ("x",)),
}


@pytest.mark.parametrize(
    ("holders", "needed", "free", "expected"), PREEMPTION.values(), ids=PREEMPTION.keys()
)
def test_preemption(holders: list[Holder], needed: int, free: int, expected: tuple[str, ...] | None) -> None:
    assert preempt(holders, needed=needed, free=free) == expected


def _held(name: str, network_sessions: int, last_used: float, *, busy: bool = False) -> Holder:
    return Holder(name, pages=1, last_used=last_used, busy=busy, network_sessions=network_sessions)


# a full peer of 256 slots; now = 100, idle after 30 s. A holds 128 sessions, B 96, C 32 (one or two of each
# shown); the newcomer's network holds `mine` of them, `networks` counts it too.
A_OLD, A_NEW, B_OLD, C_OLD = (
    _held("a-old", 128, 10),
    _held("a-new", 128, 60),
    _held("b", 96, 1),
    _held("c", 32, 0),
)
SLOTS = {
    "a newcomer: the largest holder's least recently used": ([A_NEW, A_OLD, B_OLD, C_OLD], 0, 4, "a-old"),
    "the largest holder busy or in use: the next holder over its share": (
        [_held("a-old", 128, 10, busy=True), _held("a-new", 128, 90), B_OLD, C_OLD],
        0,
        4,
        "b",
    ),
    "nobody at or under an even share (64) is taken": ([C_OLD, _held("d", 64, 0)], 0, 4, None),
    "never from a network holding fewer than two more than the newcomer's": ([A_OLD, B_OLD], 127, 3, None),
    "the newcomer's network a holder too": ([A_OLD, B_OLD, C_OLD], 32, 3, "a-old"),
    "recently used sessions are kept": ([_held("a", 128, 75), _held("b", 96, 71)], 0, 4, None),
    "ties in the given order": ([_held("x", 128, 5), _held("y", 128, 5)], 0, 4, "x"),
}


@pytest.mark.parametrize(("holders", "mine", "networks", "expected"), SLOTS.values(), ids=SLOTS.keys())
def test_slot_preemption(holders: list[Holder], mine: int, networks: int, expected: str | None) -> None:
    chosen = preempt_slot(
        holders, mine=mine, networks=networks, max_sessions=256, now=100.0, idle_timeout=30.0
    )
    assert chosen == expected
