"""A swarm on an emulated internet (`tests/networld.py`): a peer behind NAT serving through a relay, that peer
killed mid-generation, a partition mid-generation, a route that takes the near replica over the far one, a
peer that learns the address the swarm sees it at, and a DHT node and a peer in containers that announce their
published addresses. Every generation is compared token for token with transformers' own; clients run inside
namespaces too (`tests/wan_client.py`), writing what they saw as JSON."""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from families import VOCAB
from networld import SWARM_ENV, Host, NetWorld, require_networld

from client.local_swarm import LocalProcess, ProcessHandle

pytestmark = [pytest.mark.network, pytest.mark.swarm, pytest.mark.timeout(240)]

NEW_TOKENS = 16
LINK_MS = 5.0  # one-way delay of every link a test does not set otherwise
PEER_OPTIONS = ("--throughput", "100", "--announce-period", "2")
CLIENT_TIMEOUT = 150.0  # seconds a client may take: a Python start, the DHT join, 16 tokens, a failover
PAUSE_TIMEOUT = 90.0  # seconds until a client reaches the token where the test acts
STOP_TIMEOUT = 15.0  # seconds a peer has to exit after SIGTERM at the end of its test
MAX_TOKEN_GAP = 3.0  # seconds between two tokens, a partition's failover included, with default settings
LOG_TAIL_CHARS = 3000
CONNECT = "import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5).close()"
# ports a container publishes (`docker run -p PORT:PORT`), forwarded by its host's NAT router
DHT_PORT, PEER_PORT, PEER_DHT_PORT = 31337, 31330, 31331

# argv: initial peers (JSON), a peer id. A DHT client joins through the initial peers and pings that peer's
# DHT node, which libp2p finds at the address that node announced; prints the addresses it is connected at.
PROBE_SCRIPT = """
import asyncio, json, sys

from hivemind.p2p import PeerID
from protos.dht import start_dht_node


async def main(initial_peers, peer_id):
    node = await start_dht_node(initial_peers=initial_peers, client_mode=True)
    try:
        await node.protocol.call_ping(peer_id)
        connected = [info for info in await node.p2p.list_peers() if info.peer_id == peer_id]
        print(json.dumps(sorted(str(maddr) for info in connected for maddr in info.addrs)))
    finally:
        await node.shutdown()


asyncio.run(main(json.loads(sys.argv[1]), PeerID.from_base58(sys.argv[2])))
"""


@dataclass
class Internet:
    """The module's world: every link LINK_MS one way, a public host `dht` running the bootstrap DHT node
    (which also relays for peers nobody can dial)."""

    world: NetWorld
    dht: LocalProcess


@pytest.fixture(scope="module")
def internet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Internet]:
    require_networld()
    with NetWorld(tmp_path_factory.mktemp("wan")) as world:
        world.default_link(delay_ms=LINK_MS)
        yield Internet(world, world.start_dht(world.host("dht")))


@dataclass
class Generation:
    """What a client saw (see `tests/wan_client.py`)."""

    tokens: torch.Tensor  # [1, prompt + NEW_TOKENS]
    events: list[tuple[str, int, float]]  # ("token", n, time) per put; ("resumed", n, time) after a pause
    first_route: list[tuple[str, int, int]]  # (peer_id, start, end) when the first new token came
    last_route: list[tuple[str, int, int]]
    failovers: list[dict[str, Any]]  # the session's Failover events: peer_id, reason, failed_at, replaced_at
    num_failovers: int  # failures the session handled (each retry, reconnect or replacement)
    banned: list[str]  # peers the client had banned when it finished
    rtts: dict[str, float]  # peer_id -> seconds of a round trip, as the client measured it

    def decode_gaps(self) -> list[float]:
        """Seconds from each new token (or the end of the test's pause) to the next new token."""
        times = [(kind, at) for kind, index, at in self.events if index >= 1]
        return [
            later - earlier for (_, earlier), (kind, later) in itertools.pairwise(times) if kind == "token"
        ]


@dataclass
class Wan:
    """One test's part of the world: hosts named after the test, peers under the test's own model id (no other
    test's records interfere), clients; `close` stops its processes by PID."""

    internet: Internet
    model: Path
    model_id: str
    tag: str
    log_dir: Path
    peers: list[LocalProcess] = field(default_factory=list)
    clients: list[ProcessHandle] = field(default_factory=list)

    @property
    def world(self) -> NetWorld:
        return self.internet.world

    def host(self, name: str) -> Host:
        return self.world.host(f"{self.tag}_{name}")

    def nat_host(self, name: str, *, forwards: Sequence[int] = ()) -> Host:
        return self.world.nat_host(f"{self.tag}_{name}", forwards=forwards)

    def start_peers(
        self, *peers: tuple[Host, str, Sequence[str]], initial_peers: Sequence[str] = ()
    ) -> list[LocalProcess]:
        """Peers (host, blocks, options after PEER_OPTIONS: a later option wins) started at once, serving;
        they join through `initial_peers` (default: the module's DHT)."""

        def start(host: Host, blocks: str, options: Sequence[str]) -> LocalProcess:
            process = self.world.start_peer(
                host,
                self.model,
                blocks,
                list(initial_peers or self.internet.dht.maddrs),
                "--model-id",
                self.model_id,
                *PEER_OPTIONS,
                *options,
                name=host.name,
            )
            self.peers.append(process)
            return process

        with ThreadPoolExecutor(len(peers)) as pool:
            return list(pool.map(lambda peer: start(*peer), peers))

    def generate(
        self,
        host: Host,
        prompt: torch.Tensor,
        *,
        pause_at: int | None = None,
        act: Callable[[dict[str, Any]], None] | None = None,
        initial_peers: Sequence[str] = (),
    ) -> Generation:
        """Run `tests/wan_client.py` in `host`; with `pause_at`, call `act(paused)` (paused: {token, route})
        while the client waits after that new token."""
        folder = self.log_dir / f"client-{len(self.clients)}"
        folder.mkdir(parents=True)
        args = {
            "model": str(self.model),
            "initial_peers": list(initial_peers or self.internet.dht.maddrs),
            "model_id": self.model_id,
            "prompt": prompt[0].tolist(),
            "new_tokens": NEW_TOKENS,
            "pause_at": pause_at,
            "folder": str(folder),
        }
        log = folder / "client.log"
        popen = self.world.run_module(host, "tests.wan_client", [json.dumps(args)], log=log)
        self.clients.append(popen)
        if pause_at is not None:
            assert act is not None
            act(json.loads(_wait_for(folder / "paused.json", popen, log)))
            (folder / "resume").touch()
        try:
            popen.wait(CLIENT_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the client ran over {CLIENT_TIMEOUT}s:\n{_tail(log)}")
        assert popen.returncode == 0, f"the client failed:\n{_tail(log)}"
        result = json.loads((folder / "result.json").read_text())
        return Generation(
            torch.tensor([result["tokens"]]),
            [tuple(event) for event in result["events"]],
            [tuple(hop) for hop in result["first_route"]],
            [tuple(hop) for hop in result["last_route"]],
            result["failovers"],
            result["num_failovers"],
            result["banned"],
            result["rtts"],
        )

    def close(self) -> None:
        for popen in self.clients:
            if popen.poll() is None:
                popen.kill()
                popen.wait(10)
        if self.peers:  # at once: each takes seconds to leave the DHT
            with ThreadPoolExecutor(len(self.peers)) as pool:
                list(pool.map(lambda peer: peer.stop(timeout=STOP_TIMEOUT), self.peers))


_tags = itertools.count()


@pytest.fixture
def wan(internet: Internet, checkpoint, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Wan]:
    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())
    built = Wan(internet, checkpoint("llama"), f"wan-{name}"[:60], f"t{next(_tags)}", tmp_path)
    try:
        yield built
    finally:
        built.close()


def _wait_for(path: Path, popen: ProcessHandle, log: Path) -> str:
    deadline = time.monotonic() + PAUSE_TIMEOUT
    while not path.exists():
        if popen.poll() is not None:
            pytest.fail(f"the client exited with {popen.returncode} before pausing:\n{_tail(log)}")
        if time.monotonic() > deadline:
            pytest.fail(f"the client did not pause within {PAUSE_TIMEOUT}s:\n{_tail(log)}")
        time.sleep(0.02)
    return path.read_text()


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-LOG_TAIL_CHARS:]


def _prompt(seed: int, length: int = 10) -> torch.Tensor:
    return torch.randint(3, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


def _local(local: Any, prompt: torch.Tensor) -> torch.Tensor:
    options = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    return local.generate(prompt, attention_mask=torch.ones_like(prompt), **options)


def _route(*hops: tuple[LocalProcess, int, int]) -> list[tuple[str, int, int]]:
    return [(peer.peer_id, start, end) for peer, start, end in hops]


def test_a_home_peer_behind_nat_serves_through_a_relay(wan: Wan, local) -> None:
    # public: dht (bootstrap, relay), peer a, client c; home h behind NAT: it dials out, nobody dials it.
    # a serves [0, 2), h serves [2, 4) announcing its private address; a pushes to h and c hears from h only
    # through the relay on dht. Every link 5 ms one way (h's are its NAT router's).
    a, home, c = wan.host("a"), wan.nat_host("h"), wan.host("c")
    public, relayed = wan.start_peers((a, "0:2", ()), (home, "2:4", ()))
    relay_maddrs = (relayed.ready() or {}).get("relay_maddrs")
    prompt = _prompt(seed=0)

    run = wan.generate(c, prompt)

    assert torch.equal(run.tokens, _local(local, prompt))
    assert run.first_route == run.last_route == _route((public, 0, 2), (relayed, 2, 4))
    assert not run.failovers
    assert relayed.address.startswith(f"{home.address}:")
    assert relay_maddrs and all("/p2p-circuit" in maddr for maddr in relay_maddrs), relay_maddrs
    dht_peer_id = wan.internet.dht.maddrs[0].rsplit("/p2p/", 1)[1]
    assert any(dht_peer_id in maddr for maddr in relay_maddrs), relay_maddrs
    text = relayed.text()
    assert "reachable=False" in text and "serving through relays" in text
    assert not (public.ready() or {}).get("relay_maddrs")


def test_a_relayed_peer_killed_mid_generation_fails_over_exactly(wan: Wan, local) -> None:
    # public: dht (bootstrap, relay), replica r, client c; home h behind NAT, listening on 0.0.0.0 (it learns
    # its router's address from the swarm, which cannot dial it there: it serves through the relay on dht).
    # Every link 5 ms one way. h serves [0, 4) alone when the route opens; after the 5th new token r starts
    # serving [0, 4) (public, dialed directly), then h is SIGKILLed.
    r, home, c = wan.host("r"), wan.nat_host("h"), wan.host("c")
    [relayed] = wan.start_peers((home, "0:4", ("--host", "0.0.0.0")))
    assert (relayed.ready() or {}).get("relay_maddrs")
    assert f"announce host learnt host={home.public_address} source=swarm" in relayed.text()
    prompt = _prompt(seed=1)
    replicas: list[LocalProcess] = []

    def kill(at: dict[str, Any]) -> None:
        assert [tuple(hop) for hop in at["route"]] == _route((relayed, 0, 4))
        replicas.extend(wan.start_peers((r, "0:4", ())))
        relayed.popen.send_signal(signal.SIGKILL)
        relayed.popen.wait(10)

    run = wan.generate(c, prompt, pause_at=5, act=kill)

    [replica] = replicas
    assert torch.equal(run.tokens, _local(local, prompt))
    assert run.last_route == _route((replica, 0, 4))
    assert relayed.peer_id in run.banned and run.num_failovers >= 1
    assert [failover["peer_id"] for failover in run.failovers] == [relayed.peer_id]
    assert relayed.popen.returncode == -signal.SIGKILL


def test_a_partitioned_peer_is_replaced_within_seconds(wan: Wan, local) -> None:
    # public: dht, peers p and q (both [0, 4)), client c; every link 5 ms one way. After the 5th new token
    # the route's peer is cut off from c, from the other peer and from dht (it keeps running: no RST, no
    # FIN, packets vanish). The client runs with default settings: the next token comes within
    # MAX_TOKEN_GAP (min_hop_timeout, then ping_timeout, then the replay on the other peer).
    p, q, c = wan.host("p"), wan.host("q"), wan.host("c")
    peers = wan.start_peers((p, "0:4", ()), (q, "0:4", ()))
    hosts = {peer.peer_id: host for peer, host in zip(peers, (p, q), strict=True)}
    prompt = _prompt(seed=2)
    cut: list[LocalProcess] = []

    def partition(at: dict[str, Any]) -> None:
        [(peer_id, _, _)] = at["route"]
        cut.append(next(peer for peer in peers if peer.peer_id == peer_id))
        others: list[Host | str] = [c, "dht", *[host for other, host in hosts.items() if other != peer_id]]
        for other in others:
            wan.world.cut(hosts[peer_id], other)

    run = wan.generate(c, prompt, pause_at=5, act=partition)

    [isolated] = cut
    [other] = [peer for peer in peers if peer is not isolated]
    assert torch.equal(run.tokens, _local(local, prompt))
    assert isolated.popen.poll() is None  # alive, only unreachable
    assert [failover["peer_id"] for failover in run.failovers] == [isolated.peer_id]
    assert run.last_route == _route((other, 0, 4))
    gaps = run.decode_gaps()
    assert len(gaps) == NEW_TOKENS - 1
    assert max(gaps) < MAX_TOKEN_GAP, (gaps, run.failovers)


def test_a_route_takes_the_near_replica(wan: Wan, local) -> None:
    # public: dht, peers near n and far f (both [0, 4)), client c; one-way delay c-n 5 ms, c-f 80 ms, every
    # other link 5 ms. f announces a little more throughput (110 vs 100 steps/s per block): a planner blind
    # to latency takes f, so only the client's own round trips can make it choose n.
    n, f, c = wan.host("n"), wan.host("f"), wan.host("c")
    wan.world.link(c, f, delay_ms=80)
    near, far = wan.start_peers((n, "0:4", ()), (f, "0:4", ("--throughput", "110")))
    prompt = _prompt(seed=3)

    run = wan.generate(c, prompt)

    assert torch.equal(run.tokens, _local(local, prompt))
    assert run.first_route == _route((near, 0, 4)), (far.peer_id, run.rtts)


def test_a_peer_on_every_interface_announces_its_wan_address(wan: Wan, local) -> None:
    # public: dht, peer p listening on 0.0.0.0 without --announce-host, client c; every link 5 ms one way.
    # p learns 10.77.0.N (its WAN address, as dht sees it); c dials it there directly (no relay).
    p, c = wan.host("p"), wan.host("c")
    [peer] = wan.start_peers((p, "0:4", ("--host", "0.0.0.0")))
    ready = peer.ready() or {}
    host, _, port = ready["address"].rpartition(":")
    assert host == p.address and int(port) > 0
    assert not ready["relay_maddrs"]
    text = peer.text()
    assert f"announce host learnt host={p.address} source=swarm" in text
    assert f"reachability address={p.address}:{port}" in text and "reachable=True" in text
    dialed = c.run([sys.executable, "-c", CONNECT, host, port], capture_output=True, text=True)
    assert dialed.returncode == 0, dialed.stderr
    prompt = _prompt(seed=4)

    run = wan.generate(c, prompt)

    assert torch.equal(run.tokens, _local(local, prompt))
    assert run.first_route == _route((peer, 0, 4))


def test_a_relayed_session_moves_more_than_one_relay_circuit_carries(wan: Wan, local) -> None:
    # public: dht (bootstrap, relay), client c; home h behind NAT serves [0, 4) through the relay on dht.
    # Every link 5 ms one way. hivemind's relays reset each circuit after 128 KiB each way; a 480-token
    # prompt's hidden states (480 x 64 x 4 bytes to h, as much back) need more: the relayed connection
    # resumes on new circuits (protos/resumable.py), with no failover, and the output does not change.
    home, c = wan.nat_host("h"), wan.host("c")
    [relayed] = wan.start_peers((home, "0:4", ()))
    assert (relayed.ready() or {}).get("relay_maddrs")
    before = _relayed_bytes(wan.world, home)
    prompt = _prompt(seed=5, length=480)

    run = wan.generate(c, prompt)

    assert torch.equal(run.tokens, _local(local, prompt))
    assert run.first_route == run.last_route == _route((relayed, 0, 4))
    assert not run.failovers and run.num_failovers == 0
    assert _relayed_bytes(wan.world, home) - before > 2 * 128 * 1024  # more than two circuits' worth


def _relayed_bytes(world: NetWorld, home: Host) -> int:
    """Bytes the router moved between dht (the relay) and `home`'s router, both ways."""
    directions = world.stats()["directions"]
    keys = (f"dht>{home.name}", f"{home.name}>dht")
    return sum(int(directions.get(key, {}).get("bytes", 0)) for key in keys)


def test_a_dht_and_a_peer_in_containers_announce_their_published_addresses(wan: Wan, local) -> None:
    # containers d and e: home hosts whose NAT routers forward their published ports (d: DHT_PORT; e:
    # PEER_PORT for gRPC, PEER_DHT_PORT for its DHT node), public client c; every link 5 ms one way. d runs
    # `corolla dht` on 0.0.0.0 announcing its router's address; e serves [0, 4) on 0.0.0.0 announcing its
    # router's address, joining through d only; c joins through d and dials e directly at its published ports.
    d = wan.nat_host("d", forwards=(DHT_PORT,))
    e = wan.nat_host("e", forwards=(PEER_PORT, PEER_DHT_PORT))
    c = wan.host("c")
    dht = wan.world.start_dht(
        d, "--host", "0.0.0.0", "--port", str(DHT_PORT), "--announce-host", d.public_address
    )
    wan.peers.append(dht)  # stopped with the peers
    assert dht.maddrs and all(
        maddr.startswith(f"/ip4/{d.public_address}/tcp/{DHT_PORT}/p2p/") for maddr in dht.maddrs
    ), dht.maddrs
    published = (
        *("--host", "0.0.0.0", "--port", str(PEER_PORT), "--dht-port", str(PEER_DHT_PORT)),
        *("--announce-host", e.public_address),
    )
    [peer] = wan.start_peers((e, "0:4", published), initial_peers=dht.maddrs)
    assert peer.address == f"{e.public_address}:{PEER_PORT}"
    assert not (peer.ready() or {}).get("relay_maddrs")
    assert "reachable=True" in peer.text(), peer.text()[-LOG_TAIL_CHARS:]
    probe = c.run(
        [sys.executable, "-c", PROBE_SCRIPT, json.dumps(dht.maddrs), peer.peer_id],
        capture_output=True,
        text=True,
        env={**os.environ, **SWARM_ENV},
    )
    assert probe.returncode == 0, probe.stderr[-LOG_TAIL_CHARS:]
    assert set(json.loads(probe.stdout)) == {f"/ip4/{e.public_address}/tcp/{PEER_DHT_PORT}"}, probe.stdout
    prompt = _prompt(seed=6)

    run = wan.generate(c, prompt, initial_peers=dht.maddrs)

    assert torch.equal(run.tokens, _local(local, prompt))
    assert run.first_route == run.last_route == _route((peer, 0, 4))
    assert not run.failovers
