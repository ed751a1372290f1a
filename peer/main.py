"""Entry points of the peer side: `corolla serve` (a peer) and `corolla dht` (a bootstrap DHT node).
Wires config, logging, DHT, gRPC server, span and announcements; handles signals and a graceful drain."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import grpc
import torch

from peer.announce import Announcer
from peer.blocks import HostedSpan
from peer.cache import SessionTable
from peer.config import PeerConfig
from peer.executor import Executor
from peer.service import PeerService
from protos import peer_pb2_grpc
from protos.dht import start_dht_node, visible_maddrs
from protos.records import PeerRecord, PeerState
from protos.settings import parse_config

logger = logging.getLogger(__name__)

EXPIRY_CHECK_PERIOD = 5.0


def corolla_version() -> str:
    try:
        return version("corolla")
    except PackageNotFoundError:
        return "0+unknown"


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True
    )
    for noisy in ("hivemind", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def measure_throughput(span: HostedSpan, *, steps: int = 5) -> float:
    """Single-token forwards per second through the whole span (a quick prior; clients measure too)."""
    cache = span.new_cache()
    hidden = torch.zeros(1, 1, span.hidden_size, dtype=span.dtype)
    span.forward(hidden, cache)  # warm up
    started = time.perf_counter()
    for _ in range(steps):
        span.forward(hidden, cache)
    return steps / max(time.perf_counter() - started, 1e-9)


def _stop_event() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def serve(config: PeerConfig) -> None:
    stop = _stop_event()
    start, end = config.span
    node = await start_dht_node(
        initial_peers=config.initial_peers,
        host=config.host,
        port=config.dht_port,
        identity_path=config.identity,
        nat_port_map=config.nat_port_map,
    )
    peer_id = node.peer_id.to_base58()
    size = config.max_message_bytes
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size)]
    )
    port = server.add_insecure_port(f"{config.host}:{config.port}")
    address = f"{config.announce_host}:{port}"
    sessions = SessionTable(config.max_cache_tokens, idle_timeout=config.session_timeout)
    throughput = config.throughput or 0.0

    def make_record(state: PeerState = PeerState.ONLINE) -> PeerRecord:
        return PeerRecord(
            state=state,
            address=address,
            start=start,
            end=end,
            throughput=throughput,
            free_cache_tokens=max(sessions.free_tokens, 0),
            max_length=config.max_length,
            dtype=config.dtype,  # type: ignore[arg-type]
            version=corolla_version(),
            public_name=config.public_name,
        )

    executor = Executor()
    announcer = Announcer(
        node,
        model_id=config.model_id or "",
        num_blocks=None,  # announced once the span is loaded
        span=(start, end),
        make_record=make_record,
        period=config.announce_period,
    )
    try:
        await announcer.announce(PeerState.JOINING)
        span = await asyncio.to_thread(HostedSpan.load, config.model, start, end, dtype=config.dtype)
        announcer.num_blocks = span.anatomy.num_blocks
        if config.throughput is None:
            throughput = await executor.run(lambda: measure_throughput(span))
        service = PeerService(
            span=span,
            config=config,
            sessions=sessions,
            executor=executor,
            peer_id=peer_id,
            make_record=make_record,
            version=corolla_version(),
        )
        peer_pb2_grpc.add_PeerServicer_to_server(service, server)
        await server.start()
        await announcer.announce(PeerState.ONLINE)
        announcer.start()
        logger.info(
            "serving model=%s blocks=[%d,%d) address=%s peer_id=%s throughput=%.1f",
            config.model_id,
            start,
            end,
            address,
            peer_id,
            throughput,
        )
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), min(EXPIRY_CHECK_PERIOD, config.session_timeout / 2))
            except TimeoutError:
                service.expire_idle()
        logger.info("draining sessions=%d", len(sessions))
        service.accepting = False
        await announcer.announce(PeerState.DRAINING)
        await executor.drain(config.drain_timeout)
        await server.stop(grace=min(config.drain_timeout, 5.0))
        await service.close()
    finally:
        await announcer.stop(final_state=PeerState.OFFLINE)
        executor.shutdown()
        await server.stop(grace=None)
        await node.shutdown()
    logger.info("stopped peer_id=%s", peer_id)


def serve_main(argv: Sequence[str], prog: str) -> int:
    config = parse_config(
        PeerConfig,
        argv,
        prog=prog,
        description="Serve a span of a model's blocks to a corolla swarm. Options may also be set through "
        "COROLLA_<OPTION> environment variables (e.g. COROLLA_MAX_CACHE_TOKENS=4096).",
        positional=("model",),
    )
    setup_logging()
    asyncio.run(serve(config))
    return 0


async def run_dht(host: str, port: int, identity: str | None, nat_port_map: bool | None) -> None:
    stop = _stop_event()
    node = await start_dht_node(
        host=host, port=port, identity_path=Path(identity) if identity else None, nat_port_map=nat_port_map
    )
    try:
        for maddr in await visible_maddrs(node):
            print(maddr, flush=True)
        await stop.wait()
    finally:
        await node.shutdown()


def dht_main(argv: Sequence[str], prog: str) -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Run a bootstrap DHT node for a swarm. Prints the multiaddresses that peers and clients "
        "pass as --initial-peers, one per line, and runs until SIGTERM or Ctrl-C.",
    )
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default: 0.0.0.0)")
    parser.add_argument("--port", type=int, default=0, help="TCP port to listen on; 0 picks a free one")
    parser.add_argument(
        "--identity",
        help="file holding the node's private key, created if missing; keeps the multiaddress stable "
        "across restarts",
    )
    parser.add_argument(
        "--nat-port-map",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="ask the home router for a port mapping (UPnP/NAT-PMP); default: on, except on loopback",
    )
    args = parser.parse_args(list(argv))
    setup_logging()
    asyncio.run(run_dht(args.host, args.port, args.identity, args.nat_port_map))
    return 0
