"""`corolla monitor` cannot be made a port scanner or a reflector (review-security-3 M4): over a DHT faked at
the node's seam (records as replicas hand them out, already signature-checked), the monitor calls only the
addresses of records whose TLS certificate binds to their peer id, at most `max_probes_per_refresh` per
read (every address in turn), and /api/swarm says "unreachable" without why. Other people's services are
TCP listeners on 127.0.0.1 that count who connects. The page answers only host names the operator chose."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi.testclient import TestClient
from hivemind.utils.timed_storage import ValueWithExpiration, get_dht_time
from records_factory import peer_record

from client.config import ClientConfig
from client.monitor import MonitorConfig, Probe, SwarmWatch, make_app, model_report
from protos.identity import Identity
from protos.records import MODEL_INDEX_KEY, PeerRecord, block_key, record_to_dht
from protos.tls import ServerTls

MODEL = "watched"
NUM_BLOCKS = 2


class FakeNode:
    """The two reads the monitor makes of a DHT node: the model index and the block keys."""

    def __init__(self, records: dict[str, PeerRecord]) -> None:
        self.records = records

    async def get(self, key: str, latest: bool = False) -> ValueWithExpiration:
        expiration = get_dht_time() + 60
        entry = ValueWithExpiration({"model_id": MODEL, "num_blocks": NUM_BLOCKS}, expiration)
        return ValueWithExpiration({"a": entry}, expiration) if key == MODEL_INDEX_KEY else None

    async def get_many(self, keys: list[str], **_: Any) -> dict[str, ValueWithExpiration]:
        expiration = get_dht_time() + 60
        found = {}
        for block in range(NUM_BLOCKS):
            entries = {
                peer_id: ValueWithExpiration(record_to_dht(record), expiration)
                for peer_id, record in self.records.items()
                if record.start <= block < record.end
            }
            found[block_key(MODEL, block)] = ValueWithExpiration(entries, expiration)
        return found


class Listener:
    """Someone else's service on 127.0.0.1: accepts, counts and closes connections."""

    def __init__(self) -> None:
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            writer.close()

        self.server = await asyncio.start_server(accept, "127.0.0.1", 0)
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


def identity() -> Identity:
    return Identity(Ed25519PrivateKey.generate(), Path("unused.key"))


def record(address: str, *, certificate: bytes | None) -> PeerRecord:
    port = int(address.rsplit(":", 1)[1])
    text = certificate.decode() if certificate is not None else None
    return peer_record(0, NUM_BLOCKS, port=port, certificate=text)


def watch(records: dict[str, PeerRecord], **config: Any) -> SwarmWatch:
    options = {"probe_timeout": 0.5, **config}
    return SwarmWatch(FakeNode(records), MonitorConfig(**options), ClientConfig())  # type: ignore[arg-type]


async def _refreshes(watcher: SwarmWatch, count: int) -> None:
    try:
        for _ in range(count):
            await watcher.refresh()
        await asyncio.sleep(0.1)  # connections in flight reach the listeners
    finally:
        await watcher.close()


def test_only_addresses_whose_certificate_binds_are_called() -> None:
    async def scenario() -> tuple[list[str], list[int], dict[str, Any]]:
        listeners = [Listener() for _ in range(3)]
        addresses = [await each.start() for each in listeners]
        honest, liar, plaintext = identity(), identity(), identity()
        records = {
            honest.peer_id: record(addresses[0], certificate=ServerTls.create(honest).certificate),
            # a certificate of someone else's identity: no TLS client would trust it for this peer id
            liar.peer_id: record(addresses[1], certificate=ServerTls.create(honest).certificate),
            plaintext.peer_id: record(addresses[2], certificate=None),
        }
        watcher = watch(records)
        await _refreshes(watcher, 2)
        for each in listeners:
            each.close()
        return addresses, [each.connections for each in listeners], watcher.snapshot

    addresses, connections, snapshot = asyncio.run(scenario())
    assert connections[0] >= 1 and connections[1:] == [0, 0]
    [model] = snapshot["models"]
    peers = {peer["address"]: peer for peer in model["peers"]}
    called, liar, plaintext = (peers[address] for address in addresses)
    assert (called["reachable"], called["verified"], called["serving"]) == (False, True, False)
    for unverified in (liar, plaintext):
        assert (unverified["reachable"], unverified["verified"], unverified["serving"]) == (
            None,
            False,
            False,
        )
    assert model["coverage"] == [0, 0]  # nobody a client could use
    assert "probe_error" not in called and "UNAVAILABLE" not in json.dumps(snapshot)


def test_plaintext_peers_are_called_only_when_asked() -> None:
    async def scenario() -> int:
        listener = Listener()
        address = await listener.start()
        plaintext = identity()
        watcher = watch({plaintext.peer_id: record(address, certificate=None)}, probe_plaintext=True)
        await _refreshes(watcher, 1)
        listener.close()
        return listener.connections

    assert asyncio.run(scenario()) >= 1


def test_probes_per_refresh_are_bounded_and_every_address_gets_its_turn() -> None:
    async def scenario() -> list[set[int]]:
        listeners = [Listener() for _ in range(8)]
        addresses = [await each.start() for each in listeners]
        records = {}
        for address in addresses:
            peer = identity()
            records[peer.peer_id] = record(address, certificate=ServerTls.create(peer).certificate)
        # a probe ends when the listener has accepted and closed its connection: with time enough to connect
        # on a loaded machine (0.5 s was not always), every probed address is counted by the next look
        watcher = watch(records, max_probes_per_refresh=3, probe_timeout=10.0)
        touched = []
        try:
            for _ in range(3):
                await watcher.refresh()
                await asyncio.sleep(0.1)
                touched.append({i for i, each in enumerate(listeners) if each.connections})
        finally:
            await watcher.close()
            for each in listeners:
                each.close()
        return touched

    touched = asyncio.run(scenario())
    assert [len(each) for each in touched] == [3, 6, 8]


def test_the_page_says_unreachable_and_never_why() -> None:
    records = {"a": peer_record(0, 2), "b": peer_record(0, 2, port=1001)}
    probes = {"a": Probe(error="UNAVAILABLE"), "b": Probe(error="SSLError: connection refused")}
    report = model_report(MODEL, 2, records, probes)
    text = json.dumps(report)
    assert "UNAVAILABLE" not in text and "refused" not in text and "SSLError" not in text
    assert [peer["reachable"] for peer in report["peers"]] == [False, False]


@pytest.mark.parametrize(
    ("host", "status"),
    [("127.0.0.1:8080", 200), ("localhost", 200), ("swarm.lan", 200), ("evil.example", 400), ("", 400)],
)
def test_the_page_answers_only_host_names_the_operator_chose(host: str, status: int) -> None:
    watcher = watch({}, allowed_hosts=["swarm.lan"])
    client = TestClient(make_app(watcher), base_url="http://127.0.0.1")
    assert client.get("/api/swarm", headers={"host": host}).status_code == status
    assert client.get("/", headers={"host": host}).status_code == status
