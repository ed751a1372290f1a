"""The network test world (`tests/networld.py`): hosts in namespaces, a userspace WAN router that delays,
rate-limits, drops and cuts, NAT routers that let homes dial out and nobody dial in, and a clean exit.

Each test speaks TCP between namespaces with a tiny Python server (counts what it receives, replies with
the count and the peer address it saw) and client (times the connect and the reply)."""

from __future__ import annotations

import json
import select
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from networld import IP, Host, NetWorld, NetWorldError, require_networld

pytestmark = [pytest.mark.network, pytest.mark.timeout(120)]

PORT = 7000
READY_TIMEOUT = 10.0  # seconds for a server to listen (a Python start on a loaded machine)
FAIL_TIMEOUT = 1.0  # seconds a client waits for a connection that must fail

SERVER = """
import json, socket, sys, threading

def serve(conn, peer):
    with conn:
        received = 0
        while chunk := conn.recv(65536):
            received += len(chunk)
        conn.sendall(json.dumps({"bytes": received, "peer": peer[0]}).encode())

listener = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
while True:
    conn, peer = listener.accept()
    threading.Thread(target=serve, args=(conn, peer), daemon=True).start()
"""

# argv: address port rounds bytes timeout; each round connects, sends `bytes`, half-closes, reads the reply
CLIENT = """
import json, socket, sys, time

address, (port, rounds, size), timeout = sys.argv[1], map(int, sys.argv[2:5]), float(sys.argv[5])
connect_ms, reply_ms = [], []
try:
    for _ in range(rounds):
        started = time.perf_counter()
        with socket.create_connection((address, port), timeout=timeout) as conn:
            connected = time.perf_counter()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.sendall(b"x" * size)
            conn.shutdown(socket.SHUT_WR)
            reply = b""
            while chunk := conn.recv(65536):
                reply += chunk
            finished = time.perf_counter()
        connect_ms.append((connected - started) * 1000)
        reply_ms.append((finished - connected) * 1000)
except OSError as e:
    print(json.dumps({"error": f"{type(e).__name__}: {e}", "ms": (time.perf_counter() - started) * 1000}))
else:
    print(json.dumps({"connect_ms": connect_ms, "reply_ms": reply_ms, "reply": json.loads(reply)}))
"""


def _namespaces() -> set[str]:
    listed = subprocess.run([IP, "netns", "list"], capture_output=True, text=True, timeout=10, check=True)
    return {line.split()[0] for line in listed.stdout.splitlines() if line.strip()}


def _links(namespace: str | None = None) -> str:
    """`ip -o link` of the test's own namespace, or of another one."""
    where = ["-n", namespace] if namespace else []
    return subprocess.run(
        [IP, *where, "-o", "link"], capture_output=True, text=True, timeout=10, check=True
    ).stdout


@pytest.fixture
def world(tmp_path: Path) -> Iterator[NetWorld]:
    require_networld()
    with NetWorld(tmp_path) as built:
        yield built
    assert not {name for name in _namespaces() if name.startswith(built.prefix)}
    assert built.prefix not in _links()


def _serve(host: Host, *, port: int = PORT) -> subprocess.Popen[str]:
    """The counting server on host.address:port, listening (the world stops it)."""
    server = host.popen(
        [sys.executable, "-c", SERVER, host.address, str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert server.stdout is not None
    if not select.select([server.stdout], [], [], READY_TIMEOUT)[0]:
        pytest.fail(f"the server in {host.name} did not listen within {READY_TIMEOUT}s")
    line = server.stdout.readline()
    assert line.strip() == "ready", line + server.stdout.read()
    return server


def _dial(
    source: Host, address: str, *, port: int = PORT, rounds: int = 1, size: int = 1, timeout: float = 5.0
) -> dict[str, Any]:
    """Run the client in `source` against address:port; its JSON report (`error` when a round failed)."""
    argv = [sys.executable, "-c", CLIENT, address, str(port), str(rounds), str(size), str(timeout)]
    result = source.run(argv, capture_output=True, text=True, timeout=rounds * timeout + 30)
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def test_a_link_delays_each_way_by_what_it_is_asked(world: NetWorld) -> None:
    # public a and b; a dials b; the link a-b: 0 ms, then 20 ms one way (a 40 ms round trip)
    a, b = world.host("a"), world.host("b")
    _serve(b)

    direct = _dial(a, b.address, rounds=5)
    assert statistics.median(direct["connect_ms"]) < 10
    assert statistics.median(direct["reply_ms"]) < 10

    world.link(a, b, delay_ms=20)
    delayed = _dial(a, b.address, rounds=5)
    assert 38 <= statistics.median(delayed["connect_ms"]) <= 70, delayed  # SYN out, SYN-ACK back
    assert 38 <= statistics.median(delayed["reply_ms"]) <= 70, delayed  # a byte out, the count back


def test_a_rate_limit_holds_for_a_transfer(world: NetWorld) -> None:
    # public a and b; a sends 2 MiB to b over a 20 Mbit/s link with no delay: at least 0.84 s on the wire
    a, b = world.host("a"), world.host("b")
    _serve(b)
    world.link(a, b, rate_mbit=20)

    size = 2 * 1024 * 1024
    transfer = _dial(a, b.address, size=size, timeout=20)
    assert transfer["reply"]["bytes"] == size
    seconds = transfer["reply_ms"][0] / 1000
    assert size * 8 / 20e6 * 0.95 <= seconds <= 4.0, transfer
    stats = world.stats()["directions"]["a>b"]
    assert stats["bytes"] >= size


def test_a_link_losing_every_packet_carries_nothing_until_it_is_set_back(world: NetWorld) -> None:
    # public a and b; a dials b; the link a-b loses every packet, then none
    a, b = world.host("a"), world.host("b")
    _serve(b)

    world.link(a, b, loss=1.0)
    lost = _dial(a, b.address, timeout=FAIL_TIMEOUT)
    assert "timed out" in lost.get("error", ""), lost
    assert world.stats()["directions"]["a>b"]["dropped_loss"] >= 1

    world.link(a, b, loss=0.0)
    assert _dial(a, b.address)["reply"]["bytes"] == 1


def test_a_home_behind_nat_dials_out_and_nobody_dials_in(world: NetWorld) -> None:
    # home h behind its NAT router (10.77.0.x outside, 192.168.1.2 inside), public p; h dials p: the link
    # h-p (h's NAT router to p) 10 ms one way; p cannot dial h, neither its private nor its router's address
    home, public = world.nat_host("h"), world.host("p")
    assert home.address.startswith("192.168.") and home.public_address.startswith("10.77.0.")
    _serve(public)
    _serve(home)
    world.link(home, public, delay_ms=10)

    out = _dial(home, public.address, rounds=3)
    assert out["reply"]["peer"] == home.public_address  # masqueraded
    assert statistics.median(out["connect_ms"]) >= 19  # the link named after the home is its router's

    for address, error in ((home.address, "Network is unreachable"), (home.public_address, "refused")):
        started = time.monotonic()
        refused = _dial(public, address, timeout=2.0)
        assert error in refused.get("error", ""), (address, refused)
        assert time.monotonic() - started < 5.0  # a Python start, then an immediate refusal


def test_a_home_reaches_the_ports_its_router_forwards_and_no_other(world: NetWorld) -> None:
    # home h behind its NAT router, which forwards PORT (as `docker run -p PORT:PORT` publishes it), public
    # p; h listens on PORT and PORT + 1: p dials h at its router's address on PORT, not on PORT + 1; h still
    # dials out, masqueraded
    home, public = world.nat_host("h", forwards=(PORT,)), world.host("p")
    _serve(home)
    _serve(home, port=PORT + 1)
    _serve(public)

    forwarded = _dial(public, home.public_address)
    assert forwarded["reply"] == {"bytes": 1, "peer": public.address}  # to the home, not masqueraded

    refused = _dial(public, home.public_address, port=PORT + 1, timeout=2.0)
    assert "refused" in refused.get("error", ""), refused  # the router's own port: nothing listens there
    assert _dial(home, public.address)["reply"]["peer"] == home.public_address


def test_a_cut_link_drops_until_healed_while_processes_live(world: NetWorld) -> None:
    # public a, b and c; a dials b and c; every link 5 ms one way; a-b is cut, then healed
    a, b, c = world.host("a"), world.host("b"), world.host("c")
    servers = [_serve(b), _serve(c)]
    world.default_link(delay_ms=5)
    assert _dial(a, b.address)["reply"]["bytes"] == 1

    world.cut(a, b)
    cut = _dial(a, b.address, timeout=FAIL_TIMEOUT)
    assert "timed out" in cut.get("error", ""), cut
    assert _dial(a, c.address)["reply"]["bytes"] == 1
    assert all(server.poll() is None for server in servers)

    world.heal(a, b)
    healed = _dial(a, b.address)
    assert healed["reply"]["bytes"] == 1 and healed["connect_ms"][0] >= 9
    assert all(server.poll() is None for server in servers)


def test_the_world_removes_what_it_made_when_the_body_raises(tmp_path: Path) -> None:
    # public a and home h behind NAT, a process in h; the body raises: nothing of the world is left
    require_networld()
    with pytest.raises(RuntimeError, match="body failed"), NetWorld(tmp_path) as world:
        a, home = world.host("a"), world.nat_host("h")
        sleeper = world.spawn(
            home, [sys.executable, "-c", "import time; time.sleep(600)"], log=tmp_path / "s"
        )
        made = {a.namespace, home.namespace, home.nat_namespace}
        assert made <= _namespaces() and world.prefix in _links(home.nat_namespace)  # its TUN and veth
        with pytest.raises(NetWorldError, match="unknown host"):
            world.cut(a, "nobody")
        raise RuntimeError("body failed")
    assert sleeper.returncode is not None
    assert world.router is not None and world.router.returncode is not None
    assert not made & _namespaces()
    assert world.prefix not in _links()
