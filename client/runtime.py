"""The client's background asyncio loop: the DHT node, discovery refreshes and gRPC streams live there, so
the library's blocking API (`generate()`, a training step) can call into it from any thread."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

logger = logging.getLogger(__name__)
Result = TypeVar("Result")

CLOSE_TIMEOUT = 10.0  # seconds for the loop's remaining tasks to end once cancelled, and for the thread


class Runtime:
    """An asyncio loop on a daemon thread; `run` submits a coroutine from any other thread and waits."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="corolla-client", daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, Result], *, timeout: float | None = None) -> Result:
        """Run `coroutine` on the loop and wait for it; the timeout cancels it on the loop too."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("Runtime.run called from the runtime's own loop; await the coroutine instead")
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise

    def close(self) -> None:
        if not self.loop.is_running():
            return

        async def cancel_the_rest() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            asyncio.run_coroutine_threadsafe(cancel_the_rest(), self.loop).result(CLOSE_TIMEOUT)
        except Exception as e:  # the loop is stopped below all the same
            logger.warning("client loop tasks did not finish reason=%r", e)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(CLOSE_TIMEOUT)
        if not self._thread.is_alive():
            self.loop.close()
