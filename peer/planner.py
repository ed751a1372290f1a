"""The peer's scheduling decisions as pure functions (vLLM v1's `schedule()`): which queued jobs run in the
next forward and how many positions of each, and which idle sessions give up their cache pages. No
threads, no asyncio, no tensors: the executor (`peer.scheduler`) and the session table call these.

`plan(queued, budget=, now=, decoding=)` decides, in this order:
  1. drop every cancelled job (its caller went away) and expire every job whose deadline is before `now`
     (its caller fails with `Expired`), wherever it is in the queue;
  2. the head: the first remaining job by (priority, arrival order): lowest priority value first, arrival
     order within a priority. It always runs, whatever its size;
  3. the head's companions, only when the head is a step (it has a batch key) whose span batches and that
     is unpadded: every other unpadded job of the same priority and batch key (span, blocks, forward or
     backward), in arrival order, whose chunk still fits in the token budget (`max_batch_tokens` for
     session steps, `max_stateless_tokens` for lower priorities, the head's chunk included); one that does
     not fit is passed over and smaller ones after it may still join. The pieces of prompts (steps
     cut into chunks) share a forward only with each other: a decode step never waits for more than the
     one chunk computing when it arrived. A padded step or an opaque function runs alone. There is no
     waiting window: what is queued now runs now (continuous batching);
  4. each planned job's chunk: a job with `chunk_tokens` runs `max(limit // rows, 1)` of its remaining
     positions, where the limit is `chunk_tokens` while sessions decode (`decoding`: a decode step ran
     lately, or a session step that is not a prompt waits in the queue) and `lone_chunk_tokens`
     otherwise (bounding memory without slowing a session alone); a job without one runs all of it.

The executor puts a job with positions left back in the queue behind the jobs that arrived meanwhile (a
fresh arrival order), so the decode steps queued while a chunk computed run in the next forward and the
prompt's next chunk in the one after: one chunk of a long prompt at most between two decode forwards.

    queue (priority, order)            plan (budget 8 tokens, decoding, chunk 4)
    0 step   A decode 1x1   key k  ──▶  run A: 1 position (head)
    0 step   B decode 2x1   key k  ──▶  run B: 1          (joins: same key, both decode, 1 + 2 <= 8)
    0 step   C prompt 1x12  key k       (a prompt's piece: never with decode steps)
    0 step   D padded 1x1   key k       (padded: runs alone, later)
    1 stateless E 2x3       key f       (another priority)
    0 step   F deadline passed     ──▶  expired

`preempt(holders, needed=, free=)` names the sessions whose pages go to a step that needs more than the
pool has free: the least recently used idle ones, just enough of them, or None when even all idle ones
would not make the room. `preempt_slot(...)` names the idle session a newcomer takes the slot of when
every session slot is taken (the even-share rule of `peer.sessions`).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass


class Priority(enum.IntEnum):
    """Which job runs first: the lowest value."""

    STEP = 0  # an inference step of an open session: a user waits for each token
    STATELESS = 1  # Forward / Backward (fine-tuning, one-shot forwards)
    BACKGROUND = 2  # measurements


class Kind(enum.Enum):
    """What a job computes: steps of one kind batch together, never with the other kind."""

    FORWARD = "forward"  # a session step or a stateless forward
    BACKWARD = "backward"  # a stateless forward and its input gradient


@dataclass(frozen=True)
class BatchKey:
    """Jobs with equal keys may run as one forward: the same hosted span (its identity), the same blocks
    [start, end), the same kind; `batches` is the span's ability to run several items as one forward."""

    span: int
    start: int
    end: int
    kind: Kind = Kind.FORWARD
    batches: bool = True
    lora: int = 0  # the identity of the served adapter the job runs with; 0: none


@dataclass(frozen=True)
class Queued:
    """One queued job as the planner sees it."""

    job_id: int
    priority: int  # a `Priority`: lower runs first
    order: int  # arrival order, unique: a job put back after a chunk gets a fresh one
    key: BatchKey | None = None  # None: an opaque function, always alone
    rows: int = 1
    remaining: int = 1  # positions still to compute
    padded: bool = False  # it carries an attention mask: runs alone
    prompt: bool = False  # a session step longer than its `chunk_tokens` (a prompt): cut into chunks
    deadline: float | None = None  # clock value after which its result is useless
    cancelled: bool = False  # its caller went away
    chunk_tokens: int | None = None  # None: never cut into chunks
    lone_chunk_tokens: int | None = None  # the chunk while nobody else decodes; None: `chunk_tokens`

    def chunk(self, *, decoding: bool) -> int:
        """Positions of this job the next forward computes."""
        if self.chunk_tokens is None:
            return self.remaining
        tokens = self.chunk_tokens if decoding or self.lone_chunk_tokens is None else self.lone_chunk_tokens
        return min(self.remaining, max(tokens // max(self.rows, 1), 1))


@dataclass(frozen=True)
class Budget:
    """Tokens (rows x positions) of all the chunks in one forward, the head's included (a head larger than
    that still runs, alone)."""

    max_batch_tokens: int  # session steps (the highest priority)
    max_stateless_tokens: int  # Forward/Backward pieces and lower priorities


@dataclass(frozen=True)
class Planned:
    job_id: int
    positions: int  # the next `positions` of its remaining ones: its chunk


@dataclass(frozen=True)
class BatchPlan:
    """The next forward (`run`, head first; empty when nothing is left to run) and the jobs that leave the
    queue without running."""

    run: tuple[Planned, ...] = ()
    expired: tuple[int, ...] = ()
    dropped: tuple[int, ...] = ()


def plan(queued: Sequence[Queued], *, budget: Budget, now: float, decoding: bool) -> BatchPlan:
    """The next forward for `queued` (see the module doc); `decoding`: a decode step ran lately (a decode
    step waiting in `queued` counts too)."""
    dropped: list[int] = []
    expired: list[int] = []
    waiting: list[Queued] = []
    for job in queued:
        if job.cancelled:
            dropped.append(job.job_id)
        elif job.deadline is not None and now > job.deadline:
            expired.append(job.job_id)
        else:
            waiting.append(job)
    if not waiting:
        return BatchPlan((), tuple(expired), tuple(dropped))
    if len(waiting) > 1:
        waiting.sort(key=lambda job: (job.priority, job.order))
    decoding = decoding or any(_decodes(job) for job in waiting)
    head, rest = waiting[0], waiting[1:]
    run = [Planned(head.job_id, head.chunk(decoding=decoding))]
    if head.key is not None and head.key.batches and not head.padded:
        limit = budget.max_batch_tokens if head.priority == Priority.STEP else budget.max_stateless_tokens
        tokens = head.rows * run[0].positions
        for job in rest:
            if job.priority != head.priority or job.key != head.key or job.padded:
                continue
            if job.prompt != head.prompt:
                continue
            positions = job.chunk(decoding=decoding)
            if tokens + job.rows * positions > limit:
                continue
            run.append(Planned(job.job_id, positions))
            tokens += job.rows * positions
    return BatchPlan(tuple(run), tuple(expired), tuple(dropped))


def _decodes(job: Queued) -> bool:
    """A session's step that is not a prompt: someone decodes."""
    return job.priority == Priority.STEP and job.key is not None and not job.prompt


@dataclass(frozen=True)
class Holder:
    """An open session as preemption sees it."""

    session_id: str
    pages: int  # cache pages it holds
    last_used: float  # clock value of its last step
    busy: bool = False  # a step of it is queued or computing: never preempted
    network_sessions: int = 0  # sessions its client's network holds on the peer (`sessions.network_of`)


def preempt(holders: Sequence[Holder], *, needed: int, free: int) -> tuple[str, ...] | None:
    """The sessions to preempt so that `needed` pages fit beside `free` free ones: the least recently used
    idle holders (ties: in the given order) until the room suffices; () when it already does; None when
    even every idle holder would not make the room (then nobody is preempted)."""
    if needed <= free:
        return ()
    idle = sorted((h for h in holders if not h.busy and h.pages > 0), key=lambda h: h.last_used)
    victims: list[str] = []
    room = free
    for holder in idle:
        if room >= needed:
            break
        victims.append(holder.session_id)
        room += holder.pages
    return tuple(victims) if room >= needed else None


def preempt_slot(
    holders: Sequence[Holder],
    *,
    mine: int,
    networks: int,
    max_sessions: int,
    now: float,
    idle_timeout: float,
) -> str | None:
    """The session a newcomer takes the slot of when every one of `max_sessions` is taken, or None. The
    newcomer's network holds `mine` sessions; `networks` networks hold sessions, the newcomer's included.
    Only a session idle for `idle_timeout` and not busy, of a network over an even share (`max_sessions /
    networks`) holding at least two more sessions than the newcomer's: of the network holding the most,
    its least recently used (ties: in the given order). Holders even out; nobody at or under an even
    share is ever preempted."""
    best: tuple[int, float] | None = None
    victim = None
    for holder in holders:
        held = holder.network_sessions
        if held < mine + 2 or held * networks <= max_sessions:
            continue
        if now - holder.last_used < idle_timeout or holder.busy:
            continue
        rank = (-held, holder.last_used)
        if best is None or rank < best:
            best, victim = rank, holder.session_id
    return victim
