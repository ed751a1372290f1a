"""Entry points of the peer side: `corolla serve` (a peer) and `corolla dht` (a bootstrap DHT node).
Wires config, logging, DHT, gRPC server, span and announcements; handles signals and a graceful drain."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import grpc

from peer import throughput
from peer.announce import Announcer, Rebalancer, claim_span
from peer.blocks import HostedSpan, count_blocks
from peer.cache import SessionTable
from peer.config import PeerConfig
from peer.executor import Executor
from peer.service import PeerService
from peer.throughput import Throughput, network_rps
from protos import peer_pb2_grpc
from protos.dht import start_dht_node, visible_maddrs
from protos.errors import InvalidInputError
from protos.prepare import default_cache_dir
from protos.records import PeerRecord, PeerState
from protos.settings import parse_config
from protos.swarm import read_records as read_latest

logger = logging.getLogger(__name__)

EXPIRY_CHECK_PERIOD = 5.0
START_JITTER = 1.0  # seconds: peers started together read the swarm at different moments
CLAIM_SETTLE = 1.0  # seconds between announcing a claimed span and reading the swarm back


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


def _stop_event() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


@dataclass
class _Speed:
    """What this peer announces about its speed, for the span it serves now."""

    per_block: Throughput | None = None
    decode: float = 0.0  # steps per second through the span
    forward: float = 0.0  # tokens per second of a forward through the span

    def update(self, per_block: Throughput, num_blocks: int, network: float | None) -> None:
        self.per_block = per_block
        self.decode, self.forward = per_block.for_span(num_blocks, network)


async def serve(config: PeerConfig) -> None:
    stop = _stop_event()
    total_blocks = await asyncio.to_thread(count_blocks, config.model)
    if config.span is not None and config.span[1] > total_blocks:
        raise InvalidInputError(f"--blocks {config.blocks} is outside the model's blocks [0, {total_blocks})")
    model_id = config.model_id or ""
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
    speed = _Speed()

    def make_record(state: PeerState, span: tuple[int, int]) -> PeerRecord:
        return PeerRecord(
            state=state,
            address=address,
            start=span[0],
            end=span[1],
            throughput=speed.decode,
            forward_throughput=speed.forward,
            free_cache_tokens=max(sessions.free_tokens, 0),
            max_length=config.max_length,
            dtype=config.dtype,  # type: ignore[arg-type]
            version=corolla_version(),
            public_name=config.public_name,
        )

    async def read_records() -> dict[str, PeerRecord]:
        latest = await read_latest(node, model_id, total_blocks)
        return {other: record for other, (_, record) in latest.items()}

    executor = Executor()
    announcer = Announcer(
        node,
        model_id=model_id,
        num_blocks=total_blocks,
        span=config.span or (0, 1),
        make_record=make_record,
        period=config.announce_period,
    )
    rebalancing: asyncio.Task[None] | None = None
    try:
        if config.span is None:
            span = await claim_span(
                announcer,
                read_records,
                num_blocks=total_blocks,
                length=config.num_blocks or 1,
                settle=CLAIM_SETTLE,
                jitter=START_JITTER,
            )
        else:
            span = config.span
            await announcer.announce(PeerState.JOINING)
        announcer.start()  # keeps the claim alive while a large span loads
        hosted = await asyncio.to_thread(HostedSpan.load, config.model, *span, dtype=config.dtype)
        network = (
            network_rps(config.bandwidth, hosted.hidden_size, hosted.dtype.itemsize)
            if config.bandwidth is not None
            else None
        )
        key = throughput.cache_key(model_id, config.dtype, corolla_version())
        option = throughput.parse_option(config.throughput)
        cache_dir = config.cache_dir or default_cache_dir()
        per_block = await executor.run(
            lambda: throughput.resolve(option, hosted, key=key, cache_dir=cache_dir)
        )
        speed.update(per_block, span[1] - span[0], network)
        service = PeerService(
            span=hosted,
            config=config,
            sessions=sessions,
            executor=executor,
            peer_id=peer_id,
            make_record=lambda: make_record(announcer.state, announcer.span),
            version=corolla_version(),
        )
        peer_pb2_grpc.add_PeerServicer_to_server(service, server)
        await server.start()
        await announcer.announce(PeerState.ONLINE)
        logger.info(
            "serving model=%s blocks=[%d,%d) address=%s peer_id=%s throughput=%.1f",
            config.model_id,
            *span,
            address,
            peer_id,
            speed.decode,
        )

        async def move(target: tuple[int, int]) -> None:
            """Load the new span first, serve and announce it, then end the old span's sessions, free it."""
            new = await asyncio.to_thread(HostedSpan.load, config.model, *target, dtype=config.dtype)
            old_span, old_sessions = service.swap_span(new)
            speed.update(per_block, target[1] - target[0], network)
            await announcer.announce(PeerState.ONLINE)
            await service.retire(old_sessions, f"peer moved to blocks [{target[0]}, {target[1]})")
            logger.warning(
                "moved blocks=[%d,%d) -> [%d,%d) address=%s sessions_moved=%d",
                old_span.start,
                old_span.end,
                *target,
                address,
                len(old_sessions),
            )
            del old_span
            gc.collect()

        if config.num_blocks is not None:
            rebalancer = Rebalancer(
                announcer,
                read_records,
                num_blocks=total_blocks,
                throughput=lambda: speed.decode,
                move=move,
                period=config.balance_period,
                margin=config.balance_margin,
                settle=CLAIM_SETTLE,
            )
            rebalancing = asyncio.create_task(rebalancer.run_forever(), name="corolla-rebalance")
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), min(EXPIRY_CHECK_PERIOD, config.session_timeout / 2))
            except TimeoutError:
                service.expire_idle()
        if rebalancing is not None:
            rebalancing.cancel()
            await asyncio.gather(rebalancing, return_exceptions=True)
        logger.info("draining sessions=%d", len(sessions))
        service.accepting = False
        await announcer.announce(PeerState.DRAINING)
        await executor.drain(config.drain_timeout)
        await server.stop(grace=min(config.drain_timeout, 5.0))
        await service.close()
    finally:
        if rebalancing is not None:
            rebalancing.cancel()
            await asyncio.gather(rebalancing, return_exceptions=True)
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
