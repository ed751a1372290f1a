"""What the servicer keeps for each open session besides its state: the lock that runs its steps one at a
time and in order, the pushed steps queued on it, and the stream its replies go to.

The session table (`peer.sessions`) holds state only; this table lives beside it in the servicer, keyed
by session id. An entry is added when a session opens and dropped (its queued pushed steps cancelled)
on every path that closes the session: the client's close or the stream's end, idle expiry,
preemption, retirement.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any


async def _no_reply(_: Any) -> None:
    return None


def _no_finish(_: Any) -> None:
    return None


@dataclass(kw_only=True)
class SessionRuntime:
    """The machinery of one open session: never sent, never counted by the session table."""

    # delivers a reply on the session's own stream; waits while the stream's bounded queue is full
    reply: Callable[[Any], Awaitable[None]] = _no_reply
    finish: Callable[[Any], None] = _no_finish  # ends the session's stream with a status, never waits
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one step at a time, in order
    tasks: set[asyncio.Task[None]] = field(default_factory=set)  # pushed steps queued on this session
    pending_pushes: int = 0  # pushes accepted and not yet run

    def stepping(self) -> bool:
        """A step is under way (it holds the lock)."""
        return self.lock.locked()

    def busy(self) -> bool:
        """A step is under way or pushed steps wait to run."""
        return self.lock.locked() or self.pending_pushes > 0


class SessionRuntimes:
    """Runtimes by session id. Not thread-safe: used from the peer's event loop only."""

    def __init__(self) -> None:
        self._runtimes: dict[str, SessionRuntime] = {}

    def __len__(self) -> int:
        return len(self._runtimes)

    def add(self, session_id: str, runtime: SessionRuntime) -> None:
        self._runtimes[session_id] = runtime

    def get(self, session_id: str) -> SessionRuntime | None:
        return self._runtimes.get(session_id)

    def drop(self, session_id: str) -> SessionRuntime | None:
        """Forget a closed session's runtime and cancel its pushed steps still queued (they would only
        find the session gone); returns it, or None when it was already dropped."""
        runtime = self._runtimes.pop(session_id, None)
        if runtime is not None:
            for task in runtime.tasks:
                task.cancel()
        return runtime
