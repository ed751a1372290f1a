"""Round trips: whom a peer pings and what its record announces (`peer/pings.py`), and what a client measures
for planning (`client/latency.py`), against in-process peers."""

from __future__ import annotations

import asyncio
import time

import pytest
from records_factory import peer_record as record

from client.latency import CONNECT_ROUND_TRIPS
from client.route import plan_inference_route
from peer.pings import Pinger, next_hop_candidates
from protos.channels import ChannelPool
from protos.records import MAX_PINGS, PeerRecord, PeerState

ME = "me"

# records (besides ME's own), ME's span -> the candidates in order of preference, as groups whose inner order
# is the hash of both ids: first the peers serving the block after the span, then those starting inside it
CANDIDATE_CASES = {
    "the peers serving the next block": (
        {"A": record(4, 8), "B": record(2, 8), "C": record(8, 12), "D": record(0, 4)},
        (0, 4),
        [{"A", "B"}],
    ),
    "then the peers starting inside the span": (
        {"D": record(3, 5), "E": record(5, 6), "F": record(0, 3), "G": record(8, 9)},
        (0, 8),
        [{"G"}, {"D", "E"}],
    ),
    "a span starting with ME's is no next hop": (
        {"F": record(2, 4), "H": record(1, 3)},
        (2, 6),
        [],
    ),
    "a span around ME's serves the next block": ({"I": record(1, 7)}, (2, 6), [{"I"}]),
    "only ONLINE peers": (
        {
            "J": record(4, 8, state=PeerState.JOINING),
            "K": record(4, 8, state=PeerState.DRAINING),
            "L": record(4, 8, state=PeerState.OFFLINE),
            "M": record(4, 8),
        },
        (0, 4),
        [{"M"}],
    ),
    "not itself": ({ME: record(4, 8), "N": record(4, 8)}, (0, 4), [{"N"}]),
    "nothing after the model's last block": ({"O": record(0, 4), "P": record(2, 6)}, (4, 8), []),
}


@pytest.mark.parametrize(("records", "span", "groups"), CANDIDATE_CASES.values(), ids=CANDIDATE_CASES)
def test_next_hop_candidates(records: dict[str, PeerRecord], span: tuple[int, int], groups: list) -> None:
    chosen = next_hop_candidates(records, peer_id=ME, span=span)
    assert len(chosen) == sum(len(group) for group in groups)
    offset = 0
    for group in groups:
        assert set(chosen[offset : offset + len(group)]) == group
        offset += len(group)
    assert next_hop_candidates(dict(reversed(records.items())), peer_id=ME, span=span) == chosen


def test_next_hop_candidates_are_bounded_stable_and_spread() -> None:
    """40 replicas of the next span and 5 peers inside: 32 of the replicas, the same each round; peers with
    other ids choose other subsets (so no replica is left unmeasured by all)."""
    records = {f"next{i:02d}": record(4, 8) for i in range(40)}
    records |= {f"inside{i}": record(2, 3) for i in range(5)}
    chosen = next_hop_candidates(records, peer_id=ME, span=(0, 4))
    assert len(chosen) == MAX_PINGS and all(peer_id.startswith("next") for peer_id in chosen)
    assert next_hop_candidates(records, peer_id=ME, span=(0, 4)) == chosen
    others = {
        peer_id for i in range(10) for peer_id in next_hop_candidates(records, peer_id=f"o{i}", span=(0, 4))
    }
    assert others == {f"next{i:02d}" for i in range(40)}
    assert len(next_hop_candidates(records, peer_id=ME, span=(0, 4), limit=50)) == 45
    assert next_hop_candidates(records, peer_id=ME, span=(0, 4), limit=0) == []


def test_ping_round_measures_the_next_hops_of_in_process_peers(fake_swarm) -> None:
    """Peer (0, 1) pings the (1, 3) peers, not (3, 4); a frozen peer, a killed one and a record naming another
    peer's address are left out; the round takes about one call timeout at most."""
    swarm = fake_swarm([(0, 1), (1, 3), (1, 3), (1, 3), (1, 3), (1, 3), (3, 4)])
    first, near, frozen, killed, impostor, answering, last = swarm.peers
    frozen.freeze()
    killed.kill()
    impostor.announce_as(address=near.address)  # who answers there is `near`

    async def read_records() -> dict[str, PeerRecord]:
        return swarm.view().peers()

    pinger = Pinger(
        peer_id=first.peer_id,
        span=lambda: (0, 1),
        read_records=read_records,
        channels=first.service.channels,
        period=30.0,
        timeout=0.5,
    )
    started = time.monotonic()
    pings = swarm.call(pinger.ping_round())
    frozen.thaw()
    assert time.monotonic() - started < 3.0
    assert set(pings) == {near.peer_id, answering.peer_id} and pinger.pings == pings
    assert all(0 < seconds < 0.5 for seconds in pings.values())
    assert last.peer_id not in pings
    # what the record announces passes every reader's checks
    assert PeerRecord.model_validate(first.make_record().model_dump() | {"pings": pings}).pings == pings


def test_the_peer_record_announces_the_last_round(checkpoint) -> None:
    """`Peer.make_record` carries its pinger's round trips (none before the peer is ONLINE and pinging)."""
    from peer.config import PeerConfig
    from peer.main import Peer

    async def no_records() -> dict[str, PeerRecord]:
        return {}

    async def run() -> tuple[dict[str, float], dict[str, float]]:
        peer = Peer(PeerConfig(model=str(checkpoint("llama")), insecure=True, device="cpu", blocks="0:1"))
        try:
            peer.address = "127.0.0.1:1"
            before = peer.make_record(PeerState.ONLINE, (0, 1)).pings
            pool = ChannelPool(max_message_bytes=1 << 20, insecure=True)
            peer.pinger = Pinger(
                peer_id=ME, span=lambda: (0, 1), read_records=no_records, channels=pool, period=1.0
            )
            peer.pinger.pings = {"next": 0.012}
            return before, peer.make_record(PeerState.ONLINE, (0, 1)).pings
        finally:
            peer.scheduler.shutdown()
            peer.metrics.close()

    assert asyncio.run(run()) == ({}, {"next": 0.012})


def test_ping_task_survives_failed_rounds_and_stops_on_cancel() -> None:
    reads = 0

    async def read_records() -> dict[str, PeerRecord]:
        nonlocal reads
        reads += 1
        raise OSError("the DHT is unreachable")

    async def run() -> None:
        pool = ChannelPool(max_message_bytes=1 << 20, insecure=True)
        pinger = Pinger(
            peer_id=ME, span=lambda: (0, 1), read_records=read_records, channels=pool, period=0.01
        )
        pinger.pings = {"kept": 0.01}
        task = asyncio.create_task(pinger.run_forever())
        await asyncio.sleep(0.1)
        assert not task.done()  # a failed round never ends the task
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert task.cancelled() and pinger.pings == {"kept": 0.01}  # a failed round keeps the last pings
        await pool.close()

    asyncio.run(run())
    assert reads >= 3


# ---- the client's own round trips ------------------------------------------------------------------------


def test_client_measures_round_trips_and_waits_only_for_peers_it_never_called(
    fake_swarm, connect, monkeypatch
) -> None:
    """The first plan's measurement waits for the peers' answers (a frozen one for at most `wait` after its
    call began); later ones wait for nothing they called before, and a peer is called again only after
    `RTT_PERIOD`."""
    swarm = fake_swarm([(0, 1), (1, 3), (1, 3), (3, 4)])
    frozen = swarm.peers[2]
    frozen.freeze()
    connection = connect(swarm)
    latency = connection.latency
    records = swarm.view().peers()

    started = time.monotonic()
    connection.runtime.run(latency.measure(records, wait=0.5), timeout=10)
    assert 0.4 < time.monotonic() - started < 3.0  # held up by the frozen peer, for `wait` only
    answering = {peer.peer_id for peer in swarm.peers if peer is not frozen}
    assert set(connection.stats.rtts()) == answering
    assert all(0 < seconds < 0.5 for seconds in latency.rtts().values())
    assert connection.stats.rtt_samples == dict.fromkeys(answering, 1)
    # the frozen peer's first call has not answered: it counts as at least a third of the time it has taken
    assert latency.rtts()[frozen.peer_id] >= 0.4 / CONNECT_ROUND_TRIPS

    started = time.monotonic()
    connection.runtime.run(latency.measure(records, wait=0.5), timeout=10)
    assert time.monotonic() - started < 0.3  # the frozen peer's call is still under way, past its wait
    assert connection.stats.rtt_samples == dict.fromkeys(answering, 1)  # nothing is called again so soon

    # stale at once: measured again, in the background; the thawed peer answers its call still under way
    # (or, if that timed out, the next one)
    monkeypatch.setattr("client.latency.RTT_PERIOD", 0.0)
    frozen.thaw()
    connection.runtime.run(latency.measure(records, wait=0.5), timeout=10)
    expected = dict.fromkeys(answering, 2) | {frozen.peer_id: 1}
    deadline = time.monotonic() + 10
    while connection.stats.rtt_samples != expected and time.monotonic() < deadline:
        time.sleep(0.01)
    assert connection.stats.rtt_samples == expected


def test_a_session_plans_with_the_round_trips_it_measured(fake_swarm, connect) -> None:
    """The far replica of [1, 3) computes a little faster (0.9 ms a step); the client measures its round trip
    at 200 ms (as if): the session's route takes the near one, where without round trips the far one wins."""
    swarm = fake_swarm([])
    swarm.add(0, 1, throughput=1000.0)
    near = swarm.add(1, 3, throughput=100.0)
    far = swarm.add(1, 3, throughput=110.0)
    swarm.add(3, 4, throughput=1000.0)
    connection = connect(swarm)
    session = connection.new_session(max_length=8)

    def plan() -> list[str]:
        route = connection.runtime.run(session._plan(0, None, frozenset(), refresh=False), timeout=10)
        return [hop.peer_id for hop in route]

    plan()  # measures every peer
    assert set(connection.stats.rtts()) == {peer.peer_id for peer in swarm.peers}
    for _ in range(20):  # the moving average forgets the loopback measurement
        connection.stats.observe_rtt(far.peer_id, 0.2)
    assert plan()[1] == near.peer_id
    unmeasured = plan_inference_route(swarm.view(), median_cap=True)
    assert unmeasured[1].peer_id == far.peer_id
