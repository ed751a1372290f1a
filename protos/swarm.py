"""Reading one model's `PeerRecord`s from the DHT: shared by clients (routing) and peers (choosing a span).

For each peer the record with the latest expiration wins: a peer that moved or went offline left older
records behind under other block keys. A record stored under a block outside its own span, or beyond the
model, is dropped, as is anything that does not validate. Every DHT node has already checked each entry's
signature and schema (`protos.validation`); readers also ignore a record that would outlive `MAX_RECORD_TTL`
(plus `CLOCK_SKEW_MARGIN`), even one they cached earlier, and take at most `MAX_ENTRIES_PER_KEY` valid entries
from a key: invalid ones are skipped, not counted. Keys are read `KEYS_PER_GET` at a time, so that a replica
answers a few keys per message (`protos.dht_storage`).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import Counter
from collections.abc import Iterator

from hivemind.dht.node import DHTNode
from hivemind.utils.timed_storage import ValueWithExpiration, get_dht_time

from protos.errors import CorollaError
from protos.records import MODEL_INDEX_KEY, PeerRecord, block_key, record_from_dht
from protos.validation import CLOCK_SKEW_MARGIN, MAX_NUM_BLOCKS, MAX_RECORD_TTL

logger = logging.getLogger(__name__)

MAX_ENTRIES_PER_KEY = 1024  # valid entries (peers) a reader takes from one key; the rest is ignored
# hivemind asks each replica for sqrt(n) of the n keys of a get at once: 3 for 15 keys, whose entries (about
# 1 MiB per key at most, protos.dht_storage) stay under p2pd's 4 MiB message
KEYS_PER_GET = 15
_MAX_LIFETIME = MAX_RECORD_TTL + CLOCK_SKEW_MARGIN  # the longest a writer ahead of this clock may ask for
_PEER_ID = re.compile(r"[1-9A-HJ-NP-Za-km-z]{1,128}")  # base58

Latest = dict[str, tuple[float, PeerRecord]]  # peer_id -> (DHT expiration, record)


class SwarmReadError(CorollaError):
    """The DHT holds no usable entry for the model (no index entry, or an invalid one)."""


def not_announced(model_id: str) -> str:
    """What to tell a user when no record of `model_id` was found."""
    return f"no peer announces model {model_id}; check --initial-peers and the model id"


async def read_num_blocks(node: DHTNode, model_id: str) -> int:
    """The model's number of blocks from the model index key (each peer's entry names its model and the
    model's block count; the count most peers give wins); `SwarmReadError` when nobody announced it."""
    entry = await node.get(MODEL_INDEX_KEY, latest=True)
    entries = entry.value if isinstance(entry, ValueWithExpiration) else None
    counts: Counter[int] = Counter()
    invalid = None
    for item in entries.values() if isinstance(entries, dict) else []:
        value = item.value if isinstance(item, ValueWithExpiration) else None
        if not isinstance(value, dict) or value.get("model_id") != model_id:
            continue
        num_blocks = value.get("num_blocks")
        if type(num_blocks) is int and 1 <= num_blocks <= MAX_NUM_BLOCKS:
            counts[num_blocks] += 1
            if counts.total() >= MAX_ENTRIES_PER_KEY:
                break
        else:
            invalid = value
    if counts:
        return counts.most_common(1)[0][0]
    if invalid is not None:
        raise SwarmReadError(f"the model index entry of {model_id} is invalid: {invalid!r:.200}")
    raise SwarmReadError(not_announced(model_id))


async def read_records(
    node: DHTNode, model_id: str, num_blocks: int, *, previous: Latest | None = None
) -> Latest:
    """Every block key of the model in one `get_many`; the latest valid record of each peer.

    Records of `previous` that have not expired stay when this read misses them (a frozen DHT replica).
    """
    keys = [block_key(model_id, block) for block in range(num_blocks)]
    batches = [keys[i : i + KEYS_PER_GET] for i in range(0, len(keys), KEYS_PER_GET)]
    found: dict = {}
    for batch in await asyncio.gather(
        *(node.get_many(batch, sufficient_expiration_time=float("inf")) for batch in batches)
    ):
        found.update(batch)
    now = get_dht_time()
    latest = {
        peer_id: entry for peer_id, entry in (previous or {}).items() if now < entry[0] <= now + _MAX_LIFETIME
    }
    dropped = 0
    for block, key in enumerate(keys):
        taken = 0
        for peer_id, record, expiration in _entries(found.get(key)):
            if taken >= MAX_ENTRIES_PER_KEY:
                break
            if expiration > now + _MAX_LIFETIME:
                dropped += 1
                continue
            if record is None or not record.start <= block < record.end or record.end > num_blocks:
                dropped += 1
                continue
            taken += 1
            if peer_id not in latest or expiration > latest[peer_id][0]:
                latest[peer_id] = (expiration, record)
    if dropped:
        logger.debug("swarm read model=%s dropped=%d", model_id, dropped)
    return latest


def _entries(entry: object) -> Iterator[tuple[str, PeerRecord | None, float]]:
    """(peer_id, record or None when invalid, expiration) of one block key's value, as read from the DHT."""
    value = entry.value if isinstance(entry, ValueWithExpiration) else None
    if not isinstance(value, dict):
        return
    for peer_id, item in value.items():
        if not isinstance(peer_id, str) or not _PEER_ID.fullmatch(peer_id):
            continue
        if isinstance(item, ValueWithExpiration):
            yield peer_id, record_from_dht(item.value), float(item.expiration_time)
