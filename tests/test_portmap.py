"""`--nat-port-map` maps the gRPC port (peer/portmap.py, NAT-PMP): the protocol against a NAT-PMP service on
loopback, and a home peer behind a real NAT whose router maps its port, so the swarm dials it directly."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from natpmp_gateway import serve
from networld import NetWorld, require_networld

from peer.portmap import PortMapError, default_gateway, map_tcp_port

GATEWAY = Path(__file__).parent / "natpmp_gateway.py"


def test_the_default_gateway_is_read_from_the_route_table(tmp_path: Path) -> None:
    table = tmp_path / "route"
    table.write_text(
        "Iface\tDestination\tGateway\tFlags\n"
        "eth0\t0002A8C0\t00000000\t0001\n"  # 192.168.2.0/24, on link
        "eth0\t00000000\t0102A8C0\t0003\n"  # default via 192.168.2.1 (little-endian hex)
    )
    assert default_gateway(table) == "192.168.2.1"
    table.write_text("Iface\tDestination\tGateway\tFlags\n")
    assert default_gateway(table) is None
    assert default_gateway(tmp_path / "missing") is None


@pytest.fixture
def service() -> Iterator[int]:
    """The port of a NAT-PMP service on 127.0.0.1 announcing 203.0.113.7."""
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    stop = threading.Event()
    thread = threading.Thread(
        target=serve, args=(udp,), kwargs={"public": "203.0.113.7", "home": "127.0.0.1", "stop": stop}
    )
    thread.start()
    yield udp.getsockname()[1]
    stop.set()
    thread.join(5)
    udp.close()


def test_a_port_is_mapped_and_the_external_address_learnt(service: int) -> None:
    mapping = map_tcp_port(8700, gateway="127.0.0.1", nat_pmp_port=service)
    assert (mapping.external_host, mapping.internal_port, mapping.external_port) == (
        "203.0.113.7",
        8700,
        8700,
    )
    assert mapping.lifetime == 3600


def test_a_refusal_and_a_router_without_nat_pmp_are_errors_not_hangs() -> None:
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    thread = threading.Thread(
        target=serve, args=(udp,), kwargs={"public": "1.2.3.4", "home": "x", "refuse": True}
    )
    thread.start()
    try:
        with pytest.raises(PortMapError, match="refused"):
            map_tcp_port(8700, gateway="127.0.0.1", nat_pmp_port=udp.getsockname()[1])
    finally:
        udp.close()
        thread.join(5)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as closed:
        closed.bind(("127.0.0.1", 0))
        free = closed.getsockname()[1]
    with pytest.raises(PortMapError):  # nothing listens: ICMP port unreachable, or no answer in ~4 s
        map_tcp_port(8700, gateway="127.0.0.1", nat_pmp_port=free)


@pytest.mark.network
@pytest.mark.swarm
def test_a_home_peer_whose_router_maps_its_port_is_dialed_directly(tmp_path: Path, checkpoint) -> None:
    # public: dht, other. home behind NAT, whose router runs NAT-PMP and forwards what it maps.
    # Every link 0 ms. Nobody could dial the home peer without the mapping; with it, everyone can.
    require_networld()
    with NetWorld(tmp_path) as world:
        dht_host, other, home = world.host("dht"), world.host("other"), world.nat_host("home")
        gateway_address = home.address.rsplit(".", 1)[0] + ".1"
        gateway = subprocess.Popen(
            ["ip", "netns", "exec", str(home.nat_namespace), sys.executable, str(GATEWAY), "--listen",
             gateway_address, "--public", home.public_address, "--home", home.address, "--nft"],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert gateway.stdout is not None and gateway.stdout.readline().strip() == "ready"
            dht = world.start_dht(dht_host)
            peer = world.start_peer(home, checkpoint("llama"), "0:4", dht.maddrs, "--nat-port-map")
            ready = peer.ready()
            assert ready is not None and ready["relay_maddrs"] == []
            host, _, port = str(ready["address"]).rpartition(":")
            assert host == home.public_address, "the router's address, as the mapping said"
            assert "reachable=True" in peer.text() and "port mapped" in peer.text()
            dial = f"import socket; socket.create_connection(({host!r}, {port}), timeout=5).close()"
            assert other.run([sys.executable, "-c", dial], capture_output=True).returncode == 0
        finally:
            gateway.kill()
            gateway.wait(10)
