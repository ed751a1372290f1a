"""Which requests of the OpenAI gateway generate, wait or get 429, so that one API key (a script in a loop)
cannot lock out the others: each key may hold at most its share of the slots and waiting places, and a freed
slot goes to the waiting key that holds the fewest, ties round-robin. Pure bookkeeping (no I/O, no asyncio):
the gateway turns grants into started generations.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Literal

Refusal = Literal["full", "key_full"]  # every slot and waiting place taken / this key's share taken


@dataclass(eq=False)
class Ticket:
    """One admitted request: waiting until `granted`, then holding a slot until it leaves."""

    key: str
    granted: bool = False
    left: bool = field(default=False, repr=False)


class Admission:
    """`num_slots` requests generate at once and `num_waiting` more wait; a key has at most `max_per_key`
    of them (generating or waiting)."""

    def __init__(self, *, num_slots: int, num_waiting: int, max_per_key: int) -> None:
        self.num_slots = num_slots
        self.num_waiting = num_waiting
        self.max_per_key = max_per_key
        self.running: Counter[str] = Counter()  # key -> slots held
        self.queues: dict[str, deque[Ticket]] = {}  # key -> its waiting tickets, oldest first
        self.last_granted: dict[str, int] = {}  # key -> when it was last granted a slot (a grant count)
        self.num_granted = 0

    @property
    def num_running(self) -> int:
        return self.running.total()

    @property
    def num_queued(self) -> int:
        return sum(len(queue) for queue in self.queues.values())

    def admitted(self, key: str) -> int:
        return self.running[key] + len(self.queues.get(key, ()))

    def admit(self, key: str) -> Ticket | Refusal:
        """A waiting ticket for `key` (call `grant` next), or why there is no room."""
        if self.num_running + self.num_queued >= self.num_slots + self.num_waiting:
            return "full"
        if self.admitted(key) >= self.max_per_key:
            return "key_full"
        ticket = Ticket(key)
        self.queues.setdefault(key, deque()).append(ticket)
        return ticket

    def grant(self) -> list[Ticket]:
        """The waiting tickets that take the free slots now: each time the waiting key holding the fewest
        slots, ties to the key granted least recently."""
        granted = []
        while self.queues and self.num_running < self.num_slots:
            key = min(self.queues, key=lambda k: (self.running[k], self.last_granted.get(k, -1)))
            ticket = self.queues[key].popleft()
            if not self.queues[key]:
                del self.queues[key]
            ticket.granted = True
            self.running[key] += 1
            self.num_granted += 1
            self.last_granted[key] = self.num_granted
            granted.append(ticket)
        return granted

    def leave(self, ticket: Ticket) -> None:
        """The request finished, failed or gave up waiting: free its slot or waiting place (once)."""
        if ticket.left:
            return
        ticket.left = True
        if ticket.granted:
            self.running[ticket.key] -= 1
            if self.running[ticket.key] <= 0:
                del self.running[ticket.key]
            return
        queue = self.queues.get(ticket.key)
        if queue is not None and ticket in queue:
            queue.remove(ticket)
            if not queue:
                del self.queues[ticket.key]
