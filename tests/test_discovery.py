"""Discovery: the ban list's backoff, the in-memory fake, and `DhtDiscovery` and `corolla health` against
a real `corolla dht` process holding hand-written records (valid, invalid and misplaced)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from hivemind.dht.node import DHTNode
from hivemind.utils.timed_storage import get_dht_time
from pydantic import ValidationError
from records_factory import peer_record
from swarm import Process, start_dht

from client.config import ClientConfig
from client.discovery import BanList, DhtDiscovery, InMemoryDiscovery, SwarmView
from client.errors import SwarmError, short_id
from client.health import health_main
from protos.dht import start_dht_node
from protos.errors import InvalidInputError
from protos.identity import Identity
from protos.records import MODEL_INDEX_KEY, PeerRecord, PeerState, block_key, record_to_dht

ONLINE, DRAINING, OFFLINE = PeerState.ONLINE, PeerState.DRAINING, PeerState.OFFLINE


def record(start: int, end: int, state: PeerState = ONLINE, *, port: int = 5000) -> PeerRecord:
    """12.5 steps/s and named after its port: what the health report shows."""
    return peer_record(start, end, 12.5, state, port=port, public_name=f"peer-{port}")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_ban_list_backoff_cap_and_reset(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    bans = BanList(15.0, 2.0, 100.0, clock=clock)
    with caplog.at_level(logging.WARNING, logger="client.discovery"):
        assert bans.ban("QmA", "UNAVAILABLE") == 15.0
    assert "peer=QmA" in caplog.text and "reason=UNAVAILABLE" in caplog.text
    assert bans.is_banned("QmA") and not bans.is_banned("QmB")
    clock.now += 14.9
    assert bans.banned() == {"QmA"}
    clock.now += 0.1
    assert not bans.is_banned("QmA") and bans.banned() == set()

    assert [bans.ban("QmA", "again") for _ in range(4)] == [30.0, 60.0, 100.0, 100.0]
    clock.now += 99.9
    assert bans.is_banned("QmA")
    bans.unban("QmA")  # a success: the ban lifts and the backoff starts over
    assert not bans.is_banned("QmA")
    assert bans.ban("QmA", "once more") == 15.0
    bans.unban("QmNeverBanned")


@pytest.mark.parametrize(
    "arguments", [(0.0, 2.0, 10.0), (5.0, 0.5, 10.0), (5.0, 2.0, 1.0)], ids=["zero", "shrinking", "cap"]
)
def test_ban_list_rejects_bad_policy(arguments: tuple[float, float, float]) -> None:
    with pytest.raises(InvalidInputError):
        BanList(*arguments)


@pytest.mark.parametrize(
    "fields",
    [
        {"min_hop_timeout": 0},
        {"connect_timeout": float("inf")},
        {"max_retries": -1},
        {"ban_backoff": 0.5},
        {"ban_timeout": 60.0, "max_ban_timeout": 30.0},
        {"initial_peers": ["127.0.0.1:31337"]},
        {"model_id": "has space"},
        {"wire_dtype": "int4"},
        {"unknown": 1},
    ],
)
def test_client_config_rejects(fields: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        ClientConfig(**fields)


def test_client_config_defaults_are_finite() -> None:
    config = ClientConfig(initial_peers=["/ip4/127.0.0.1/tcp/31337/p2p/QmA"])
    assert config.max_retries == 5 and config.max_ban_timeout == 300.0 and config.wire_dtype is None


def test_swarm_view_places_each_peer_in_its_span() -> None:
    view = SwarmView.from_records(
        6, {"QmB": record(2, 6), "QmA": record(0, 3), "QmC": record(1, 2, DRAINING)}, fetched_at=5.0
    )
    assert [sorted(block) for block in view.blocks] == [
        ["QmA"],
        ["QmA", "QmC"],
        ["QmA", "QmB"],
        ["QmB"],
        ["QmB"],
        ["QmB"],
    ]
    assert list(view.peers()) == ["QmA", "QmB", "QmC"]
    assert view.coverage() == [1, 1, 2, 1, 1, 1]
    assert view.fetched_at == 5.0
    with pytest.raises(InvalidInputError, match="QmA announces blocks"):
        SwarmView.from_records(2, {"QmA": record(0, 3)})
    with pytest.raises(InvalidInputError):
        SwarmView(3, ({}, {}), 0.0)


def test_in_memory_discovery() -> None:
    async def scenario() -> None:
        discovery = InMemoryDiscovery()
        with pytest.raises(SwarmError):
            await discovery.view()
        first = SwarmView.from_records(2, {"QmA": record(0, 2)})
        discovery.set(first)
        assert await discovery.view() is first
        second = SwarmView.from_records(2, {"QmB": record(0, 2)})
        discovery.set(second)
        assert await discovery.view(refresh=True) is second
        assert discovery.num_refreshes == 1
        await discovery.close()
        assert discovery.closed

    asyncio.run(scenario())


# each written peer has its own key: a DHT node stores only entries signed by their subkey's key
IDENTITIES = [Identity.load_or_create(None) for _ in range(6)]
GOOD, SECOND, DRAINER, INVALID, MISPLACED, LATE = (identity.peer_id for identity in IDENTITIES)
TTL = 250.0  # seconds: records may not live longer than MAX_RECORD_TTL
MODEL, GAPPY, LONELY = "tiny-model", "gappy-model", "lonely-model"


async def _store(node: DHTNode, entries: list[tuple[str, str, Any, float]]) -> None:
    """(key, subkey, value, seconds to live); stored on the bootstrap node, not on `node` itself."""
    now = get_dht_time()
    stored = await node.store_many(
        [key for key, _, _, _ in entries],
        [value for _, _, value, _ in entries],
        [now + ttl for _, _, _, ttl in entries],
        subkeys=[subkey for _, subkey, _, _ in entries],
        exclude_self=True,
    )
    assert all(stored.values()), stored


def _announce(
    model_id: str, peer_id: str, peer: PeerRecord, ttl: float = TTL
) -> list[tuple[str, str, Any, float]]:
    return [
        (block_key(model_id, block), peer_id, record_to_dht(peer), ttl)
        for block in range(peer.start, peer.end)
    ]


@pytest.fixture(scope="module")
def dht(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """A `corolla dht` process holding records of MODEL (4 blocks) and GAPPY (6 blocks, 2..3 unserved)."""
    process: Process = start_dht(tmp_path_factory.mktemp("dht"))
    try:
        asyncio.run(_write_records(process.maddrs))
        yield process.maddrs
    finally:
        assert process.stop() == 0


async def _writer(maddrs: list[str]) -> DHTNode:
    """A DHT node that signs the entries of every peer in IDENTITIES."""
    node = await start_dht_node(initial_peers=maddrs)
    for identity in IDENTITIES:
        node.protocol.record_validator.add_signer(identity)
    return node


def _index(model_id: str, peer_id: str, num_blocks: Any) -> tuple[str, str, Any, float]:
    return (MODEL_INDEX_KEY, peer_id, {"model_id": model_id, "num_blocks": num_blocks}, TTL)


async def _write_records(maddrs: list[str]) -> None:
    node = await _writer(maddrs)
    try:
        entries = [_index(MODEL, GOOD, 4), _index(MODEL, SECOND, 4), _index(MODEL, DRAINER, 5)]  # most say 4
        # an older record of GOOD from before it moved to [0, 2): the newer one wins
        entries += _announce(MODEL, GOOD, record(2, 4, port=5009), ttl=TTL - 50)
        entries += _announce(MODEL, GOOD, record(0, 2, port=5001))
        entries += _announce(MODEL, SECOND, record(2, 4, port=5002))
        entries += _announce(MODEL, DRAINER, record(1, 3, DRAINING, port=5003))
        entries.append((block_key(MODEL, 3), MISPLACED, record_to_dht(record(0, 1, port=5005)), TTL))
        entries += [_index(GAPPY, MISPLACED, 6)]  # one index entry per peer: a peer serves one model
        entries += _announce(GAPPY, GOOD, record(0, 2, port=5001))
        entries += _announce(GAPPY, SECOND, record(4, 6, port=5002))
        entries += _announce(GAPPY, DRAINER, record(2, 4, OFFLINE, port=5003))
        await _store(node, entries)
        # entries no replica takes: a subkey that is no peer id, one signed by another key, a plain value
        refused = [(block_key(MODEL, 0), "not base58!", record_to_dht(record(0, 4, port=5006)), TTL)]
        refused.append((block_key(MODEL, 2), SECOND + "x", "not a record", TTL))
        # values that do not follow their key's schema (a PeerRecord under a block key, an index entry)
        refused.append((block_key(MODEL, 1), INVALID, {"state": "online", "address": "nowhere"}, TTL))
        refused.append(_index(LONELY, LATE, "many"))
        for entry in refused:
            with pytest.raises(AssertionError):
                await _store(node, [entry])
    finally:
        await node.shutdown()


@pytest.mark.swarm  # a real `corolla dht` process
def test_dht_discovery_drops_bad_records_and_reads_the_model_index(dht: list[str]) -> None:
    async def scenario() -> None:
        reader = await start_dht_node(initial_peers=dht, client_mode=True)
        writer = await _writer(dht)
        discovery = DhtDiscovery(reader, MODEL, refresh_period=0.2)
        try:
            view = await discovery.view()
            assert view.num_blocks == 4
            assert sorted(view.peers()) == sorted([DRAINER, GOOD, SECOND])
            assert view.peers()[GOOD] == record(0, 2, port=5001)
            assert view.peers()[DRAINER].state is DRAINING
            assert [sorted(block) for block in view.blocks] == [
                [GOOD],
                sorted([DRAINER, GOOD]),
                sorted([DRAINER, SECOND]),
                [SECOND],
            ]
            assert view.coverage() == [1, 1, 1, 1]
            assert await discovery.view() is view  # no read without refresh

            await _store(writer, _announce(MODEL, LATE, record(0, 4, port=5007)))
            assert await discovery.view() is view
            refreshed = await discovery.view(refresh=True)
            assert LATE in refreshed.peers() and refreshed.fetched_at > view.fetched_at

            await _store(writer, _announce(MODEL, LATE, record(0, 4, OFFLINE, port=5007), ttl=TTL + 20))
            discovery.start()
            for _ in range(100):  # the background task picks up the OFFLINE record within a few periods
                if (await discovery.view()).peers()[LATE].state is OFFLINE:
                    break
                await asyncio.sleep(0.1)
            assert (await discovery.view()).peers()[LATE].state is OFFLINE

            fixed = DhtDiscovery(reader, MODEL, num_blocks=2, refresh_period=1.0)
            assert list((await fixed.view()).peers()) == [GOOD]  # the other spans reach past block 1

            with pytest.raises(
                SwarmError, match="no peer announces model absent-model; check --initial-peers"
            ):
                await DhtDiscovery(reader, "absent-model", refresh_period=1.0).view()
            with pytest.raises(SwarmError, match="no peer announces model absent-model"):
                await DhtDiscovery(reader, "absent-model", num_blocks=3, refresh_period=1.0).view()
            with pytest.raises(SwarmError, match="no peer announces model lonely-model"):  # refused
                await DhtDiscovery(reader, LONELY, refresh_period=1.0).view()
        finally:
            await discovery.close()
            await writer.shutdown()
            await reader.shutdown()

    asyncio.run(scenario())


@pytest.mark.swarm  # a real `corolla dht` process
def test_health_names_missing_blocks(dht: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert health_main([f"/models/{GAPPY}", "--initial-peers", *dht], prog="corolla health") == 1
    out = capsys.readouterr().out
    assert "model gappy-model: 6 blocks, 3 peers" in out
    assert short_id(GOOD) in out and "127.0.0.1:5003" in out and "offline" in out and "peer-5002" in out
    assert (
        "blocks 0..1: 1 online peer, 12.5 steps/s\nblocks 2..3: NOT SERVED\n"
        "blocks 4..5: 1 online peer, 12.5 steps/s\nbottleneck: 0.0 steps/s at blocks 2..3"
    ) in out
    assert "missing: no peer serves blocks 2..3 (of 6)" in out

    assert health_main(["anything", "--model-id", GAPPY, "--initial-peers", *dht, "--json"], prog="h") == 1
    report = json.loads(capsys.readouterr().out)
    assert (
        report["served"] is False
        and report["missing"] == [[2, 4]]
        and report["coverage"] == [1, 1, 0, 0, 1, 1]
        and report["throughput"] == [12.5, 12.5, 0.0, 0.0, 12.5, 12.5]
        and report["bottleneck"] == {"throughput": 0.0, "blocks": [[2, 4]]}
    )
    assert [(peer["peer_id"], peer["state"]) for peer in report["peers"]] == [
        (GOOD, "online"),
        (DRAINER, "offline"),
        (SECOND, "online"),
    ]


@pytest.mark.swarm  # a real `corolla dht` process
def test_health_served_and_unknown_model(dht: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert health_main([MODEL, "--initial-peers", *dht], prog="corolla health") == 0
    assert "ok: blocks 0..3 are all served by ONLINE peers" in capsys.readouterr().out
    assert health_main(["absent-model", "--initial-peers", *dht], prog="corolla health") == 1
    assert "no peer announces model absent-model" in capsys.readouterr().err
