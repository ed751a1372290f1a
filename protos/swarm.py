"""Reading one model's `PeerRecord`s from the DHT: shared by clients (routing) and peers (choosing a span).

For each peer the record with the latest expiration wins: a peer that moved or went offline left older
records behind under other block keys. A record stored under a block outside its own span, or beyond the
model, is dropped, as is anything that does not validate.
"""

from __future__ import annotations

import logging
import re

from hivemind.dht.node import DHTNode
from hivemind.utils.timed_storage import ValueWithExpiration, get_dht_time

from protos.errors import CorollaError
from protos.records import MODEL_INDEX_KEY, PeerRecord, block_key, record_from_dht

logger = logging.getLogger(__name__)

MAX_NUM_BLOCKS = 4096  # bounds the keys read for a model index value that came from the network
_PEER_ID = re.compile(r"[1-9A-HJ-NP-Za-km-z]{1,128}")  # base58

Latest = dict[str, tuple[float, PeerRecord]]  # peer_id -> (DHT expiration, record)


class SwarmReadError(CorollaError):
    """The DHT holds no usable entry for the model (no index entry, or an invalid one)."""


def not_announced(model_id: str) -> str:
    """What to tell a user when no record of `model_id` was found."""
    return f"no peer announces model {model_id}; check --initial-peers and the model id"


async def read_num_blocks(node: DHTNode, model_id: str) -> int:
    """The model's number of blocks from the model index key; `SwarmReadError` when nobody announced it."""
    entry = await node.get(MODEL_INDEX_KEY, latest=True)
    models = entry.value if isinstance(entry, ValueWithExpiration) else None
    item = models.get(model_id) if isinstance(models, dict) else None
    if not isinstance(item, ValueWithExpiration):
        raise SwarmReadError(not_announced(model_id))
    value = item.value
    num_blocks = value.get("num_blocks") if isinstance(value, dict) else None
    if type(num_blocks) is not int or not 1 <= num_blocks <= MAX_NUM_BLOCKS:
        raise SwarmReadError(f"the model index entry of {model_id} is invalid: {value!r:.200}")
    return num_blocks


async def read_records(
    node: DHTNode, model_id: str, num_blocks: int, *, previous: Latest | None = None
) -> Latest:
    """Every block key of the model in one `get_many`; the latest valid record of each peer.

    Records of `previous` that have not expired stay when this read misses them (a frozen DHT replica).
    """
    keys = [block_key(model_id, block) for block in range(num_blocks)]
    found = await node.get_many(keys, sufficient_expiration_time=float("inf"))
    now = get_dht_time()
    latest = {peer_id: entry for peer_id, entry in (previous or {}).items() if entry[0] > now}
    dropped = 0
    for block, key in enumerate(keys):
        for peer_id, record, expiration in _entries(found.get(key)):
            if record is None or not record.start <= block < record.end or record.end > num_blocks:
                dropped += 1
                continue
            if peer_id not in latest or expiration > latest[peer_id][0]:
                latest[peer_id] = (expiration, record)
    if dropped:
        logger.debug("swarm read model=%s dropped=%d", model_id, dropped)
    return latest


def _entries(entry: object) -> list[tuple[str, PeerRecord | None, float]]:
    """(peer_id, record or None when invalid, expiration) of one block key's value, as read from the DHT."""
    value = entry.value if isinstance(entry, ValueWithExpiration) else None
    if not isinstance(value, dict):
        return []
    entries = []
    for peer_id, item in value.items():
        if not isinstance(peer_id, str) or not _PEER_ID.fullmatch(peer_id):
            continue
        if isinstance(item, ValueWithExpiration):
            entries.append((peer_id, record_from_dht(item.value), float(item.expiration_time)))
    return entries
