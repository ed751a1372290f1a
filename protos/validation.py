"""The DHT's record rules, checked by every node that stores a record and by every node that reads one.

Every key of a corolla swarm holds a dictionary whose subkeys are peer ids. An entry is accepted only when
    - its subkey is an Ed25519 peer id and its value carries that key's signature over (key, subkey,
      value, expiration): only a peer can write its own entries, and a replayed entry cannot be given a
      new lifetime;
    - it expires within `MAX_RECORD_TTL` seconds, plus `CLOCK_SKEW_MARGIN` for a writer whose clock is ahead
      of this node's: nobody can squat a key for a year, and a reader a few seconds behind still sees a
      record written for the longest lifetime;
    - its signed value is at most `MAX_VALUE_BYTES` (the largest valid `PeerRecord`, 32 pings, 16 adapters,
      4 relays and a 4096-character certificate, signs to 12,681 bytes);
    - its value follows the schema of its key: a model index entry (`{"model_id", "num_blocks"}`, what
      `peer.announce` writes) under `MODEL_INDEX_KEY`, a `PeerRecord` under any other key. Nodes see only the
      hash of a key, so the index key is recognised by its hash and every other key is taken for a block key
      (corolla stores nothing else);
    - it is a dictionary entry: a plain value, which would replace a whole key's dictionary, is refused.
Unsigned records (an older corolla, a stranger) are refused, with one log line per reason and minute. The
rules are the same on every node, so they are constants, not settings. How much a replica stores is bounded
in `protos.dht_storage`.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import msgpack
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.timed_storage import get_dht_time

from protos import identity as identities
from protos.errors import InvalidInputError
from protos.identity import Identity
from protos.records import MODEL_INDEX_KEY, record_from_dht, validate_model_id

logger = logging.getLogger(__name__)

MAX_RECORD_TTL = 300.0  # seconds: the longest lifetime a record may ask for (a few announce periods)
SIGNATURE_MAGIC = b"\xc0\x7e\x11\xa5"  # marks the 64-byte signature appended to a value
SIGNATURE_BYTES = 64
_TAIL = len(SIGNATURE_MAGIC) + SIGNATURE_BYTES
LOG_PERIOD = 60.0  # seconds between two log lines for the same kind of refusal
CLOCK_SKEW_MARGIN = 10.0  # seconds a writer's clock may run ahead of a replica's or a reader's
MAX_VALUE_BYTES = 16 * 1024  # a signed value: the largest valid PeerRecord signs to 12,681 bytes
MAX_NUM_BLOCKS = 4096  # the largest model index entry's block count (and the keys a reader reads for it)
INDEX_KEY_ID = DHTID.generate(MODEL_INDEX_KEY).to_bytes()  # what validators see of MODEL_INDEX_KEY


def _payload(record: DHTRecord, value: bytes) -> bytes:
    return MSGPackSerializer.dumps([record.key, record.subkey, value, record.expiration_time])


class SignedRecordValidator(RecordValidatorBase):
    """Signs this node's own entries (with `identity`) and validates everyone's (see the module doc)."""

    def __init__(self, *identities: Identity, max_ttl: float = MAX_RECORD_TTL) -> None:
        self.signers = {identity.peer_id: identity for identity in identities}  # whose entries we sign
        self.max_ttl = max_ttl
        self.refused = 0
        self._logged: dict[str, float] = {}

    def add_signer(self, identity: Identity) -> None:
        """Sign the entries of `identity` too (a test writing records for several peers)."""
        self.signers[identity.peer_id] = identity

    def sign_value(self, record: DHTRecord) -> bytes:
        signer = self.signers.get(self._subkey(record) or "")
        if signer is None:
            return record.value  # not ours to sign: every other node refuses it
        return record.value + SIGNATURE_MAGIC + signer.sign(_payload(record, record.value))

    def validate(self, record: DHTRecord) -> bool:
        """True when `record` follows every rule of the module doc; never raises, whatever it holds."""
        if not isinstance(record.value, bytes) or not isinstance(record.key, bytes):
            return self._refuse("a key or value that is not bytes")
        if record.subkey in DHTProtocol.RESERVED_SUBKEYS:
            return self._refuse("a plain value (only signed dictionary entries are stored)")
        if len(record.value) > MAX_VALUE_BYTES:
            return self._refuse(f"a value of more than {MAX_VALUE_BYTES} bytes")
        expiration = record.expiration_time
        if not isinstance(expiration, (int, float)) or not math.isfinite(expiration):
            return self._refuse("an expiration that is not a finite number")
        if expiration > get_dht_time() + self.max_ttl + CLOCK_SKEW_MARGIN:
            return self._refuse(f"an expiration more than {self.max_ttl:.0f} s ahead")
        peer_id = self._subkey(record)
        if peer_id is None or identities.public_key_of(peer_id) is None:
            return self._refuse("a subkey that is not an Ed25519 peer id")
        value, tail = record.value[:-_TAIL], record.value[-_TAIL:]
        if len(record.value) < _TAIL or not tail.startswith(SIGNATURE_MAGIC):
            return self._refuse("an unsigned entry (a peer of an older corolla?)")
        schema_error = schema_error_of(record.key, value)  # before the signature: it costs less to check
        if schema_error is not None:
            return self._refuse(schema_error)
        if not identities.verify(peer_id, tail[len(SIGNATURE_MAGIC) :], _payload(record, value)):
            return self._refuse("a signature that does not match its peer id")
        return True

    def strip_value(self, record: DHTRecord) -> bytes:
        value = record.value
        if isinstance(value, bytes) and len(value) >= _TAIL and value[-_TAIL:].startswith(SIGNATURE_MAGIC):
            return record.value[:-_TAIL]
        return record.value

    @property
    def priority(self) -> int:
        return 10  # checked and stripped before any validator that reads the value

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return False

    @staticmethod
    def _subkey(record: DHTRecord) -> str | None:
        try:
            subkey: Any = msgpack.unpackb(record.subkey, raw=False)
        except Exception:  # a subkey that is not msgpack (any of its many errors): not a peer id
            return None
        return subkey if isinstance(subkey, str) else None

    def _refuse(self, reason: str) -> bool:
        self.refused += 1
        now = time.monotonic()
        if now - self._logged.get(reason, -LOG_PERIOD) >= LOG_PERIOD:
            self._logged[reason] = now
            logger.warning("dht record refused: %s (refused so far: %d)", reason, self.refused)
        return False


def schema_error_of(key: bytes, value: bytes) -> str | None:
    """Why the unsigned `value` does not fit under the key whose DHT id is `key`; None when it does."""
    try:
        # plain msgpack, without hivemind's extension types: a record is plain data
        data = msgpack.unpackb(value, raw=False)
    except Exception:  # msgpack raises many types for malformed input
        return "a value that is not msgpack"
    if key == INDEX_KEY_ID:
        return None if is_index_entry(data) else "a model index entry that is not {model_id, num_blocks}"
    return None if record_from_dht(data) is not None else "a value that is not a PeerRecord under a block key"


def is_index_entry(value: object) -> bool:
    """A model index entry: exactly a valid `model_id` and a `num_blocks` in 1..MAX_NUM_BLOCKS."""
    if not isinstance(value, dict) or set(value) != {"model_id", "num_blocks"}:
        return False
    num_blocks = value["num_blocks"]
    if type(num_blocks) is not int or not 1 <= num_blocks <= MAX_NUM_BLOCKS:
        return False
    try:
        validate_model_id(value["model_id"])
    except InvalidInputError:
        return False
    return True
