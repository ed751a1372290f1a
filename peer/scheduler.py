"""The compute executor: runs the plans of `peer.planner` on one compute thread, in `torch.inference_mode()`,
so that the inference steps of many sessions run as one forward. It decides nothing itself.

    submit ─▶ pending (a plain list) ─▶ plan(snapshot) ─▶ one forward on the compute thread ─▶ results
                 ▲                        │ expired: fail Expired; dropped: forgotten               │
                 └── a chunked job goes back with its remaining positions and partial outputs ◀─────┘
Each iteration of the event-loop side plans on a snapshot of the pending jobs, takes the planned ones out of
the list, awaits their forward and delivers the results; while the thread computes, the list only grows
by new arrivals. The planner decides who runs (priority, arrival order, batching within the token budget,
prompt chunks, expiry). A caller's future resolves once every chunk of its job ran: `prefill` is one
submission however long the prompt, and the decode steps of other sessions run between its chunks.

A job carries the deadline its client gives it: one whose deadline passes while it waits fails with
`Expired`, and one that would wait past it, by the measured cost of the jobs ahead, is refused at once
(`Overloaded`), so a peer sheds load before its clients time out instead of computing answers nobody
waits for. One thread: torch uses every core for one forward at a time, and the event loop stays free for
pings and replies, except for a lone decode step whose forwards were measured within `inline_seconds`
(5 ms by default): with nothing queued behind it, it runs on the event loop thread itself, skipping the
hand-over to the compute thread and back (two thread wake-ups; measured by bench/executor_hop.py) at the
price of blocking the loop that long.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from peer.blocks import BatchItem
from peer.planner import BatchKey, BatchPlan, Budget, Kind, Priority, Queued, plan
from protos.errors import CorollaError

if TYPE_CHECKING:
    from peer.blocks import HostedSpan

__all__ = ["BatchStats", "Expired", "Overloaded", "Priority", "Scheduler", "StepWork"]

logger = logging.getLogger(__name__)
Result = TypeVar("Result")
DRAIN_POLL_PERIOD = 0.05  # seconds between checks for steps still in flight
RATE_SMOOTHING = 0.3  # weight of the newest job in the running mean of seconds per unit of cost
DEFAULT_BATCH_TOKENS = 1024  # tokens (rows x positions) of all the steps in one batched forward
DECODING_WINDOW = 2.0  # seconds after a short step during which other sessions count as decoding
DEFAULT_INLINE_SECONDS = (
    0.005  # a lone decode step measured within this runs on the loop (bench/executor_hop.py)
)
MAX_INLINE_TOKENS = 4  # tokens (rows x positions) of the largest step that may run on the loop


class Overloaded(CorollaError):
    """The job would wait longer than its deadline allows: another peer may serve it in time."""


class Expired(CorollaError):
    """The job's deadline passed while it waited: its client has given up on it."""


@dataclass(eq=False)
class StepWork:
    """Work the batcher may join with others: `item` through blocks [start, end) of `span`, after `prepare`
    (a session's rollback and beam reorder, run on the compute thread just before the forward), or with
    `grad_output` the input gradient of a stateless forward of `item.hidden` (a Backward)."""

    span: HostedSpan
    start: int
    end: int
    item: BatchItem
    prepare: Callable[[], None] | None = None
    grad_output: torch.Tensor | None = None
    decode: bool = False  # a short step of a session (not a piece of a prompt): prompts then go in chunks
    computed: float = 0.0  # seconds of the forwards that computed it (shared with its batch companions)

    @property
    def tokens(self) -> int:
        return int(self.item.hidden.shape[0] * self.item.hidden.shape[1])

    def joins(self, other: StepWork) -> bool:
        """Whether the planner may run both in one forward (equal batch keys, both unpadded)."""
        return _key(self) == _key(other) and self.item.mask is None and other.item.mask is None

    def chunk(self, begin: int, end: int) -> StepWork:
        """Positions [begin, end) of this step: the mask keeps covering the cache and the positions up to
        `end`; `prepare` runs with the first chunk only."""
        hidden, ids, mask = self.item.hidden, self.item.positions, self.item.mask
        cached = 0 if mask is None else mask.shape[1] - hidden.shape[1]  # the mask covers cache and step
        item = BatchItem(
            hidden[:, begin:end],
            self.item.cache,
            None if ids is None else ids[:, begin:end],
            None if mask is None else mask[:, : cached + end],
            self.item.lora,
        )
        prepare = self.prepare if begin == 0 else None
        return StepWork(self.span, self.start, self.end, item, prepare, decode=self.decode)


def _key(work: StepWork) -> BatchKey:
    kind = Kind.FORWARD if work.grad_output is None else Kind.BACKWARD
    lora = work.item.lora
    return BatchKey(
        id(work.span), work.start, work.end, kind, work.span.batches, 0 if lora is None else id(lora)
    )


@dataclass
class BatchStats:
    """What the batcher did since the peer started."""

    steps: int = 0  # inference steps computed (each chunk of a prompt counts)
    batches: int = 0  # forwards that computed them
    largest: int = 0  # most steps in one forward

    @property
    def mean_batch(self) -> float:
        return self.steps / self.batches if self.batches else 0.0


@dataclass(eq=False)
class _Job:
    """A submitted job: a function, or a step (`work`) computed in one or more chunks."""

    job_id: int
    priority: int
    order: int  # arrival order; a job put back after a chunk gets a fresh one
    fn: Callable[[], Any]
    future: asyncio.Future[Any]
    kind: str
    cost: float  # units of work (e.g. tokens x blocks) of the whole job, for the wait estimate
    estimate: float  # expected seconds of the whole job, from the kind's measured rate
    deadline: float | None  # time.monotonic() after which the result is useless
    work: StepWork | None = None
    chunk_tokens: int | None = None  # None: computed in one forward
    lone_chunk_tokens: int | None = None
    done: int = 0  # positions computed
    outputs: list[torch.Tensor] = field(default_factory=list)  # of the chunks computed, in order
    key: BatchKey | None = field(init=False)

    def __post_init__(self) -> None:
        self.key = None if self.work is None else _key(self.work)

    @property
    def length(self) -> int:
        return 1 if self.work is None else int(self.work.item.hidden.shape[1])

    def share(self, positions: int) -> float:
        """The fraction of the whole job that `positions` of it are."""
        return positions / max(self.length, 1)

    def queued(self) -> Queued:
        cancelled = self.future.done()
        if self.work is None:
            return Queued(self.job_id, self.priority, self.order, deadline=self.deadline, cancelled=cancelled)
        return Queued(
            self.job_id,
            self.priority,
            self.order,
            self.key,
            rows=int(self.work.item.hidden.shape[0]),
            remaining=self.length - self.done,
            padded=self.work.item.mask is not None,
            prompt=self.chunk_tokens is not None and not self.work.decode,
            deadline=self.deadline,
            cancelled=cancelled,
            chunk_tokens=self.chunk_tokens,
            lone_chunk_tokens=self.lone_chunk_tokens,
        )

    def piece(self, positions: int) -> StepWork:
        """What the next forward computes of this job: the whole step, or its next chunk."""
        if self.work is None:
            raise RuntimeError("a function job has no positions to compute")
        if self.done == 0 and positions == self.length:
            return self.work
        return self.work.chunk(self.done, self.done + positions)

    def output(self) -> torch.Tensor:
        return self.outputs[0] if len(self.outputs) == 1 else torch.cat(self.outputs, dim=1)


class Scheduler:
    """One compute thread shared by every request of the peer; `run` awaits a function on it, `step` and
    `prefill` a span forward batched with others."""

    def __init__(
        self,
        *,
        max_batch_tokens: int = DEFAULT_BATCH_TOKENS,
        max_stateless_tokens: int | None = None,
        on_batch: Callable[[str, int], None] | None = None,
        inline_seconds: float = DEFAULT_INLINE_SECONDS,
    ) -> None:
        self.max_batch_tokens = max_batch_tokens  # inference steps in one forward
        self.on_batch = on_batch  # told (kind, jobs) of each batched forward: the peer's metrics
        # Forward/Backward pieces of different requests in one forward (training batches among itself)
        self.max_stateless_tokens = max_batch_tokens if max_stateless_tokens is None else max_stateless_tokens
        # while lone steps of at most MAX_INLINE_TOKENS tokens take at most this many seconds (running mean),
        # such a step runs on the event loop thread (no hand-over to the compute thread); 0 turns it off
        self.inline_seconds = inline_seconds
        self.stats = BatchStats()
        self.inlined = 0  # steps run on the event loop thread
        self._decode_seen = -math.inf  # when a batch last held a short step (some session decodes)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="corolla-compute")
        self._closed = False
        self._pending: list[_Job] = []
        self._ids = itertools.count()
        self._order = itertools.count()
        self._running: list[_Job] = []
        self._running_estimate = 0.0  # expected seconds of the forward under way
        self._running_since = 0.0
        self._worker: asyncio.Task[None] | None = None
        self._rates: dict[str, float] = {}  # kind -> measured seconds per unit of cost
        self._small_step_seconds: float | None = None  # running mean of a lone small step's forward, seconds
        self.skipped = 0  # jobs dropped because their deadline passed while they waited
        self.shed = 0  # jobs refused because they would have waited past their deadline

    @property
    def in_flight(self) -> int:
        """Jobs queued or computing."""
        return len(self._pending) + len(self._running)

    def expected_wait(self, priority: Priority, now: float | None = None) -> float:
        """Seconds a job of `priority` queued now would wait before it starts, by the measured rates."""
        now = time.monotonic() if now is None else now
        wait = 0.0
        if self._running:
            wait += max(self._running_estimate - (now - self._running_since), 0.0)
        return wait + sum(
            job.estimate * job.share(job.length - job.done)
            for job in self._pending
            if job.priority <= priority
        )

    async def run(
        self,
        fn: Callable[[], Result],
        *,
        priority: Priority = Priority.STEP,
        kind: str = "step",
        cost: float = 1.0,
        deadline: float | None = None,
    ) -> Result:
        """Run `fn` on the compute thread after the queued jobs of its priority and above; exceptions
        propagate to the caller. Raises `Overloaded` at once when it would start after `deadline`
        (`time.monotonic()`), `Expired` when the deadline passed while it waited."""
        result: Result = await self._submit(fn, priority, kind, cost, deadline, None)
        return result

    async def step(
        self,
        work: StepWork,
        *,
        cost: float,
        deadline: float | None = None,
        priority: Priority = Priority.STEP,
        kind: str = "step",
    ) -> torch.Tensor:
        """Compute `work`, batched with the other work of its priority and kind queued meanwhile; returns
        its output [rows, seq, hidden_size] (with `grad_output`: the input gradient). Raises like `run`, or
        the error of this work alone."""
        output: torch.Tensor = await self._submit(_unbatched, priority, kind, cost, deadline, work)
        return output

    async def prefill(
        self,
        work: StepWork,
        *,
        chunk_tokens: int,
        lone_chunk_tokens: int | None = None,
        deadline: float | None = None,
    ) -> torch.Tensor:
        """`step` for a session's step of any length. While other sessions decode (a step of at most
        `chunk_tokens` ran within the last `DECODING_WINDOW` seconds), a long step (a prompt) computes in
        chunks of about `chunk_tokens` tokens, in order, so their decode steps run in between and wait for
        one chunk at most; a session alone goes in chunks of `lone_chunk_tokens` (default: `chunk_tokens`),
        which bound memory without slowing it. Its cost is its tokens x blocks."""
        if work.grad_output is not None:
            raise ValueError("prefill computes forward steps only")
        work.decode = work.tokens <= chunk_tokens
        output: torch.Tensor = await self._submit(
            _unbatched,
            Priority.STEP,
            "step",
            work.tokens * (work.end - work.start),
            deadline,
            work,
            chunks=(chunk_tokens, lone_chunk_tokens),
        )
        return output

    async def _submit(
        self,
        fn: Callable[[], Any],
        priority: Priority,
        kind: str,
        cost: float,
        deadline: float | None,
        work: StepWork | None,
        *,
        chunks: tuple[int, int | None] = (0, None),
    ) -> Any:
        now = time.monotonic()
        if deadline is not None:
            wait = self.expected_wait(priority, now)
            if now + wait > deadline:
                self.shed += 1
                raise Overloaded(
                    f"peer overloaded: a {kind} would wait about {wait:.1f} s, past its deadline "
                    f"({max(deadline - now, 0.0):.1f} s)"
                )
        loop = asyncio.get_running_loop()
        estimate = cost * self._rates.get(kind, 0.0)
        chunk_tokens, lone_chunk_tokens = chunks
        job = _Job(
            next(self._ids),
            int(priority),
            next(self._order),
            fn,
            loop.create_future(),
            kind,
            cost,
            estimate,
            deadline,
            work,
            chunk_tokens or None,
            lone_chunk_tokens,
        )
        self._pending.append(job)
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._work(), name="corolla-compute-queue")
        return await job.future

    async def _work(self) -> None:
        while self._pending:
            now = time.monotonic()
            decided = plan(
                [job.queued() for job in self._pending],
                budget=Budget(self.max_batch_tokens, self.max_stateless_tokens),
                now=now,
                decoding=now - self._decode_seen < DECODING_WINDOW,
            )
            batch = self._take(decided)
            if batch:
                await self._execute(batch)

    def _take(self, decided: BatchPlan) -> list[tuple[_Job, int]]:
        """Out of the pending list: the planned jobs (returned with their positions), the expired ones
        (failed) and the dropped ones."""
        jobs = {job.job_id: job for job in self._pending}
        for job_id in decided.expired:
            job = jobs[job_id]
            self.skipped += 1
            job.future.set_exception(Expired(f"the {job.kind} waited past its deadline: skipped"))
        leaving = {*decided.expired, *decided.dropped, *(planned.job_id for planned in decided.run)}
        self._pending = [job for job in self._pending if job.job_id not in leaving]
        return [(jobs[planned.job_id], planned.positions) for planned in decided.run]

    async def _execute(self, batch: list[tuple[_Job, int]]) -> None:
        """One forward of `batch` (or its one function), then each result to its job."""
        head = batch[0][0]
        self._running = [job for job, _ in batch]
        self._running_estimate = sum(job.estimate * job.share(positions) for job, positions in batch)
        self._running_since = time.monotonic()
        pieces = [job.piece(positions) if job.work is not None else None for job, positions in batch]
        try:
            if head.work is None:
                loop = asyncio.get_running_loop()
                results: Sequence[Any] = [await loop.run_in_executor(self._pool, _inference, head.fn)]
            elif self._inline(head, batch[0][1], len(batch)):
                self.inlined += 1
                results = _forward(_steps(pieces))
            else:
                loop = asyncio.get_running_loop()
                results = await loop.run_in_executor(self._pool, _forward, _steps(pieces))
        except Exception as e:  # the job's failure is its caller's
            results = [e] * len(batch)
        finally:
            self._measured(batch, time.monotonic() - self._running_since)
            self._running = []
        if len(batch) == 1 and _small(*batch[0]) and pieces[0] is not None and pieces[0].computed > 0:
            self._small_step_measured(pieces[0].computed)
        for (job, positions), piece, result in zip(batch, pieces, results, strict=True):
            if piece is not None and piece is not job.work and job.work is not None:
                job.work.computed += piece.computed
            self._deliver(job, positions, result)

    def _deliver(self, job: _Job, positions: int, result: Any) -> None:
        if job.future.done():  # its caller went away
            return
        if isinstance(result, Exception):
            job.future.set_exception(result)
        elif job.work is None:
            job.future.set_result(result)
        else:
            job.outputs.append(result)
            job.done += positions
            if job.done < job.length:  # behind the jobs that arrived while this chunk computed
                job.order = next(self._order)
                self._pending.append(job)
            else:
                job.future.set_result(job.output())

    def _inline(self, head: _Job, positions: int, size: int) -> bool:
        """Whether this forward runs on the event loop thread: a lone small step of an open session with
        nothing queued behind it, when such steps were measured to compute within `inline_seconds`."""
        if self.inline_seconds <= 0 or self._closed or size != 1 or self._pending:
            return False
        if not _small(head, positions):
            return False
        return self._small_step_seconds is not None and self._small_step_seconds <= self.inline_seconds

    def _small_step_measured(self, seconds: float) -> None:
        """A lone small step's forward took `seconds` (without the hand-over): the inline decision's input."""
        old = self._small_step_seconds
        self._small_step_seconds = seconds if old is None else old + RATE_SMOOTHING * (seconds - old)

    def _measured(self, batch: list[tuple[_Job, int]], seconds: float) -> None:
        jobs = [job for job, _ in batch]
        if any(job.work is not None and job.work.decode for job in jobs):
            self._decode_seen = time.monotonic()
        if jobs[0].work is not None and jobs[0].priority == Priority.STEP:
            self.stats.steps += len(jobs)
            self.stats.batches += 1
            self.stats.largest = max(self.stats.largest, len(jobs))
        if jobs[0].work is not None and self.on_batch is not None:
            self.on_batch(jobs[0].kind, len(jobs))
        cost = sum(job.cost * job.share(positions) for job, positions in batch)
        if cost <= 0:
            return
        rate, kind = seconds / cost, jobs[0].kind  # a batch's steps share its time
        old = self._rates.get(kind)
        self._rates[kind] = rate if old is None else old + RATE_SMOOTHING * (rate - old)

    async def drain(self, timeout: float) -> bool:
        """Wait until no job is queued or computing, at most `timeout` seconds; True when drained."""
        deadline = time.monotonic() + timeout
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(DRAIN_POLL_PERIOD)
        return not self.in_flight

    def shutdown(self) -> None:
        """Stop the compute thread (any thread may call this); jobs still queued fail when they start."""
        self._closed = True
        self._pool.shutdown(wait=True, cancel_futures=True)


def _small(job: _Job, positions: int) -> bool:
    """A session's step of at most MAX_INLINE_TOKENS tokens (rows x positions): a decode step."""
    work = job.work
    if job.priority != Priority.STEP or work is None or work.grad_output is not None:
        return False
    return int(work.item.hidden.shape[0]) * positions <= MAX_INLINE_TOKENS


def _steps(pieces: list[StepWork | None]) -> list[StepWork]:
    return [piece for piece in pieces if piece is not None]


def _inference(fn: Callable[[], Result]) -> Result:
    with torch.inference_mode():
        return fn()


def _unbatched() -> None:
    raise RuntimeError("a step job runs through the batcher")


@torch.inference_mode()
def _forward(works: list[StepWork]) -> list[torch.Tensor | Exception]:
    """Prepare each step's cache, then run all that prepared as one forward, or for Backward work one
    forward and backward (on the compute thread)."""
    results: list[torch.Tensor | Exception] = [RuntimeError("not run")] * len(works)
    ready: list[int] = []
    for index, work in enumerate(works):
        try:
            if work.prepare is not None:
                work.prepare()
        except Exception as e:  # this step's own fault: the others still run
            results[index] = e
        else:
            ready.append(index)
    if ready:
        started = time.perf_counter()
        first = works[ready[0]]
        if first.grad_output is not None:
            pairs = [(works[i].item.hidden, works[i].grad_output, works[i].item.mask) for i in ready]
            outputs = first.span.backward_batch(pairs, start=first.start, end=first.end)  # type: ignore[arg-type]
        else:
            outputs = first.span.forward_batch(
                [works[i].item for i in ready], start=first.start, end=first.end
            )
        elapsed = time.perf_counter() - started
        for index, output in zip(ready, outputs, strict=True):
            results[index] = output
            works[index].computed += elapsed
    return results
