"""grpc.health.v1 for orchestrators' probes (`--health-port`): alive while the process answers, serving while
the node serves; Check only, tiny messages; a real peer and DHT process report both (review 3, L4)."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from headers_only import flood
from swarm import start_dht, start_peer

from peer.main import HEALTH_SERVICE, health_guard
from protos.health import LIVENESS, HealthServer

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _status(port: int, service: str, *, timeout: float = 5.0) -> int | str:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout).status
        except grpc.RpcError as e:
            return e.code().name


def test_liveness_at_start_readiness_when_told_check_only() -> None:
    async def scenario() -> list[object]:
        server = HealthServer("127.0.0.1", 0, service=HEALTH_SERVICE)
        port = await server.start()
        seen: list[object] = []
        try:
            check = asyncio.to_thread
            seen += [await check(_status, port, LIVENESS), await check(_status, port, HEALTH_SERVICE)]
            await server.set_ready(True)
            seen.append(await check(_status, port, HEALTH_SERVICE))
            await server.set_ready(False)
            seen.append(await check(_status, port, HEALTH_SERVICE))
            seen.append(await check(_status, port, "another.Service"))
            seen.append(await check(_status, port, "x" * 4096))  # over the port's message cap
            seen.append(await check(_watch, port))
        finally:
            await server.stop()
        return seen

    assert asyncio.run(scenario()) == [
        SERVING,
        NOT_SERVING,
        SERVING,
        NOT_SERVING,
        "NOT_FOUND",
        "RESOURCE_EXHAUSTED",
        "UNIMPLEMENTED",
    ]


def _watch(port: int) -> str:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        replies = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=5)
        try:
            next(iter(replies))
        except grpc.RpcError as e:
            return e.code().name
    return "answered"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.swarm
def test_a_peer_and_a_dht_node_report_their_health(checkpoint, tmp_path: Path) -> None:
    dht_port, peer_port = _free_port(), _free_port()
    dht = start_dht(tmp_path, "--health-port", str(dht_port))
    try:
        assert _status(dht_port, LIVENESS) == SERVING and _status(dht_port, HEALTH_SERVICE) == SERVING
        peer = start_peer(tmp_path, checkpoint("llama"), "0:2", dht.maddrs, "--health-port", str(peer_port))
        try:
            deadline = time.monotonic() + 30  # announced ONLINE just before the ready file is written
            while _status(peer_port, HEALTH_SERVICE) != SERVING and time.monotonic() < deadline:
                time.sleep(0.2)
            assert _status(peer_port, LIVENESS) == SERVING
            assert _status(peer_port, HEALTH_SERVICE) == SERVING
        finally:
            assert peer.stop() == 0
        assert _status(peer_port, LIVENESS, timeout=2) == "UNAVAILABLE"  # gone with the peer
    finally:
        dht.stop()


def test_a_strangers_headers_only_calls_cannot_hold_the_probe_port() -> None:
    """A caller (127.0.0.2) opens headers-only Check calls on every stream the port allows and keeps them
    open: the kubelet's probe (127.0.0.1) is still answered within a second."""

    async def scenario() -> tuple[object, int]:
        server = HealthServer("127.0.0.1", 0, service=HEALTH_SERVICE, interceptors=[health_guard()])
        port = await server.start()
        try:
            async with flood(
                f"127.0.0.1:{port}",
                "/grpc.health.v1.Health/Check",
                num_connections=8,
                calls_per_connection=4,
                source="127.0.0.2",
            ) as stranger:
                await asyncio.sleep(0.5)
                await stranger.refill()
                held = stranger.open_streams
                started = time.monotonic()
                status = await asyncio.to_thread(_status, port, LIVENESS, timeout=1.0)
                return (status if time.monotonic() - started < 1.0 else "slow"), held
        finally:
            await server.stop()

    status, held = asyncio.run(scenario())
    assert held > 0, "the stranger held no call: the test would show nothing"
    assert status == SERVING
