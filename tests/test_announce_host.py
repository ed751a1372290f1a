"""`--announce-host` for DHT nodes: a node in a container announces the address its published port is
reached at, not the container's own (the namespaced end-to-end test is in `tests/test_wan_swarm.py`)."""

from __future__ import annotations

import logging

import pytest
from pydantic import ValidationError

from peer import main as peer_main
from peer.config import DhtConfig, PeerConfig
from protos.dht import host_maddr


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("203.0.113.7", "/ip4/203.0.113.7/tcp/31337"),
        ("2001:db8::7", "/ip6/2001:db8::7/tcp/31337"),
        ("[2001:db8::7]", "/ip6/2001:db8::7/tcp/31337"),
        ("dht.example.org", "/dns/dht.example.org/tcp/31337"),
    ],
)
def test_host_maddr_names_addresses_and_dns_names(host: str, expected: str) -> None:
    assert host_maddr(host, 31337) == expected


def test_a_dht_announces_only_with_a_fixed_port() -> None:
    with pytest.raises(ValidationError, match="--announce-host needs a fixed --port"):
        DhtConfig(host="0.0.0.0", announce_host="203.0.113.7")
    config = DhtConfig(host="0.0.0.0", port=31337, announce_host="203.0.113.7")
    assert config.announce_host == "203.0.113.7"


@pytest.mark.parametrize("host", ["unix:/tmp/x", "a b", "", "10.0.0.1:31337", "[zz::1]", "unix"])
def test_a_dht_refuses_what_is_no_host(host: str) -> None:
    with pytest.raises(ValidationError, match="announce"):
        DhtConfig(host="0.0.0.0", port=31337, announce_host=host)


@pytest.mark.parametrize("host", ["203.0.113.7", "2001:db8::7", "[2001:db8::7]", "dht.example.org", "peer-1"])
def test_a_dht_announces_addresses_and_names(host: str) -> None:
    assert DhtConfig(host="0.0.0.0", port=31337, announce_host=host).announce_host == host


def test_a_peer_announces_its_dht_node_at_announce_host_on_a_fixed_dht_port() -> None:
    config = PeerConfig(
        model="m", blocks="0:1", new_swarm=True, host="0.0.0.0", announce_host="203.0.113.8", dht_port=31338
    )
    assert peer_main.announced_dht_maddrs(config) == ["/ip4/203.0.113.8/tcp/31338"]


def test_a_peer_without_a_dht_port_announces_what_it_listens_on_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = PeerConfig(model="m", blocks="0:1", new_swarm=True, host="0.0.0.0", announce_host="203.0.113.8")
    with caplog.at_level(logging.WARNING, logger="peer.main"):
        assert peer_main.announced_dht_maddrs(config) == []
    assert "--announce-host without --dht-port" in caplog.text


def test_an_address_derived_from_host_changes_nothing() -> None:
    # --host 10.0.0.5 announces 10.0.0.5 for gRPC; its DHT node already listens (and announces) there
    config = PeerConfig(model="m", blocks="0:1", new_swarm=True, host="10.0.0.5", dht_port=31338)
    assert config.announce_host == "10.0.0.5"
    assert peer_main.announced_dht_maddrs(config) == []
