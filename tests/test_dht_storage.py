"""Bounded DHT replicas (C1, M1 of review-security-3): what a replica stores, from whom, and what a reader
sees when strangers write to a key. The unit tests check the rules; the swarm tests run them against real
p2pd processes (a `corolla dht` process and in-process DHT nodes) on 127.0.0.1."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hivemind.dht.node import DHTNode
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.timed_storage import ValueWithExpiration, get_dht_time
from records_factory import peer_record

from protos.dht import start_dht_node
from protos.dht_storage import MAX_SUBKEYS_PER_KEY, BoundedStorage, StoreRateLimiter
from protos.identity import Identity
from protos.records import (
    MAX_CERTIFICATE_CHARS,
    MAX_RELAY_MADDR_CHARS,
    MODEL_INDEX_KEY,
    block_key,
    record_to_dht,
)
from protos.swarm import MAX_ENTRIES_PER_KEY, read_records
from protos.validation import (
    CLOCK_SKEW_MARGIN,
    INDEX_KEY_ID,
    MAX_RECORD_TTL,
    MAX_VALUE_BYTES,
    SignedRecordValidator,
)

MODEL = "bounded-model"
KEY = block_key(MODEL, 0)
KEY_ID = DHTID.generate(KEY)
HONEST_TTL = 60.0  # what a peer with the default announce period asks for
dumps = MSGPackSerializer.dumps


@pytest.fixture(autouse=True)
def _collected(request: pytest.FixtureRequest) -> Iterator[None]:
    """Collect the in-process DHT nodes' leftovers after each swarm test (see test_signed_records.py)."""
    yield
    if request.node.get_closest_marker("swarm") is not None:
        gc.collect()


def _signed(identity: Identity, key: str, value: Any, expiration: float) -> DHTRecord:
    """The record a node writing as `identity` sends: value signed over (key, subkey, value, expiration)."""
    record = DHTRecord(DHTID.generate(key).to_bytes(), dumps(identity.peer_id), dumps(value), expiration)
    signed = SignedRecordValidator(identity).sign_value(record)
    return DHTRecord(record.key, record.subkey, signed, expiration)


def _largest_record() -> dict[str, Any]:
    """A valid PeerRecord as large as the schema allows (what MAX_VALUE_BYTES was measured with)."""
    return record_to_dht(
        peer_record(
            0,
            2**32 - 1,
            1.5e300,
            address=".".join(["a" * 63] * 3) + "." + "a" * 61 + ":65535",
            pings={f"p{i:03d}" + "x" * 124: 1.5e300 for i in range(32)},
            adapters=tuple(f"a{i:02d}" + "b" * 125 for i in range(16)),
            certificate="c" * MAX_CERTIFICATE_CHARS,
            relay_maddrs=tuple(f"/dns/{i}{'r' * (MAX_RELAY_MADDR_CHARS - 18)}/p2p-circuit" for i in range(4)),
            public_name="\U0001f600" * 64,
            quantization="q" * 32,
            version="v" * 64,
            max_batch_size=2**32 - 1,
            max_forward_tokens=2**64 - 1,
            free_cache_tokens=2**64 - 1,
            num_sessions=2**32 - 1,
            queued=2**32 - 1,
            max_length=2**32 - 1,
        )
    )


# ---- the record rules, without a network ----------------------------------------------------------------

ALICE = Identity.load_or_create(None)


def test_the_largest_valid_record_fits_the_value_cap_with_margin() -> None:
    record = _signed(ALICE, KEY, _largest_record(), get_dht_time() + HONEST_TTL)
    assert 12_000 < len(record.value) < 0.8 * MAX_VALUE_BYTES  # 12,681 bytes when measured
    assert SignedRecordValidator().validate(record)


@pytest.mark.parametrize(
    ("key", "value", "accepted"),
    [
        (KEY, record_to_dht(peer_record(0, 1)), True),
        (MODEL_INDEX_KEY, {"model_id": MODEL, "num_blocks": 4}, True),
        (KEY, {"model_id": MODEL, "num_blocks": 4}, False),  # an index entry under a block key
        (MODEL_INDEX_KEY, record_to_dht(peer_record(0, 1)), False),  # a record under the index key
        (KEY, {"junk": 1}, False),
        (KEY, b"x" * 100, False),
        (KEY, record_to_dht(peer_record(0, 1)) | {"padding": "x"}, False),
        (KEY, record_to_dht(peer_record(0, 1)) | {"public_name": "x" * (MAX_VALUE_BYTES + 1)}, False),
        (MODEL_INDEX_KEY, {"model_id": MODEL, "num_blocks": "many"}, False),
        (MODEL_INDEX_KEY, {"model_id": MODEL, "num_blocks": 4097}, False),
        (MODEL_INDEX_KEY, {"model_id": "a b", "num_blocks": 4}, False),
        (MODEL_INDEX_KEY, {"model_id": MODEL, "num_blocks": 4, "x": 0}, False),
    ],
)
def test_a_value_must_follow_its_keys_schema_and_size(key: str, value: Any, accepted: bool) -> None:
    assert (
        SignedRecordValidator().validate(_signed(ALICE, key, value, get_dht_time() + HONEST_TTL)) is accepted
    )


def test_the_index_key_is_recognised_by_its_hash() -> None:
    assert DHTID.generate(MODEL_INDEX_KEY).to_bytes() == INDEX_KEY_ID


@pytest.mark.parametrize(
    ("ahead", "accepted"),
    [(MAX_RECORD_TTL, True), (MAX_RECORD_TTL + 3.5, True), (MAX_RECORD_TTL + CLOCK_SKEW_MARGIN + 5, False)],
)
def test_the_expiry_cap_allows_for_clock_skew(ahead: float, accepted: bool) -> None:
    record = _signed(ALICE, KEY, record_to_dht(peer_record(0, 1)), get_dht_time() + ahead)
    assert SignedRecordValidator().validate(record) is accepted


# ---- a replica's storage ----------------------------------------------------------------------------------


def _fill(storage: BoundedStorage, count: int, ttl: float, *, key: DHTID = KEY_ID) -> list[bool]:
    return [storage.store(key, b"junk", get_dht_time() + ttl, subkey=f"junk{i}") for i in range(count)]


def test_a_full_key_refuses_new_subkeys_and_keeps_every_refresh() -> None:
    storage = BoundedStorage()
    assert storage.store(KEY_ID, b"honest", get_dht_time() + HONEST_TTL, subkey="honest")
    assert _fill(storage, MAX_SUBKEYS_PER_KEY + 10, MAX_RECORD_TTL).count(True) == MAX_SUBKEYS_PER_KEY - 1
    # the honest entry expires first, yet strangers cannot push it out; its refresh always fits
    assert storage.store(KEY_ID, b"honest v2", get_dht_time() + HONEST_TTL + 1, subkey="honest")
    entries = storage.get(KEY_ID).value
    assert len(entries) == MAX_SUBKEYS_PER_KEY and entries.get("honest").value == b"honest v2"
    # the index key holds more (its entries are small)
    assert all(_fill(storage, MAX_SUBKEYS_PER_KEY + 10, 60.0, key=DHTID.generate(MODEL_INDEX_KEY)))


def test_a_replica_holds_a_bounded_number_of_entries_in_all() -> None:
    storage = BoundedStorage(max_entries=10)
    stored = [
        storage.store(DHTID.generate(f"k{i}"), b"v", get_dht_time() + 60, subkey="s") for i in range(12)
    ]
    assert stored.count(True) == 10
    assert storage.store(DHTID.generate("k0"), b"v2", get_dht_time() + 61, subkey="s")  # a refresh fits


def test_storage_hands_out_copies_of_its_dictionaries() -> None:
    storage = BoundedStorage()
    assert storage.store(KEY_ID, b"v", get_dht_time() + 60, subkey="s")
    storage.get(KEY_ID).value.store("merged", b"x", get_dht_time() + 60)  # as a search merges answers
    assert len(storage.get(KEY_ID).value) == 1


def test_store_budget_per_sender() -> None:
    now = [0.0]
    limiter = StoreRateLimiter(rate=2.0, burst=5, max_senders=2, clock=lambda: now[0])
    assert [limiter.take("a", 3), limiter.take("a", 3), limiter.take("b", 5)] == [3, 2, 5]
    now[0] = 1.0
    assert [limiter.take("a", 5), limiter.take("a", 1)] == [2, 0]
    limiter.take("c", 1)  # the table holds 2 senders: "b", the least recent, is forgotten
    assert limiter.take("b", 9) == 5


class _Answering:
    """A DHT node whose reads return `entries` under every key: what a search merged from the replicas."""

    def __init__(self, entries: dict[str, ValueWithExpiration]) -> None:
        self.entries = entries

    async def get_many(self, keys: list[str], **_: Any) -> dict[str, ValueWithExpiration]:
        return {key: ValueWithExpiration(self.entries, get_dht_time() + 60) for key in keys}


def test_a_reader_skips_invalid_entries_without_counting_them() -> None:
    """More than MAX_ENTRIES_PER_KEY entries that do not fit the key (records of another span) come first;
    the honest record after them is still read."""
    expiration = get_dht_time() + 60
    misplaced = record_to_dht(peer_record(1, 2))
    entries = {
        f"Junk{i}": ValueWithExpiration(misplaced, expiration) for i in range(MAX_ENTRIES_PER_KEY + 50)
    }
    entries["Honest"] = ValueWithExpiration(record_to_dht(peer_record(0, 1, port=5001)), expiration)
    latest = asyncio.run(read_records(_Answering(entries), MODEL, 1))  # type: ignore[arg-type]
    assert list(latest) == ["Honest"]


# ---- against real p2pd processes --------------------------------------------------------------------------


async def _store(node: DHTNode, key: str, subkey: str, value: Any, ttl: float) -> bool:
    return await node.store(key, value, get_dht_time() + ttl, subkey=subkey, exclude_self=True)


async def _shutdown(*nodes: DHTNode) -> None:
    for node in nodes:
        await node.shutdown()


@pytest.mark.swarm
def test_three_identities_storing_megabytes_leave_every_reader_seeing_the_honest_record(
    dht: list[str],
) -> None:
    """The attack of C1: 3 throwaway identities store 1.5 MB each under a block key; today every reader then
    loses the key (a replica's answer exceeds p2pd's 4 MiB message)."""

    async def announce(alice: DHTNode, ttl: float) -> bool:  # as `peer.announce` does: on itself too
        record = record_to_dht(peer_record(0, 1, port=5001))
        return await alice.store(KEY, record, get_dht_time() + ttl, subkey=alice.peer_id.to_base58())

    async def scenario() -> None:
        alice = await start_dht_node(initial_peers=dht)
        server_reader = await start_dht_node(initial_peers=dht)
        mallory = await start_dht_node(initial_peers=dht, client_mode=True)
        client_reader = await start_dht_node(initial_peers=dht, client_mode=True)
        alice_id = alice.peer_id.to_base58()
        try:
            assert await announce(alice, HONEST_TTL)
            started = time.monotonic()
            for _ in range(3):
                throwaway = Identity.load_or_create(None)
                mallory.protocol.record_validator.add_signer(throwaway)
                await _store(mallory, KEY, throwaway.peer_id, b"x" * 1_500_000, MAX_RECORD_TTL)
            attack_seconds = time.monotonic() - started
            assert await announce(alice, HONEST_TTL + 1)
            late_reader = await start_dht_node(initial_peers=dht, client_mode=True)
            try:
                for reader in (client_reader, late_reader, server_reader, alice):
                    latest = await read_records(reader, MODEL, 1)
                    assert alice_id in latest and latest[alice_id][1].address == "127.0.0.1:5001"
            finally:
                await late_reader.shutdown()
            # no replica took a megabyte: each refused it for its size
            for replica in (alice, server_reader):
                stored = replica.protocol.storage.get(KEY_ID)
                assert stored is not None and list(stored.value.data) == [alice_id]
            assert attack_seconds < 30
        finally:
            await _shutdown(client_reader, mallory, server_reader, alice)

    asyncio.run(scenario())


@pytest.mark.swarm
def test_junk_filling_a_key_does_not_evict_an_honest_refresh(dht: list[str]) -> None:
    async def scenario() -> None:
        alice = await start_dht_node(initial_peers=dht)
        mallory = await start_dht_node(initial_peers=dht)
        bob = await start_dht_node(initial_peers=dht)  # a replica, as is the `corolla dht` process
        reader = await start_dht_node(initial_peers=dht, client_mode=True)
        alice_id = alice.peer_id.to_base58()
        key, key_id = block_key(MODEL, 1), DHTID.generate(block_key(MODEL, 1))
        try:
            assert await _store(alice, key, alice_id, record_to_dht(peer_record(1, 2, port=5002)), HONEST_TTL)
            throwaways = [Identity.load_or_create(None) for _ in range(MAX_SUBKEYS_PER_KEY + 8)]
            for identity in throwaways:
                mallory.protocol.record_validator.add_signer(identity)
            junk = record_to_dht(peer_record(1, 2, 1e9, port=6666))
            await mallory.store_many(
                [key] * len(throwaways),
                [junk] * len(throwaways),
                get_dht_time() + MAX_RECORD_TTL,  # longer than alice's: they expire after hers
                subkeys=[identity.peer_id for identity in throwaways],
                exclude_self=True,
            )
            held = bob.protocol.storage.get(key_id).value
            assert len(held) == MAX_SUBKEYS_PER_KEY and alice_id in held
            refreshed = record_to_dht(peer_record(1, 2, port=5003))
            assert await _store(alice, key, alice_id, refreshed, HONEST_TTL + 5)
            latest = await read_records(reader, MODEL, 2)
            assert latest[alice_id][1].address == "127.0.0.1:5003"
            for replica in (alice, bob):  # alice's own storage holds junk only: she stores on the others
                assert len(replica.protocol.storage.get(key_id).value) == MAX_SUBKEYS_PER_KEY
        finally:
            await _shutdown(reader, bob, mallory, alice)

    asyncio.run(scenario())


async def _replica_and(*, client_mode: bool = True) -> tuple[DHTNode, DHTNode]:
    """A lone replica and a node joined to it only: whatever the second reads comes from that replica."""
    replica = await start_dht_node()
    maddrs = [str(maddr) for maddr in await replica.get_visible_maddrs()]
    return replica, await start_dht_node(initial_peers=maddrs, client_mode=client_mode)


def _plant(replica: DHTNode, record: DHTRecord, subkey: str) -> None:
    """Put an entry straight into the replica's storage, past its checks: what a misbehaving replica holds."""
    stored = replica.protocol.storage.store(
        DHTID.from_bytes(record.key), record.value, record.expiration_time, subkey=subkey
    )
    assert stored


@pytest.mark.swarm
def test_one_bad_entry_in_a_replicas_answer_does_not_hide_the_good_ones() -> None:
    async def scenario() -> None:
        replica, reader = await _replica_and()
        good = [Identity.load_or_create(None) for _ in range(3)]
        try:
            for port, identity in enumerate(good, start=5001):
                record = _signed(
                    identity, KEY, record_to_dht(peer_record(0, 1, port=port)), get_dht_time() + 60
                )
                _plant(replica, record, identity.peer_id)
            forged = _signed(ALICE, KEY, record_to_dht(peer_record(0, 1, port=6666)), get_dht_time() + 60)
            _plant(replica, forged, good[0].peer_id + "x")  # a signature that is not its subkey's
            latest = await read_records(reader, MODEL, 1)
            assert sorted(latest) == sorted(identity.peer_id for identity in good)
        finally:
            await _shutdown(reader, replica)

    asyncio.run(scenario())


@pytest.mark.swarm
def test_a_reader_a_few_seconds_behind_the_writer_still_reads_a_longest_lived_record() -> None:
    """M1: the writer's clock is 3.5 s ahead of the reader's; it wrote an entry expiring 299.5 s ahead."""

    async def scenario() -> None:
        replica, reader = await _replica_and()
        try:
            ahead = _signed(ALICE, KEY, record_to_dht(peer_record(0, 1, port=5001)), get_dht_time() + 303.0)
            _plant(replica, ahead, ALICE.peer_id)
            latest = await read_records(reader, MODEL, 1)
            assert latest[ALICE.peer_id][1].address == "127.0.0.1:5001"
            assert await read_records(reader, MODEL, 1, previous=latest) == latest
        finally:
            await _shutdown(reader, replica)

    asyncio.run(scenario())


@pytest.mark.swarm
def test_a_replica_refuses_a_value_that_is_no_peer_record_under_a_block_key() -> None:
    async def scenario() -> None:
        replica, writer = await _replica_and(client_mode=False)
        writer_id = writer.peer_id.to_base58()
        try:
            assert not await _store(writer, KEY, writer_id, {"junk": "x" * 1000}, 60.0)
            assert not await _store(writer, KEY, writer_id, {"model_id": MODEL, "num_blocks": 4}, 60.0)
            assert not await _store(writer, MODEL_INDEX_KEY, writer_id, record_to_dht(peer_record(0, 1)), 60)
            assert replica.protocol.storage.get(KEY_ID) is None
            assert await _store(writer, KEY, writer_id, record_to_dht(peer_record(0, 1)), 60.0)
            assert await _store(writer, MODEL_INDEX_KEY, writer_id, {"model_id": MODEL, "num_blocks": 4}, 60)
        finally:
            await _shutdown(writer, replica)

    asyncio.run(scenario())


@pytest.mark.swarm
def test_a_replica_limits_the_entries_each_sender_stores() -> None:
    async def scenario() -> None:
        replica, mallory = await _replica_and(client_mode=False)
        maddrs = [str(maddr) for maddr in await replica.get_visible_maddrs()]
        alice = await start_dht_node(initial_peers=maddrs)
        replica.protocol.store_limiter = StoreRateLimiter(rate=0.0, burst=10)
        throwaways = [Identity.load_or_create(None) for _ in range(20)]
        try:
            for identity in throwaways:
                mallory.protocol.record_validator.add_signer(identity)
            record = record_to_dht(peer_record(0, 1, port=6666))
            for identity in throwaways:
                await _store(mallory, KEY, identity.peer_id, record, 60.0)
            assert len(replica.protocol.storage.get(KEY_ID).value) == 10
            # another sender has its own budget
            assert await _store(alice, KEY, alice.peer_id.to_base58(), record_to_dht(peer_record(0, 1)), 60.0)
            assert len(replica.protocol.storage.get(KEY_ID).value) == 11
        finally:
            await _shutdown(alice, mallory, replica)

    asyncio.run(scenario())


@pytest.mark.swarm
def test_a_replica_cannot_end_a_readers_search_with_an_endless_expiration() -> None:
    """A replica's answer names the dictionary's expiration; an infinite one would end every latest-value
    search at that replica. The reader takes it from the entries instead."""

    async def scenario() -> None:
        replica, reader = await _replica_and()
        expiration = get_dht_time() + 60
        try:
            _plant(replica, _signed(ALICE, KEY, record_to_dht(peer_record(0, 1)), expiration), ALICE.peer_id)
            storage = replica.protocol.storage
            honest_get = storage.get
            storage.get = lambda key: (  # type: ignore[method-assign]
                None if (item := honest_get(key)) is None else ValueWithExpiration(item.value, float("inf"))
            )
            found = await reader.get(KEY, latest=True)
            assert found is not None and found.expiration_time == pytest.approx(expiration)
        finally:
            await _shutdown(reader, replica)

    asyncio.run(scenario())
