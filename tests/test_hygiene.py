"""Crash hygiene of the peer's files and shutdown: the throughput cache rejects non-finite values and is
written atomically, and a failing final announcement does not stop the rest of a shutdown."""

from __future__ import annotations

import asyncio
import json
import math

import pytest

from peer import throughput
from peer.announce import Announcer
from peer.blocks import HostedSpan
from peer.config import DhtConfig, PeerConfig
from protos.records import PeerState

KEY = "llama|float32|test"


@pytest.mark.parametrize("bad", ["Infinity", "-Infinity", "NaN"])
def test_a_non_finite_cached_throughput_is_measured_again(checkpoint, tmp_path, bad: str) -> None:
    path = tmp_path / throughput.CACHE_FILE
    path.write_text(f'{{"{KEY}": {{"decode_rps": {bad}, "forward_tps": 1.0}}}}')
    span = HostedSpan.load(checkpoint("llama"), 0, 1)
    measured = throughput.resolve("auto", span, key=KEY, cache_dir=tmp_path)
    assert math.isfinite(measured.decode_rps) and measured.decode_rps > 0
    assert (
        json.loads(path.read_text())[KEY]["decode_rps"] == measured.decode_rps
    )  # replaced by the measurement
    assert throughput.resolve("auto", span, key=KEY, cache_dir=tmp_path) == measured  # and reused


def test_a_failed_write_keeps_the_old_cache_and_leaves_no_temp_file(tmp_path) -> None:
    path = tmp_path / throughput.CACHE_FILE
    throughput._write(path, KEY, throughput.Throughput(10.0, 5.0))
    before = path.read_text()
    throughput._write(path, "other", throughput.Throughput(math.inf, 0.0))  # refused by the JSON encoder
    assert path.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [throughput.CACHE_FILE]


def test_a_failing_final_announce_does_not_raise() -> None:
    class Node:  # the announcer's view of a DHT node
        peer_id = type("PeerId", (), {"to_base58": lambda self: "peer"})()

    def make_record(state: PeerState, span: tuple[int, int]):
        raise ValueError("throughput must be finite")  # e.g. a record that no longer validates

    announcer = Announcer(
        Node(), model_id="llama", num_blocks=4, span=(0, 1), make_record=make_record, period=1
    )
    asyncio.run(announcer.stop(final_state=PeerState.OFFLINE))  # logs a warning, raises nothing


def test_serving_other_machines_and_upnp_are_explicit() -> None:
    config = PeerConfig(model="m", blocks="0:1")
    assert (config.host, config.nat_port_map, config.announce_host) == ("127.0.0.1", False, "127.0.0.1")
    public = PeerConfig(model="m", blocks="0:1", host="0.0.0.0", announce_host="10.0.0.2")
    assert public.nat_port_map is False
    assert (DhtConfig().host, DhtConfig().nat_port_map) == ("127.0.0.1", False)
