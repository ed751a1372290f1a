"""The reply side of one Session stream: a bounded queue of replies and the status the stream ends with.

A client that does not read its stream fills the queue and then stalls only its own session: `put` waits
for room. `end` never waits, and once the stream has ended every `put`, waiting or new, returns at once
(the reply is dropped: nobody will read it). Knows nothing of gRPC beyond the reply messages it holds.

A put that finds no room for `stall_timeout` seconds means the client stopped reading: the stream ends
with the `stalled` marker and `on_stall` runs. The stream's owner must then free what the stream holds
without its help: the writer of the replies is stuck handing one to a transport that takes nothing (gRPC
waits at the generator's `yield` for flow-control room that never comes), so neither the end marker nor
a status would ever get through; meanwhile the waiting put held its session's lock, and every pushed step
queued behind it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar, cast

Item = TypeVar("Item")
End = TypeVar("End")


class ReplyQueue(Generic[Item, End]):
    """Replies of one stream in order, at most `maxsize` waiting to be sent, then one end marker."""

    def __init__(
        self,
        maxsize: int,
        *,
        stall_timeout: float | None = None,
        stalled: End | None = None,
        on_stall: Callable[[], None] | None = None,
    ) -> None:
        if maxsize < 1:
            raise ValueError(f"maxsize must be >= 1, got {maxsize}")
        if stall_timeout is not None and stalled is None:
            raise ValueError("a stall_timeout needs the `stalled` marker the stream ends with")
        self.maxsize = maxsize
        self.stall_timeout = stall_timeout  # None: a put waits for room as long as it takes
        self._stalled = stalled
        self._on_stall = on_stall
        self._items: deque[Item] = deque()
        self._end: End | None = None
        self._ended = False
        self._room = asyncio.Event()  # set whenever a put may find room (or the stream ended)
        self._ready = asyncio.Event()  # set whenever a get may find a reply or the end

    @property
    def ended(self) -> bool:
        return self._ended

    def __len__(self) -> int:
        return len(self._items)

    async def put(self, item: Item) -> None:
        """Queue `item`, waiting while the queue is full; dropped once the stream has ended. Waiting past
        `stall_timeout` ends the stream as stalled (see the module doc)."""
        deadline = (
            None if self.stall_timeout is None else asyncio.get_running_loop().time() + self.stall_timeout
        )
        while len(self._items) >= self.maxsize and not self._ended:
            self._room.clear()
            try:
                async with asyncio.timeout_at(deadline):
                    await self._room.wait()
            except TimeoutError:
                self._stall()
        if self._ended:
            return
        self._items.append(item)
        self._ready.set()

    def _stall(self) -> None:
        if self._ended:
            return
        self.end(cast("End", self._stalled))
        if self._on_stall is not None:
            self._on_stall()

    def end(self, marker: End) -> None:
        """End the stream after the replies already queued; the first end wins."""
        if self._ended:
            return
        self._ended, self._end = True, marker
        self._room.set()  # waiting puts return and drop their reply
        self._ready.set()

    async def get(self) -> Item | End:
        """The next reply, or the end marker once every queued reply was taken."""
        while not self._items and not self._ended:
            self._ready.clear()
            await self._ready.wait()
        if self._items:
            item = self._items.popleft()
            self._room.set()
            return item
        return cast("End", self._end)  # `_ended` is only set together with `_end`
