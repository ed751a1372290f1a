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


class Executor:
    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="corolla-compute")
        self._in_flight = 0
        self.busy_seconds = 0.0

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def run(self, fn: Callable[[], Result]) -> Result:
        """Run `fn` on the compute thread; exceptions propagate to the caller."""
        loop = asyncio.get_running_loop()
        self._in_flight += 1
        try:
            return await loop.run_in_executor(self._pool, self._timed, fn)
        finally:
            self._in_flight -= 1

    def _timed(self, fn: Callable[[], Result]) -> Result:
        started = time.perf_counter()
        try:
            with torch.inference_mode():
                return fn()
        finally:
            self.busy_seconds += time.perf_counter() - started

    async def drain(self, timeout: float) -> bool:
        """Wait until no step is in flight, at most `timeout` seconds; True when drained."""
        deadline = time.monotonic() + timeout
        while self._in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return not self._in_flight

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
