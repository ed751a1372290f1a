"""The compute worker: runs span forwards off the event loop, one at a time, in `torch.inference_mode()`.

Steps queue in arrival order on a single thread, so torch uses every core for one forward at a time and
the event loop stays free to answer pings, stream replies and announce.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

logger = logging.getLogger(__name__)
Result = TypeVar("Result")
DRAIN_POLL_PERIOD = 0.05  # seconds between checks for steps still in flight


class Executor:
    """One compute thread shared by every request of the peer; `run` awaits a function on it."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="corolla-compute")
        self._in_flight = 0

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def run(self, fn: Callable[[], Result]) -> Result:
        """Run `fn` on the compute thread; exceptions propagate to the caller."""
        loop = asyncio.get_running_loop()
        self._in_flight += 1
        try:
            return await loop.run_in_executor(self._pool, _inference, fn)
        finally:
            self._in_flight -= 1

    async def drain(self, timeout: float) -> bool:
        """Wait until no step is in flight, at most `timeout` seconds; True when drained."""
        deadline = time.monotonic() + timeout
        while self._in_flight and time.monotonic() < deadline:
            await asyncio.sleep(DRAIN_POLL_PERIOD)
        return not self._in_flight

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _inference(fn: Callable[[], Result]) -> Result:
    with torch.inference_mode():
        return fn()
