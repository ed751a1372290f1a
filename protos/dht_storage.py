"""How much a DHT replica stores and from whom, so that a key stays readable however many strangers write to
it; what a record must be is `protos.validation`'s business, not this module's.

hivemind 1.1.12 stores whatever validates, without bounds. `BoundedDHTProtocol` (every corolla DHT node runs
it, see `protos.dht`) adds:
- caps: a replica holds at most `MAX_SUBKEYS_PER_KEY` entries under a block key (`MAX_INDEX_ENTRIES` under
  the model index key, whose entries are a few hundred bytes) and `MAX_STORED_ENTRIES` in all. A full key
  refuses new subkeys; entries leave only by expiring, so strangers cannot push out a peer already stored,
  and a refresh of a stored subkey always fits. With values of at most `MAX_VALUE_BYTES` a block key holds
  about 1 MiB, so a replica's answer for the 3 keys a reader asks at once (`protos.swarm.KEYS_PER_GET`)
  stays under p2pd's 4 MiB message;
- a store budget per sender (the libp2p peer id of the STORE call): `STORE_BURST` entries at once, then
  `STORE_RATE` per second (a token bucket; the `MAX_SENDERS` most recent senders are remembered). Entries over
  the budget are refused before their signatures are checked;
- dictionaries checked entry by entry: in a replica's answer to a find, or a whole dictionary handed over to
  a new replica, an invalid entry is dropped and the valid ones stay (hivemind drops the whole answer); at
  most the key's cap of entries is checked, and a reader takes the answer's expiration from its valid
  entries (hivemind trusts the replica's, and an infinite one ends every search at that replica);
- no cache pushes: hivemind serves a key's cached copy instead of the stored one when the copy expires
  later, so a stranger's push into a replica's cache would hide what the replica stores. Replicas refuse
  them, and corolla nodes neither send them nor cache what they read (`protos.dht`).
These bounds must be the same on every node, so they are constants, not settings.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable

from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.routing import DHTID, BinaryDHTValue, Subkey
from hivemind.dht.storage import DHTLocalStorage, DictionaryDHTValue
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import dht_pb2
from hivemind.utils import timed_storage
from hivemind.utils.timed_storage import DHTExpiration, TimedStorage, ValueWithExpiration

from protos.validation import INDEX_KEY_ID

logger = logging.getLogger(__name__)

MAX_SUBKEYS_PER_KEY = 64  # peers a replica stores under one block key (64 x 16 KiB: about 1 MiB)
MAX_INDEX_ENTRIES = 1024  # peers a replica stores under the model index key (about 330 KiB)
MAX_STORED_ENTRIES = 16384  # entries a replica stores in all (at most 16384 x 16 KiB: 256 MiB)
STORE_BURST = 2048  # entries one sender may store at once (a replica handing over its keys to a new one)
# entries per second one sender may store after its burst (a peer announces ~1 per block per 30 s)
STORE_RATE = 32.0
MAX_SENDERS = 4096  # senders whose store budget is remembered; a forgotten one starts with a full burst
RECOUNT_PERIOD = 1.0  # seconds between two exact counts of a full replica's entries (they expire lazily)


def max_subkeys(key: DHTID) -> int:
    """How many entries a replica stores (and a reader checks) under `key`."""
    return MAX_INDEX_ENTRIES if key.to_bytes() == INDEX_KEY_ID else MAX_SUBKEYS_PER_KEY


class StoreRateLimiter:
    """A token bucket of entries per sender: `burst` at once, then `rate` per second."""

    def __init__(
        self,
        *,
        rate: float = STORE_RATE,
        burst: int = STORE_BURST,
        max_senders: int = MAX_SENDERS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate, self.burst, self.max_senders, self._clock = rate, burst, max_senders, clock
        self._buckets: OrderedDict[object, tuple[float, float]] = OrderedDict()  # sender -> (tokens, when)

    def take(self, sender: object, wanted: int) -> int:
        """How many of `wanted` entries `sender` may store now (0..wanted); those are spent."""
        now = self._clock()
        tokens, when = self._buckets.pop(sender, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - when) * self.rate)
        granted = max(0, min(wanted, int(tokens)))
        self._buckets[sender] = (tokens - granted, now)  # most recent last
        while len(self._buckets) > self.max_senders:
            self._buckets.popitem(last=False)
        return granted


class BoundedStorage(DHTLocalStorage):
    """`DHTLocalStorage` within the caps of the module doc.

    `get` hands out a copy of a dictionary: hivemind merges other replicas' answers into the dictionary a
    search starts from, which must not be this storage's own (that would bypass the caps)."""

    def __init__(self, maxsize: int | None = None, *, max_entries: int = MAX_STORED_ENTRIES) -> None:
        super().__init__(maxsize)
        self.max_entries = max_entries
        self._num_entries = 0  # an upper bound (expired entries leave lazily), counted exactly when full
        self._counted = -math.inf

    @classmethod
    def adopt(cls, storage: DHTLocalStorage) -> BoundedStorage:
        """A bounded storage holding what `storage` holds, as far as the caps allow."""
        bounded = cls(None if math.isinf(storage.maxsize) else int(storage.maxsize))
        for key, item in list(storage.items()):
            bounded.store(key, item.value, item.expiration_time)
        return bounded

    def get(self, key: DHTID) -> ValueWithExpiration | None:
        item = TimedStorage.get(self, key)
        if item is None or not isinstance(item.value, DictionaryDHTValue):
            return item
        return ValueWithExpiration(_copy(item.value), item.expiration_time)

    def store(
        self,
        key: DHTID,
        value: BinaryDHTValue | DictionaryDHTValue,
        expiration_time: DHTExpiration,
        subkey: Subkey | None = None,
    ) -> bool:
        if subkey is not None:
            return self.store_subkey(key, subkey, value, expiration_time)
        if isinstance(value, DictionaryDHTValue):  # a whole dictionary: entry by entry, within the caps
            stored = [self.store_subkey(key, s, v, e) for s, (v, e) in list(value.items())]
            return bool(stored) and all(stored)
        if key not in self.data and not self._has_room():  # a plain value (the validator refuses them)
            return False
        self._num_entries += key not in self.data
        return TimedStorage.store(self, key, value, expiration_time)

    def store_subkey(
        self, key: DHTID, subkey: Subkey, value: BinaryDHTValue, expiration_time: DHTExpiration
    ) -> bool:
        """hivemind's `store_subkey`, except that a new subkey needs room under the caps (module doc)."""
        if expiration_time < timed_storage.get_dht_time():
            return False
        item = TimedStorage.get(self, key)
        entries = item.value if item is not None else None
        if not isinstance(entries, DictionaryDHTValue):
            if item is not None and expiration_time <= item.expiration_time:
                return False  # a later plain value stays, as in hivemind
            if not self._has_room():
                return False
            entries = DictionaryDHTValue()
            entries.store(subkey, value, expiration_time)
            self._num_entries += 1
            return TimedStorage.store(self, key, entries, expiration_time)
        is_new = subkey not in entries
        if is_new and (len(entries) >= max_subkeys(key) or not self._has_room()):
            return False  # a full key: stored peers keep their place until they expire
        if expiration_time > entries.latest_expiration_time:  # the key lives as long as its latest entry
            TimedStorage.store(self, key, entries, expiration_time)
        stored = entries.store(subkey, value, expiration_time)
        self._num_entries += is_new and stored
        return stored

    def _has_room(self) -> bool:
        if self._num_entries < self.max_entries:
            return True
        now = time.monotonic()
        if now - self._counted >= RECOUNT_PERIOD:  # counting walks every key: not on every refused store
            self._counted = now
            self._num_entries = sum(
                len(item.value) if isinstance(item.value, DictionaryDHTValue) else 1
                for _, item in self.items()
            )
        return self._num_entries < self.max_entries


def _copy(entries: DictionaryDHTValue) -> DictionaryDHTValue:
    copy = DictionaryDHTValue()
    with copy.freeze():
        for subkey, (value, expiration_time) in entries.items():
            copy.store(subkey, value, expiration_time)
    copy.latest_expiration_time = entries.latest_expiration_time
    return copy


class BoundedDHTProtocol(DHTProtocol):
    """hivemind's DHT protocol with the bounds of the module doc; `protos.dht` makes every node use it."""

    def __init__(self, *, _initialized_with_create: bool = False) -> None:
        super().__init__(_initialized_with_create=_initialized_with_create)
        self.store_limiter = StoreRateLimiter()

    # `DHTProtocol.create` assigns plain storages before it serves anything: they become bounded ones here
    @property  # type: ignore[override]
    def storage(self) -> BoundedStorage:
        return self._bounded_storage

    @storage.setter
    def storage(self, storage: DHTLocalStorage) -> None:
        bounded = storage if isinstance(storage, BoundedStorage) else BoundedStorage.adopt(storage)
        self._bounded_storage = bounded

    async def rpc_store(self, request: dht_pb2.StoreRequest, context: P2PContext) -> dht_pb2.StoreResponse:
        """Some node asks us to store entries: each within its sender's budget, checked, within the caps."""
        if request.peer:  # as in hivemind: the sender joins the routing table
            asyncio.create_task(self.rpc_ping(dht_pb2.PingRequest(peer=request.peer), context))  # noqa: RUF006
        response = dht_pb2.StoreResponse(store_ok=[], peer=self.node_info)
        columns = (request.keys, request.subkeys, request.values, request.expiration_time, request.in_cache)
        if len({len(column) for column in columns}) != 1:
            response.store_ok.extend([False] * len(request.keys))  # misaligned: nothing is stored
            return response
        for key, tag, value, expiration_time, in_cache in zip(*columns, strict=True):
            if in_cache:  # see the module doc: a cache push could hide this replica's storage
                response.store_ok.append(False)
                continue
            try:
                stored = self._store_item(context.remote_id, key, tag, value, expiration_time)
            except Exception as e:  # malformed network input in any of msgpack's ways: refused, never stored
                logger.debug("dht store refused: malformed item from %s: %r", context.remote_id, e)
                stored = False
            response.store_ok.append(stored)
        return response

    def _store_item(
        self, sender: PeerID, key: bytes, tag: bytes, value: bytes, expiration_time: float
    ) -> bool:
        if len(key) != DHTID.HASH_NBYTES:
            return False
        key_id = DHTID.from_bytes(key)
        if tag == self.IS_DICTIONARY:  # a whole dictionary, as a replica hands its keys over to a new one
            dictionary = self.serializer.loads(value)
            if not isinstance(dictionary, DictionaryDHTValue):
                return False
            budget = self.store_limiter.take(sender, min(len(dictionary.data), max_subkeys(key_id)))
            valid = self._valid_entries(key, dictionary, budget)
            stored = [self.storage.store_subkey(key_id, s, v, e) for s, (v, e) in valid.items()]
            return len(stored) == len(dictionary.data) and all(stored)
        if not self.store_limiter.take(sender, 1) or not self._validate_record(
            key, tag, value, expiration_time
        ):
            return False
        if tag == self.IS_REGULAR_VALUE:  # a plain value: only without a validator (corolla's refuses them)
            return self.storage.store(key_id, value, expiration_time)
        return self.storage.store_subkey(key_id, self.serializer.loads(tag), value, expiration_time)

    def _valid_entries(
        self, key: bytes, dictionary: DictionaryDHTValue, limit: int
    ) -> dict[Subkey, ValueWithExpiration[bytes]]:
        """The valid ones among the first `limit` entries of `dictionary`, one by one."""
        with dictionary.freeze():
            items = list(dictionary.data.items())[: max(0, limit)]
        valid = {}
        for subkey, item in items:
            try:
                ok = self._validate_record(
                    key, self.serializer.dumps(subkey), item.value, item.expiration_time
                )
            except Exception as e:  # a subkey msgpack cannot write back: not a peer id anyway
                logger.debug("dht entry refused: %r", e)
                ok = False
            if ok:
                valid[subkey] = item
        return valid

    def _validate_dictionary(self, key_bytes: bytes, dictionary: DictionaryDHTValue) -> bool:
        """Keep the valid entries of a replica's answer (checking at most the key's cap of them) and drop the
        rest; True when any is left. hivemind's version refuses the whole answer for one invalid entry."""
        limit = max_subkeys(DHTID.from_bytes(key_bytes)) if len(key_bytes) == DHTID.HASH_NBYTES else 0
        valid = self._valid_entries(key_bytes, dictionary, limit)
        # the replica names its own maxsize: hivemind would evict merged entries by it
        dictionary.maxsize = math.inf
        with dictionary.freeze():
            for subkey in [subkey for subkey in dictionary.data if subkey not in valid]:
                del dictionary[subkey]
        return bool(valid)

    async def call_find(self, peer: PeerID, keys: list[DHTID]) -> dict | None:  # type: ignore[override]
        """hivemind's `call_find`, with each dictionary's expiration taken from its entries (all valid by now)
        instead of from the replica's word."""
        output = await super().call_find(peer, keys)
        if output is None:
            return None
        for key, (found, nearest) in list(output.items()):
            if found is not None and isinstance(found.value, DictionaryDHTValue):
                expirations = [item.expiration_time for _, item in found.value.items()]
                latest = ValueWithExpiration(found.value, max(expirations)) if expirations else None
                output[key] = latest, nearest
        return output
