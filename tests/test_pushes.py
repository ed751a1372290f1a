"""Admission of pushed steps without gRPC or a model (security review 3, H1): the shape and size a push must
have before it is queued, and the byte budgets of pushes waiting to run, per client and over the peer."""

from __future__ import annotations

import asyncio
import re

import pytest
import torch

from peer.pushes import MESSAGE_SLACK_BYTES, PushBudget, check_shape, max_step_bytes
from peer.session_runtime import SessionRuntime
from peer.sessions import NoRoom, PeerSession, QuotaExceeded
from protos import peer_pb2
from protos.errors import InvalidInputError

HIDDEN = 64
KIB = 1024


def _session(client: str = "ipv4:10.0.0.1", *, batch: int = 2, max_length: int = 64) -> PeerSession:
    return PeerSession(
        session_id=f"s-{client}-{batch}",
        client=client,
        start=0,
        end=2,
        batch_size=batch,
        max_length=max_length,
        wire_dtype=torch.float32,
    )


def _step(shape: list[int], *, position: int = 0, **fields) -> peer_pb2.Step:
    hidden = peer_pb2.Tensor(dtype="float32", shape=shape)
    return peer_pb2.Step(step_id=1, position=position, hidden=hidden, **fields)


def test_the_largest_honest_step() -> None:
    # float32 hidden states, int64 position ids and mask for each position, int64 beam indices per row
    assert max_step_bytes(2, 3, HIDDEN) == 2 * 3 * (HIDDEN * 4 + 16) + 2 * 8 + MESSAGE_SLACK_BYTES


# each: (claimed hidden shape, fields of the step, bytes on the wire) -> the refusal, or None
SHAPES = {
    "a decode step": ([2, 1, HIDDEN], {}, 600, None),
    "a prompt up to max_length": ([2, 64, HIDDEN], {}, max_step_bytes(2, 64, HIDDEN), None),
    "a step that fits after a rollback": ([2, 60, HIDDEN], {"position": 30, "rollback_to": 4}, 600, None),
    "two dims": ([2, HIDDEN], {}, 600, "hidden: expected 3 dims, got 2"),
    "another batch": ([3, 1, HIDDEN], {}, 600, "hidden batch 3 does not match the session's batch 2"),
    "another width": ([2, 1, 65], {}, 600, "hidden size 65 does not match the model's 64"),
    "no position": ([2, 0, HIDDEN], {}, 600, "a step of 0 positions from position 0 does not fit"),
    "past max_length": ([2, 60, HIDDEN], {"position": 5}, 600, "a step of 60 positions from position 5"),
    "more bytes than its shape takes": (
        [2, 1, HIDDEN],
        {},
        max_step_bytes(2, 1, HIDDEN) + 1,
        "a push of 4657 bytes is more than a [2, 1] step takes",
    ),
}


@pytest.mark.parametrize(("shape", "fields", "nbytes", "refusal"), SHAPES.values(), ids=SHAPES.keys())
def test_a_push_is_checked_before_it_is_queued(
    shape: list[int], fields: dict, nbytes: int, refusal: str | None
) -> None:
    step = _step(shape, **fields)
    if refusal is None:
        check_shape(step, session=_session(), hidden_size=HIDDEN, nbytes=nbytes)
        return
    with pytest.raises(InvalidInputError, match=re.escape(refusal)):
        check_shape(step, session=_session(), hidden_size=HIDDEN, nbytes=nbytes)


def _push(nbytes: int) -> peer_pb2.PushRequest:
    """A push of exactly `nbytes` on the wire: a decode step [2, 1, 64] padded in `data`."""
    request = peer_pb2.PushRequest(step=_step([2, 1, HIDDEN]), push_token=b"t" * 16)
    for _ in range(4):  # the lengths of the nested messages grow with the padding: converges in a few
        padding = len(request.step.hidden.data) + nbytes - request.ByteSize()
        request.step.hidden.data = b"\0" * padding
    if request.ByteSize() != nbytes:
        raise ValueError(f"cannot build a push of {nbytes} bytes")
    return request


# pushes of 1 KiB to sessions of clients x and y under a budget of 3 KiB per client and 5 KiB in all:
# each (client, the refusal or None)
BUDGETS = {
    "up to a client's budget": ([("x", None)] * 3, (3 * KIB, 0)),
    "past a client's budget": (
        [("x", None)] * 3 + [("x", "client quota: 3072 bytes of pushed steps queued here")],
        (3 * KIB, 0),
    ),
    "another client has its own budget": ([("x", None)] * 3 + [("y", None)] * 2, (3 * KIB, 2 * KIB)),
    "past the peer's budget": (
        [("x", None)] * 3 + [("y", None)] * 2 + [("y", "this peer has 5120 bytes of pushed steps queued")],
        (3 * KIB, 2 * KIB),
    ),
    "past a session's count (3), checked first": (
        [("y", None)] * 3 + [("y", "too many pushed steps queued")],
        (0, 3 * KIB),
    ),
}


@pytest.mark.parametrize(("pushes", "held"), BUDGETS.values(), ids=BUDGETS.keys())
def test_pushes_waiting_are_bounded_in_bytes(
    pushes: list[tuple[str, str | None]], held: tuple[int, int]
) -> None:
    budget = PushBudget(max_bytes=5 * KIB, max_client_bytes=3 * KIB, max_pending=3)
    # client x pushes to two sessions: the budget counts the client, the count each session
    x_sessions = [(_session("x"), SessionRuntime()), (_session("x", batch=2), SessionRuntime())]
    y_session = (_session("y"), SessionRuntime())
    for index, (client, refusal) in enumerate(pushes):
        session, runtime = y_session if client == "y" else x_sessions[index % 2]
        before = (budget.pending_bytes, runtime.pending_pushes)
        if refusal is None:
            assert budget.admit(session, runtime, _push(KIB), hidden_size=HIDDEN) == KIB
            continue
        with pytest.raises(QuotaExceeded, match=re.escape(refusal)) as caught:
            budget.admit(session, runtime, _push(KIB), hidden_size=HIDDEN)
        assert isinstance(caught.value, NoRoom)  # RESOURCE_EXHAUSTED
        assert (budget.pending_bytes, runtime.pending_pushes) == before  # a refusal changes nothing
    assert (budget.client_bytes("x"), budget.client_bytes("y")) == held
    assert budget.pending_bytes == sum(held)


def test_a_wrong_push_takes_nothing_of_the_budget() -> None:
    budget, session = PushBudget(max_bytes=10 * KIB, max_client_bytes=10 * KIB, max_pending=4), _session()
    runtime = SessionRuntime()
    wrong = _push(KIB)
    wrong.step.hidden.shape[0] = 3
    with pytest.raises(InvalidInputError, match="hidden batch 3"):
        budget.admit(session, runtime, wrong, hidden_size=HIDDEN)
    assert (budget.pending_bytes, runtime.pending_pushes) == (0, 0)


def test_one_push_larger_than_a_budget_passes_when_nothing_else_waits() -> None:
    # a prefill push may be as large as a message; a budget then bounds what waits at one such push
    budget, session = PushBudget(max_bytes=2 * KIB, max_client_bytes=KIB, max_pending=4), _session()
    session.max_length, runtime = 8192, SessionRuntime()
    big = _push(4 * KIB)
    budget.admit(session, runtime, big, hidden_size=HIDDEN)
    with pytest.raises(QuotaExceeded, match="client quota"):
        budget.admit(session, runtime, _push(600), hidden_size=HIDDEN)
    assert budget.pending_bytes == 4 * KIB


def test_bytes_come_back_when_a_pushed_step_is_done_or_cancelled() -> None:
    async def scenario() -> tuple[int, int, int]:
        budget, session = PushBudget(max_bytes=10 * KIB, max_client_bytes=10 * KIB, max_pending=4), _session()
        runtime = SessionRuntime()
        release = asyncio.Event()
        tasks = []
        for _ in range(3):
            nbytes = budget.admit(session, runtime, _push(KIB), hidden_size=HIDDEN)
            task = asyncio.create_task(release.wait())
            budget.queued(session, runtime, task, nbytes)
            tasks.append(task)
        held = budget.pending_bytes
        tasks[0].cancel()  # a session closed under it
        release.set()  # the others ran
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(0)
        return held, budget.pending_bytes, runtime.pending_pushes + len(runtime.tasks)

    assert asyncio.run(scenario()) == (3 * KIB, 0, 0)
