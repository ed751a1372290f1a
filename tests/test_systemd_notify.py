"""systemd's `Type=notify`: a peer and a DHT node say READY once they serve and STOPPING when they drain
(sd_notify(3), one datagram each to $NOTIFY_SOCKET), as deploy/corolla-peer.service expects."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from swarm import ENV

from client import local_swarm
from protos.health import notify_systemd

REPO = Path(__file__).resolve().parent.parent
RECEIVE_TIMEOUT = 60.0  # seconds for a process to start serving (or stop) and say so


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    """What systemd listens on: a datagram socket, and the $NOTIFY_SOCKET naming it."""
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(RECEIVE_TIMEOUT)
        yield str(path), sock


def _fields(sock: socket.socket) -> dict[str, str]:
    message = sock.recv(4096).decode()
    return dict(line.split("=", 1) for line in message.splitlines())


def test_notify_sends_one_datagram(listener, monkeypatch: pytest.MonkeyPatch) -> None:
    address, sock = listener
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    assert notify_systemd(READY="1", STATUS="serving")
    assert _fields(sock) == {"READY": "1", "STATUS": "serving"}


def test_notify_reaches_the_abstract_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"corolla-test-{id(monkeypatch)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify_systemd(STOPPING="1")
        assert _fields(sock) == {"STOPPING": "1"}


def test_notify_outside_systemd_does_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not notify_systemd(READY="1")
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert not notify_systemd(READY="1")
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert not notify_systemd(READY="1")  # logged, never raised: serving goes on


def test_the_unit_waits_for_the_peer_to_serve() -> None:
    unit = (REPO / "deploy" / "corolla-peer.service").read_text().splitlines()
    assert "Type=notify" in unit and "NotifyAccess=main" in unit
    assert not any(line.startswith("Type=") and line != "Type=notify" for line in unit)


@pytest.mark.swarm
def test_a_dht_and_a_peer_say_ready_then_stopping(listener, checkpoint, tmp_path: Path) -> None:
    address, sock = listener
    env = {**ENV, "NOTIFY_SOCKET": address}
    dht = local_swarm.start_dht(tmp_path, env=env)
    peer = None
    try:
        ready = _fields(sock)
        assert ready["READY"] == "1" and dht.maddrs[0] in ready["STATUS"]
        peer = local_swarm.start_peer(
            tmp_path, checkpoint("llama"), "0:4", dht.maddrs, "--model-id", "notify", env=env
        )
        ready = _fields(sock)
        assert ready == {"READY": "1", "STATUS": "serving notify blocks [0,4)"}
        assert peer.stop() == 0
        assert _fields(sock) == {"STOPPING": "1", "STATUS": "draining 0 sessions"}
    finally:
        local_swarm.stop_all([process for process in (peer, dht) if process is not None])
    assert _fields(sock) == {"STOPPING": "1"}  # the DHT node's
