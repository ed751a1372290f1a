"""Telling the swarm about this peer: one `PeerRecord` per hosted block in the DHT, refreshed periodically,
with the peer's lifecycle state (JOINING, ONLINE, DRAINING, OFFLINE)."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable

from hivemind.dht.node import DHTNode
from hivemind.utils.timed_storage import get_dht_time

from protos.records import MODEL_INDEX_KEY, PeerRecord, PeerState, block_key, record_to_dht

logger = logging.getLogger(__name__)


class Announcer:
    """Stores this peer's records under `{model_id}.{block}` with subkey = the peer's DHT id.

    Records expire after twice the period, so a peer that dies without a word disappears on its own.
    `make_record(state)` builds the record with current numbers (free cache, throughput).
    """

    def __init__(
        self,
        node: DHTNode,
        *,
        model_id: str,
        num_blocks: int | None,
        span: tuple[int, int],
        make_record: Callable[[PeerState], PeerRecord],
        period: float,
    ) -> None:
        self.node = node
        self.model_id = model_id
        self.num_blocks = num_blocks
        self.span = span
        self.make_record = make_record
        self.period = period
        self.state = PeerState.JOINING
        self._task: asyncio.Task[None] | None = None

    @property
    def peer_id(self) -> str:
        return self.node.peer_id.to_base58()

    async def announce(self, state: PeerState | None = None) -> bool:
        """Store the records now; True when every block's record was stored somewhere."""
        if state is not None:
            self.state = state
        record = record_to_dht(self.make_record(self.state))
        expiration = get_dht_time() + 2 * self.period
        block_keys = [block_key(self.model_id, block) for block in range(*self.span)]
        keys, values = list(block_keys), [record] * len(block_keys)
        subkeys: list[str] = [self.peer_id] * len(block_keys)
        if self.num_blocks is not None:  # known once the model's config is read
            keys.append(MODEL_INDEX_KEY)
            values.append({"num_blocks": self.num_blocks})
            subkeys.append(self.model_id)
        stored = await self.node.store_many(keys, values, expiration, subkeys=subkeys)
        ok = all(stored.get((key, self.peer_id), False) for key in block_keys)
        if not ok:
            logger.warning("announce incomplete model=%s state=%s", self.model_id, self.state)
        return ok

    def start(self) -> None:
        self._task = asyncio.create_task(self._refresh_forever(), name="corolla-announce")

    async def _refresh_forever(self) -> None:
        while True:
            # jitter spreads the refreshes of peers that started together
            await asyncio.sleep(self.period * random.uniform(0.8, 1.0))
            try:
                await self.announce()
            except Exception:  # keep announcing through a transient DHT failure
                logger.warning("announce failed model=%s", self.model_id, exc_info=True)

    async def stop(self, *, final_state: PeerState = PeerState.OFFLINE) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        try:
            await asyncio.wait_for(self.announce(final_state), timeout=5)
        except (TimeoutError, OSError) as e:
            logger.warning("final announce failed state=%s reason=%r", final_state, e)
