"""The compute worker: runs span forwards off the event loop in `torch.inference_mode()`, highest priority
first, and batches the inference steps of many sessions into one forward.

    queue (a heap): STEP jobs ─┐    each iteration: the first job, and with a step every other queued step
                    STATELESS ─┼─▶  of the same span and blocks up to `max_batch_tokens`, run as ONE forward
                   BACKGROUND ─┘    (`HostedSpan.forward_batch`) ─▶ each output back to its own caller
Inference steps of open sessions go before stateless Forward/Backward (training, which waits less badly),
and those before background work; within a priority, jobs run in arrival order. There is no waiting
window: a lone step starts at once, and the steps that arrive while the thread computes form the next
batch (continuous batching). A decode step is bound by reading the weights, so a batch of many sessions'
steps costs little more than one. Long prefills reach the queue in chunks (`peer.service`), so they hold
the others' decode back by one chunk at most.

A job carries the deadline its client gives it: one whose deadline passed while it waited is skipped
(`Expired`), and one that would wait past it, by the measured cost of the jobs ahead, is refused at once
(`Overloaded`), so a peer sheds load before its clients time out instead of computing answers nobody
waits for. One thread: torch uses every core for one forward at a time, and the event loop stays free for
pings and replies.
"""

from __future__ import annotations

import asyncio
import enum
import heapq
import itertools
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from peer.blocks import BatchItem
from protos.errors import CorollaError

if TYPE_CHECKING:
    from peer.blocks import HostedSpan

logger = logging.getLogger(__name__)
Result = TypeVar("Result")
DRAIN_POLL_PERIOD = 0.05  # seconds between checks for steps still in flight
RATE_SMOOTHING = 0.3  # weight of the newest job in the running mean of seconds per unit of cost
DEFAULT_BATCH_TOKENS = 1024  # tokens (rows x positions) of all the steps in one batched forward
DECODING_WINDOW = 2.0  # seconds after a short step during which other sessions count as decoding


class Priority(enum.IntEnum):
    """Which job the compute thread takes first: the lowest value."""

    STEP = 0  # an inference step of an open session: a user waits for each token
    STATELESS = 1  # Forward / Backward (fine-tuning, one-shot forwards)
    BACKGROUND = 2  # measurements


class Overloaded(CorollaError):
    """The job would wait longer than its deadline allows: another peer may serve it in time."""


class Expired(CorollaError):
    """The job's deadline passed while it waited: its client has given up on it."""


@dataclass(order=True)
class _Job:
    priority: int
    order: int  # arrival order within a priority
    fn: Callable[[], Any] = field(compare=False)
    future: asyncio.Future[Any] = field(compare=False)
    kind: str = field(compare=False)
    cost: float = field(compare=False)  # units of work (e.g. tokens x blocks) for the wait estimate
    estimate: float = field(compare=False)  # expected seconds, from the kind's measured rate
    deadline: float | None = field(compare=False)  # time.monotonic() after which the result is useless
    work: StepWork | None = field(compare=False, default=None)  # a step that may join a batch


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
        same_blocks = self.span is other.span and (self.start, self.end) == (other.start, other.end)
        unpadded = self.item.mask is None and other.item.mask is None  # a padded step runs alone
        return same_blocks and unpadded and (self.grad_output is None) == (other.grad_output is None)


@dataclass
class BatchStats:
    """What the batcher did since the peer started."""

    steps: int = 0  # inference steps computed
    batches: int = 0  # forwards that computed them
    largest: int = 0  # most steps in one forward

    @property
    def mean_batch(self) -> float:
        return self.steps / self.batches if self.batches else 0.0


class Scheduler:
    """One compute thread shared by every request of the peer; `run` awaits a function on it."""

    def __init__(
        self,
        *,
        max_batch_tokens: int = DEFAULT_BATCH_TOKENS,
        max_stateless_tokens: int | None = None,
        on_batch: Callable[[str, int], None] | None = None,
    ) -> None:
        self.max_batch_tokens = max_batch_tokens  # inference steps in one forward
        self.on_batch = on_batch  # told (kind, jobs) of each batched forward: the peer's metrics
        # Forward/Backward pieces of different requests in one forward (training batches among itself)
        self.max_stateless_tokens = max_batch_tokens if max_stateless_tokens is None else max_stateless_tokens
        self.stats = BatchStats()
        self._decode_seen = -math.inf  # when a batch last held a short step (some session decodes)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="corolla-compute")
        self._queue: list[_Job] = []
        self._order = itertools.count()
        self._running: _Job | None = None
        self._running_since = 0.0
        self._worker: asyncio.Task[None] | None = None
        self._rates: dict[str, float] = {}  # kind -> measured seconds per unit of cost
        self.skipped = 0  # jobs dropped because their deadline passed while they waited
        self.shed = 0  # jobs refused because they would have waited past their deadline

    @property
    def in_flight(self) -> int:
        """Jobs queued or computing."""
        return len(self._queue) + (self._running is not None)

    def expected_wait(self, priority: Priority, now: float | None = None) -> float:
        """Seconds a job of `priority` queued now would wait before it starts, by the measured rates."""
        now = time.monotonic() if now is None else now
        wait = 0.0
        if self._running is not None:
            wait += max(self._running.estimate - (now - self._running_since), 0.0)
        return wait + sum(job.estimate for job in self._queue if job.priority <= priority)

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
        `chunk_tokens` ran within the last `DECODING_WINDOW` seconds), a long step (a prompt) goes in chunks
        of about `chunk_tokens` tokens, in order, so their decode steps run in between and wait for one
        chunk at most; a session alone goes in chunks of `lone_chunk_tokens` (default: `chunk_tokens`), which
        bound memory without slowing it. The cost of each chunk is its tokens x blocks."""
        hidden, ids, mask = work.item.hidden, work.item.positions, work.item.mask
        rows, length = hidden.shape[0], hidden.shape[1]
        cached = 0 if mask is None else mask.shape[1] - length  # the mask covers the cache and the step
        outputs, begin = [], 0
        while begin < length:
            decoding = time.monotonic() - self._decode_seen < DECODING_WINDOW
            tokens = chunk_tokens if decoding or lone_chunk_tokens is None else lone_chunk_tokens
            piece = slice(begin, begin + max(tokens // rows, 1))
            item = BatchItem(
                hidden[:, piece],
                work.item.cache,
                None if ids is None else ids[:, piece],
                None if mask is None else mask[:, : cached + piece.stop],
            )
            part = StepWork(work.span, work.start, work.end, item, work.prepare if begin == 0 else None)
            part.decode = work.tokens <= chunk_tokens
            outputs.append(
                await self.step(part, cost=part.tokens * (work.end - work.start), deadline=deadline)
            )
            work.computed += part.computed
            begin = piece.stop
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)

    async def _submit(
        self,
        fn: Callable[[], Any],
        priority: Priority,
        kind: str,
        cost: float,
        deadline: float | None,
        work: StepWork | None,
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
        job = _Job(
            int(priority), next(self._order), fn, loop.create_future(), kind, cost, estimate, deadline, work
        )
        heapq.heappush(self._queue, job)
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._work(), name="corolla-compute-queue")
        return await job.future

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queue:
            job = heapq.heappop(self._queue)
            if not self._runnable(job):
                continue
            batch = [job, *self._companions(job)]
            self._running, self._running_since = job, time.monotonic()
            try:
                if job.work is None:
                    results: list[Any] = [await loop.run_in_executor(self._pool, _inference, job.fn)]
                else:
                    works = [member.work for member in batch if member.work is not None]
                    results = await loop.run_in_executor(self._pool, _forward, works)
            except Exception as e:  # the job's failure is its caller's
                results = [e] * len(batch)
            finally:
                self._measured(batch, time.monotonic() - self._running_since)
                self._running = None
            for member, result in zip(batch, results, strict=True):
                if member.future.done():
                    continue
                if isinstance(result, Exception):
                    member.future.set_exception(result)
                else:
                    member.future.set_result(result)

    def _runnable(self, job: _Job) -> bool:
        """False for a job whose caller went away (dropped) or whose deadline passed (failed `Expired`)."""
        if job.future.done():
            return False
        if job.deadline is not None and time.monotonic() > job.deadline:
            self.skipped += 1
            job.future.set_exception(Expired(f"the {job.kind} waited past its deadline: skipped"))
            return False
        return True

    def _companions(self, first: _Job) -> list[_Job]:
        """Queued steps that run in one forward with `first`, in arrival order, within the token budget."""
        work = first.work
        if work is None or not work.span.batches:
            return []
        budget = self.max_batch_tokens if first.priority == Priority.STEP else self.max_stateless_tokens
        taken: list[_Job] = []
        tokens = work.tokens
        for job in sorted(self._queue):
            other = job.work
            if other is None or job.priority != first.priority or not other.joins(work):
                continue
            if tokens + other.tokens > budget:
                continue
            if self._runnable(job):
                taken.append(job)
                tokens += other.tokens
        if taken or any(job.future.done() for job in self._queue):
            kept = {id(job) for job in taken}
            self._queue = [job for job in self._queue if id(job) not in kept and not job.future.done()]
            heapq.heapify(self._queue)
        return taken

    def _measured(self, batch: list[_Job], seconds: float) -> None:
        if any(job.work is not None and job.work.decode for job in batch):
            self._decode_seen = time.monotonic()
        if batch[0].work is not None and batch[0].priority == Priority.STEP:
            self.stats.steps += len(batch)
            self.stats.batches += 1
            self.stats.largest = max(self.stats.largest, len(batch))
        if batch[0].work is not None and self.on_batch is not None:
            self.on_batch(batch[0].kind, len(batch))
        cost = sum(job.cost for job in batch)
        if cost <= 0:
            return
        rate, kind = seconds / cost, batch[0].kind  # a batch's steps share its time
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
        self._pool.shutdown(wait=True, cancel_futures=True)


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
