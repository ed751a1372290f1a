"""The reply side of one Session stream: a bounded queue of replies and the status the stream ends with.

A client that does not read its stream fills the queue and then stalls only its own session: `put` waits
for room. `end` never waits, and once the stream has ended every `put`, waiting or new, returns at once
(the reply is dropped: nobody will read it). Knows nothing of gRPC beyond the reply messages it holds.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Generic, TypeVar, cast

Item = TypeVar("Item")
End = TypeVar("End")


class ReplyQueue(Generic[Item, End]):
    """Replies of one stream in order, at most `maxsize` waiting to be sent, then one end marker."""

    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError(f"maxsize must be >= 1, got {maxsize}")
        self.maxsize = maxsize
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
        """Queue `item`, waiting while the queue is full; dropped once the stream has ended."""
        while len(self._items) >= self.maxsize and not self._ended:
            self._room.clear()
            await self._room.wait()
        if self._ended:
            return
        self._items.append(item)
        self._ready.set()

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
