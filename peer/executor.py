"""The compute worker: runs span forwards off the event loop, one at a time, in `torch.inference_mode()`,
highest priority first.

    queue (a heap): STEP jobs ─┐
                    STATELESS ─┼─▶ one compute thread ─▶ results back on the event loop
                   BACKGROUND ─┘
Inference steps of open sessions go before stateless Forward/Backward (training, which waits less badly),
and those before background work; within a priority, jobs run in arrival order. A job carries the
deadline its client gives it: one whose deadline passed while it waited is skipped (`Expired`), and one
that would wait past it, by the measured cost of the jobs ahead, is refused at once (`Overloaded`), so a
peer sheds load before its clients time out instead of computing answers nobody waits for. One thread:
torch uses every core for one forward at a time, and the event loop stays free for pings and replies.
"""

from __future__ import annotations

import asyncio
import enum
import heapq
import itertools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from protos.errors import CorollaError

logger = logging.getLogger(__name__)
Result = TypeVar("Result")
DRAIN_POLL_PERIOD = 0.05  # seconds between checks for steps still in flight
RATE_SMOOTHING = 0.3  # weight of the newest job in the running mean of seconds per unit of cost


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


class Executor:
    """One compute thread shared by every request of the peer; `run` awaits a function on it."""

    def __init__(self) -> None:
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
        job = _Job(int(priority), next(self._order), fn, loop.create_future(), kind, cost, estimate, deadline)
        heapq.heappush(self._queue, job)
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._work(), name="corolla-compute-queue")
        result: Result = await job.future
        return result

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queue:
            job = heapq.heappop(self._queue)
            if job.future.done():  # its caller went away
                continue
            if job.deadline is not None and time.monotonic() > job.deadline:
                self.skipped += 1
                job.future.set_exception(Expired(f"the {job.kind} waited past its deadline: skipped"))
                continue
            self._running, self._running_since = job, time.monotonic()
            try:
                result = await loop.run_in_executor(self._pool, _inference, job.fn)
            except Exception as e:  # the job's failure is its caller's
                if not job.future.done():
                    job.future.set_exception(e)
            else:
                if not job.future.done():
                    job.future.set_result(result)
            finally:
                self._measured(job, time.monotonic() - self._running_since)
                self._running = None

    def _measured(self, job: _Job, seconds: float) -> None:
        if job.cost <= 0:
            return
        rate = seconds / job.cost
        old = self._rates.get(job.kind)
        self._rates[job.kind] = rate if old is None else old + RATE_SMOOTHING * (rate - old)

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
