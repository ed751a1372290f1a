"""Who serves which blocks: `PeerRecord`s read from the DHT and validated off the per-token path, and the ban
list of peers that failed. Knows nothing of routes or gRPC; `InMemoryDiscovery` is the fake for tests."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from hivemind.dht.node import DHTNode

from client.errors import SwarmError
from protos import tls
from protos.errors import InvalidInputError
from protos.model_id import served_ids_hint, served_model_ids
from protos.records import MODEL_INDEX_KEY, PeerRecord, PeerState
from protos.swarm import (
    MAX_NUM_BLOCKS,
    Latest,
    SwarmReadError,
    not_announced,
    read_num_blocks,
    read_records,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SwarmView:
    """A snapshot of one model's swarm: `blocks[b]` maps peer_id -> record for every peer whose announced
    span contains block b (each peer has one record, the same object in every block of its span).
    `fetched_at` is the `time.monotonic()` at which the read began."""

    num_blocks: int
    blocks: tuple[dict[str, PeerRecord], ...]
    fetched_at: float

    def __post_init__(self) -> None:
        if len(self.blocks) != self.num_blocks:
            raise InvalidInputError(
                f"a view of {self.num_blocks} blocks has {len(self.blocks)} block entries"
            )

    @classmethod
    def from_records(
        cls, num_blocks: int, records: Mapping[str, PeerRecord], *, fetched_at: float | None = None
    ) -> SwarmView:
        """Place each peer's record under every block of its span; spans must lie within `[0, num_blocks)`."""
        if not 1 <= num_blocks <= MAX_NUM_BLOCKS:
            raise InvalidInputError(f"num_blocks must be in 1..{MAX_NUM_BLOCKS}, got {num_blocks}")
        blocks: list[dict[str, PeerRecord]] = [{} for _ in range(num_blocks)]
        for peer_id in sorted(records):
            record = records[peer_id]
            if record.end > num_blocks:
                raise InvalidInputError(
                    f"peer {peer_id} announces blocks [{record.start}, {record.end}) "
                    f"of a {num_blocks}-block model"
                )
            for block in range(record.start, record.end):
                blocks[block][peer_id] = record
        return cls(num_blocks, tuple(blocks), time.monotonic() if fetched_at is None else fetched_at)

    def peers(self) -> dict[str, PeerRecord]:
        """peer_id -> record, one per peer (its announced span is in the record), sorted by peer_id."""
        found = {peer_id: record for block in self.blocks for peer_id, record in block.items()}
        return dict(sorted(found.items()))

    def coverage(self) -> list[int]:
        """Number of ONLINE peers per block."""
        return [sum(r.state is PeerState.ONLINE for r in block.values()) for block in self.blocks]

    def throughput(self) -> list[float]:
        """Summed decode throughput (steps/s) of the ONLINE peers per block; the minimum is the bottleneck."""
        return [
            sum(r.throughput for r in block.values() if r.state is PeerState.ONLINE) for block in self.blocks
        ]


class Discovery(Protocol):
    """Where a client gets its view of the swarm; `view()` is cheap, `view(refresh=True)` reads now."""

    async def view(self, *, refresh: bool = False) -> SwarmView: ...

    async def close(self) -> None: ...


class DhtDiscovery:
    """Reads every block key of one model with a single `get_many` (latest values) and keeps the result.

    For each peer the record with the latest expiration wins (a peer that moved or went offline left older
    records behind); a record stored under a block outside its own span, or beyond the model, is dropped.
    After `start()` a background task re-reads every `refresh_period`; `close()` stops it (the node stays
    the caller's).
    """

    def __init__(
        self,
        node: DHTNode,
        model_id: str,
        *,
        num_blocks: int | None = None,
        refresh_period: float,
        fetch_timeout: float = 30.0,
    ) -> None:
        if num_blocks is not None and not 1 <= num_blocks <= MAX_NUM_BLOCKS:
            raise InvalidInputError(f"num_blocks must be in 1..{MAX_NUM_BLOCKS}, got {num_blocks}")
        if refresh_period <= 0 or fetch_timeout <= 0:
            raise InvalidInputError("refresh_period and fetch_timeout must be positive")
        self.node = node
        self.model_id = model_id
        self.num_blocks = num_blocks
        self.refresh_period = refresh_period
        self.fetch_timeout = fetch_timeout
        self._view: SwarmView | None = None
        self._latest: Latest = {}
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    async def view(self, *, refresh: bool = False) -> SwarmView:
        """The latest snapshot; reads the DHT only when there is none yet or `refresh` is set.

        Raises `SwarmError` when no record of the model was found.
        """
        if refresh or self._view is None:
            await self._refresh(since=time.monotonic() if refresh else None)
        view = self._view
        if view is None or not any(view.blocks):
            raise SwarmError(await self._not_served())
        return view

    async def _not_served(self) -> str:
        """The "nobody announces this model" message, naming the model ids the swarm's index lists."""
        try:
            entry = await asyncio.wait_for(self.node.get(MODEL_INDEX_KEY, latest=True), self.fetch_timeout)
        except Exception as e:  # the message without the list beats a second failure
            logger.debug("reading the model index failed model=%s reason=%r", self.model_id, e)
            return not_announced(self.model_id)
        return f"{not_announced(self.model_id)}; {served_ids_hint(served_model_ids(entry))}"

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._refresh_forever(), name="corolla-discovery")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_period)
            try:
                await self._refresh(since=time.monotonic())
            except Exception as e:  # keep the last snapshot through a transient DHT failure
                logger.warning("swarm refresh failed model=%s reason=%r", self.model_id, e)

    async def _refresh(self, *, since: float | None) -> None:
        """Read unless a read that began at or after `since` (any read, when None) already finished."""
        async with self._lock:
            current = self._view
            if current is not None and (since is None or current.fetched_at >= since):
                return
            try:
                self._view = await asyncio.wait_for(self._fetch(), self.fetch_timeout)
            except TimeoutError:
                raise SwarmError(
                    f"reading the DHT for model {self.model_id} took over {self.fetch_timeout}s"
                ) from None
            except SwarmError:
                raise
            except Exception as e:  # hivemind's own failures, as the one error callers handle
                raise SwarmError(f"reading the DHT for model {self.model_id} failed: {e!r}") from e

    async def _fetch(self) -> SwarmView:
        fetched_at = time.monotonic()
        try:
            num_blocks = self.num_blocks or await read_num_blocks(self.node, self.model_id)
        except SwarmReadError as e:
            if str(e) == not_announced(self.model_id):
                raise SwarmError(await self._not_served()) from None
            raise SwarmError(str(e)) from None
        self._latest = await read_records(self.node, self.model_id, num_blocks, previous=self._latest)
        view = SwarmView.from_records(
            num_blocks,
            {peer_id: record for peer_id, (_, record) in self._latest.items()},
            fetched_at=fetched_at,
        )
        logger.debug(
            "swarm read model=%s peers=%d coverage=%s", self.model_id, len(self._latest), view.coverage()
        )
        return view


class FilteredPeers:
    """The view of another `Discovery` with only the peers `keep(peer_id, record)` accepts; `skipped` says
    why the others are left out (logged once per change of the skipped count)."""

    def __init__(self, inner: Discovery, keep: Callable[[str, PeerRecord], bool], *, skipped: str) -> None:
        self.inner = inner
        self.keep = keep
        self.skipped = skipped
        self._source: SwarmView | None = None
        self._view: SwarmView | None = None
        self._logged = 0

    async def view(self, *, refresh: bool = False) -> SwarmView:
        source = await self.inner.view(refresh=refresh)
        if source is not self._source or self._view is None:
            records = source.peers()
            kept = {peer_id: record for peer_id, record in records.items() if self.keep(peer_id, record)}
            if len(records) - len(kept) != self._logged:
                self._logged = len(records) - len(kept)
                logger.info("%s count=%d", self.skipped, self._logged)
            view = SwarmView.from_records(source.num_blocks, kept, fetched_at=source.fetched_at)
            self._source, self._view = source, view
        return self._view

    async def close(self) -> None:
        await self.inner.close()


def tls_peers_only(inner: Discovery) -> FilteredPeers:
    """Without the peers a TLS client cannot reach: those whose record carries no certificate, or one their
    peer id's key did not vouch for (`protos.tls.binds`)."""

    def reachable(peer_id: str, record: PeerRecord) -> bool:
        return record.certificate is not None and tls.binds(record.certificate.encode(), peer_id)

    return FilteredPeers(inner, reachable, skipped="peers without a valid TLS certificate skipped")


def direct_peers_only(inner: Discovery) -> FilteredPeers:
    """Without the peers reached only through relays: for a client with no libp2p node to use them."""
    return FilteredPeers(
        inner, lambda _, record: not record.relay_maddrs, skipped="relayed peers skipped (no libp2p node)"
    )


def weights_filter(inner: Discovery, quant: str) -> Discovery:
    """Only the peers whose weights `quant` accepts: "none" (unquantized only), "any", or one mode."""
    if quant == "any":
        return inner
    return FilteredPeers(
        inner,
        lambda _, record: record.quantization == quant,
        skipped=f"peers with other weights than quant={quant!r} skipped (quant='any' accepts them)",
    )


class InMemoryDiscovery:
    """A `Discovery` whose view the test sets; counts forced refreshes."""

    def __init__(self, view: SwarmView | None = None) -> None:
        self.current = view
        self.num_refreshes = 0
        self.closed = False

    def set(self, view: SwarmView) -> None:
        self.current = view

    async def view(self, *, refresh: bool = False) -> SwarmView:
        if refresh:
            self.num_refreshes += 1
        if self.current is None:
            raise SwarmError("no view set")
        return self.current

    async def close(self) -> None:
        self.closed = True


class BanList:
    """Peers to avoid for a while. Each further ban of a peer lasts `backoff` times longer, up to
    `max_ban_timeout`; each success of a peer whose ban has expired (`served`) divides its next ban by
    `backoff` again, so bans decay; `unban` lifts the ban and resets the backoff at once. Also counts, per
    peer and across the client's sessions, the spot checks in a row that could not be done (`unverified`)."""

    def __init__(
        self,
        ban_timeout: float,
        backoff: float,
        max_ban_timeout: float,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ban_timeout <= 0 or backoff < 1 or max_ban_timeout < ban_timeout:
            raise InvalidInputError("need ban_timeout > 0, backoff >= 1 and max_ban_timeout >= ban_timeout")
        self.ban_timeout = ban_timeout
        self.backoff = backoff
        self.max_ban_timeout = max_ban_timeout
        self.clock = clock
        self._until: dict[str, float] = {}
        self._next_timeout: dict[str, float] = {}  # a peer's next ban length, set by its previous ban
        self._unverified: dict[str, int] = {}  # spot checks in a row that found no verifier to answer

    def ban(self, peer_id: str, reason: str) -> float:
        """Ban `peer_id` now; returns the ban's length in seconds."""
        timeout = self._next_timeout.get(peer_id, self.ban_timeout)
        self._next_timeout[peer_id] = min(timeout * self.backoff, self.max_ban_timeout)
        self._until[peer_id] = self.clock() + timeout
        logger.warning("peer banned peer=%s timeout=%.1f reason=%s", peer_id, timeout, reason)
        return timeout

    def is_banned(self, peer_id: str) -> bool:
        return self._until.get(peer_id, float("-inf")) > self.clock()

    def banned(self) -> set[str]:
        now = self.clock()
        return {peer_id for peer_id, until in self._until.items() if until > now}

    def served(self, peer_id: str) -> None:
        """`peer_id` served a request correctly: its next ban is one step shorter (a banned peer's is not)."""
        timeout = self._next_timeout.get(peer_id)
        if timeout is None or self.is_banned(peer_id):
            return
        shorter = timeout / self.backoff
        if shorter <= self.ban_timeout:
            del self._next_timeout[peer_id]
            self._until.pop(peer_id, None)
        else:
            self._next_timeout[peer_id] = shorter

    def unverified(self, peer_id: str) -> int:
        """One more spot check of `peer_id` that could not be done; returns how many in a row (a short
        session does not start the count again: a peer that cannot be checked stays suspect)."""
        self._unverified[peer_id] = self._unverified.get(peer_id, 0) + 1
        return self._unverified[peer_id]

    def verified(self, peer_id: str) -> None:
        """A spot check of `peer_id` was done and agreed: its count of unverified checks starts again."""
        self._unverified.pop(peer_id, None)

    def unban(self, peer_id: str) -> None:
        if self._next_timeout.pop(peer_id, None) is not None:
            logger.debug("peer unbanned peer=%s", peer_id)
        self._until.pop(peer_id, None)
