"""Signed records against a real `corolla dht` process and in-process DHT nodes on 127.0.0.1: only a peer's
own key writes its entries, plain values cannot wipe a key, far-future expirations are refused by every
replica and dropped by readers that had cached them, and unsigned records (an older corolla) are refused."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Iterator

import pytest
from hivemind.dht.node import DHTNode
from hivemind.dht.validation import DHTRecord
from hivemind.utils.timed_storage import get_dht_time
from records_factory import peer_record

from protos.dht import start_dht_node
from protos.identity import Identity, IdentityError
from protos.records import block_key, record_to_dht
from protos.swarm import read_records
from protos.validation import MAX_RECORD_TTL, SIGNATURE_MAGIC, SignedRecordValidator, _payload

pytestmark = pytest.mark.swarm

MODEL = "signed-model"
YEAR = 365 * 24 * 3600.0


class Forger(SignedRecordValidator):
    """Signs every entry, whatever its subkey, with its own key: a peer writing as someone else."""

    def sign_value(self, record: DHTRecord) -> bytes:
        [identity] = self.signers.values()
        return record.value + SIGNATURE_MAGIC + identity.sign(_payload(record, record.value))


@pytest.fixture(autouse=True)
def _collected() -> Iterator[None]:
    """Collect the in-process DHT nodes' leftovers after each test, not while pytest parses a module (CPython
    3.11's AST parser fails when a finalizer runs in the middle of it)."""
    yield
    gc.collect()


async def _store(node: DHTNode, key: str, subkey: str | None, value: object, ttl: float) -> bool:
    """Stored on the other nodes (never only on `node` itself)."""
    expiration = get_dht_time() + ttl
    return await node.store(key, value, expiration, subkey=subkey, exclude_self=True)


async def _address(reader: DHTNode, peer_id: str) -> str | None:
    latest = await read_records(reader, MODEL, 1)
    return latest[peer_id][1].address if peer_id in latest else None


def test_only_a_peers_own_key_writes_its_records(dht: list[str], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="protos.validation")

    async def scenario() -> None:
        alice = await start_dht_node(initial_peers=dht)
        mallory = await start_dht_node(initial_peers=dht)
        replica = await start_dht_node(initial_peers=dht)  # a third server: every replica must refuse
        reader = await start_dht_node(initial_peers=dht, client_mode=True)
        alice_id, mallory_id = alice.peer_id.to_base58(), mallory.peer_id.to_base58()
        key = block_key(MODEL, 0)
        honest = record_to_dht(peer_record(0, 1, 10.0, port=5001))
        forged = record_to_dht(peer_record(0, 1, 1e6, port=6666))
        try:
            assert await _store(alice, key, alice_id, honest, 60.0)
            assert await _address(reader, alice_id) == "127.0.0.1:5001"

            # mallory signs an entry under alice's id with mallory's key: refused everywhere
            [mallory_identity] = mallory.protocol.record_validator.signers.values()
            mallory.protocol.record_validator = Forger(mallory_identity)
            assert not await _store(mallory, key, alice_id, forged, 120.0)
            # a plain value would replace the whole dictionary of the key
            assert not await _store(mallory, key, None, "wiped", 120.0)
            # an entry of mallory's own that would squat the key for a year
            mallory.protocol.record_validator = SignedRecordValidator(mallory_identity)
            assert not await _store(mallory, key, mallory_id, forged, YEAR)
            assert await _address(reader, alice_id) == "127.0.0.1:5001"
            assert mallory_id not in await read_records(reader, MODEL, 1)

            # an older corolla signs nothing: its records are refused, with a log line saying why
            mallory.protocol.record_validator = None
            assert not await _store(mallory, key, mallory_id, forged, 60.0)
            assert await _address(reader, alice_id) == "127.0.0.1:5001"

            # a reader that had cached a year-long record (before this rule) drops it at the next read
            cached = {mallory_id: (get_dht_time() + YEAR, peer_record(0, 1, 1e6, port=6666))}
            latest = await read_records(reader, MODEL, 1, previous=cached)
            assert mallory_id not in latest and latest[alice_id][1].address == "127.0.0.1:5001"
            # a record within the cap stays cached when a read misses it
            kept = {mallory_id: (get_dht_time() + MAX_RECORD_TTL / 2, peer_record(0, 1, 5.0, port=6667))}
            assert mallory_id in await read_records(reader, MODEL, 1, previous=kept)
        finally:
            for node in (reader, replica, mallory, alice):
                await node.shutdown()

    asyncio.run(scenario())
    messages = " | ".join(record.getMessage() for record in caplog.records)
    assert "dht record refused: an unsigned entry" in messages


def test_identity_files_are_private_and_stable(tmp_path) -> None:
    path = tmp_path / "keys" / "peer.key"
    created = Identity.load_or_create(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert Identity.load_or_create(path).peer_id == created.peer_id
    path.chmod(0o644)
    with pytest.raises(IdentityError, match="readable by others"):
        Identity.load_or_create(path)
    path.chmod(0o600)
    path.write_bytes(b"\x08\x00\x12\x03abc")  # an RSA key's type tag, as older files hold
    with pytest.raises(IdentityError, match="does not hold an Ed25519 key"):
        Identity.load_or_create(path)


def test_a_peer_keeps_its_peer_id_across_restarts(tmp_path) -> None:
    path = tmp_path / "node.key"

    async def peer_id() -> str:
        node = await start_dht_node(identity_path=path)
        try:
            return node.peer_id.to_base58()
        finally:
            await node.shutdown()

    first, second = asyncio.run(peer_id()), asyncio.run(peer_id())
    assert first == second == Identity.load_or_create(path).peer_id
