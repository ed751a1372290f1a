"""The DHT's record rules, checked by every node that stores a record and by every node that reads one.

Every key of a corolla swarm holds a dictionary whose subkeys are peer ids. An entry is accepted only when
    - its subkey is an Ed25519 peer id and its value carries that key's signature over (key, subkey,
      value, expiration): only a peer can write its own entries, and a replayed entry cannot be given a
      new lifetime;
    - it expires within `MAX_RECORD_TTL` seconds: nobody can squat a key for a year;
    - it is a dictionary entry: a plain value, which would replace a whole key's dictionary, is refused.
Unsigned records (an older corolla, a stranger) are refused, with one log line per reason and minute.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.timed_storage import get_dht_time

from protos import identity as identities
from protos.identity import Identity

logger = logging.getLogger(__name__)

MAX_RECORD_TTL = 300.0  # seconds: the longest lifetime a record may ask for (a few announce periods)
SIGNATURE_MAGIC = b"\xc0\x7e\x11\xa5"  # marks the 64-byte signature appended to a value
SIGNATURE_BYTES = 64
_TAIL = len(SIGNATURE_MAGIC) + SIGNATURE_BYTES
LOG_PERIOD = 60.0  # seconds between two log lines for the same kind of refusal


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
        if record.subkey in DHTProtocol.RESERVED_SUBKEYS:
            return self._refuse("a plain value (only signed dictionary entries are stored)")
        if record.expiration_time > get_dht_time() + self.max_ttl:
            return self._refuse(f"an expiration more than {self.max_ttl:.0f} s ahead")
        peer_id = self._subkey(record)
        if peer_id is None or identities.public_key_of(peer_id) is None:
            return self._refuse("a subkey that is not an Ed25519 peer id")
        value, tail = record.value[:-_TAIL], record.value[-_TAIL:]
        if len(record.value) < _TAIL or not tail.startswith(SIGNATURE_MAGIC):
            return self._refuse("an unsigned entry (a peer of an older corolla?)")
        if not identities.verify(peer_id, tail[len(SIGNATURE_MAGIC) :], _payload(record, value)):
            return self._refuse("a signature that does not match its peer id")
        return True

    def strip_value(self, record: DHTRecord) -> bytes:
        if record.value[-_TAIL:].startswith(SIGNATURE_MAGIC) and len(record.value) >= _TAIL:
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
            subkey: Any = MSGPackSerializer.loads(record.subkey)
        except Exception:  # a subkey that is not msgpack: not a peer id
            return None
        return subkey if isinstance(subkey, str) else None

    def _refuse(self, reason: str) -> bool:
        self.refused += 1
        now = time.monotonic()
        if now - self._logged.get(reason, -LOG_PERIOD) >= LOG_PERIOD:
            self._logged[reason] = now
            logger.warning("dht record refused: %s (refused so far: %d)", reason, self.refused)
        return False
