"""Entry points of the peer side: `corolla serve` (a `Peer`) and `corolla dht` (a bootstrap DHT node).
Wires config, logging, DHT, gRPC server, span and announcements; signals and one drain/shutdown path."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import os
import resource
import signal
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
import torch
from hivemind.dht.node import DHTNode

from peer import reach, throughput, wire
from peer.adapters import parse_adapter_spec
from peer.admission import CallGuard
from peer.announce import Announcer, Rebalancer, claim_span
from peer.blocks import HostedSpan, count_blocks
from peer.config import WILDCARD_HOSTS, DhtConfig, PeerConfig
from peer.devices import auto_num_blocks, block_memory, free_memory_bytes, resolve_device, resolve_dtype
from peer.metrics import PeerMetrics
from peer.pings import Pinger
from peer.portmap import PortMapper
from peer.scheduler import Scheduler
from peer.service import PeerService
from peer.sessions import SessionTable
from peer.throughput import Throughput, network_rps
from protos.channels import channel_options
from protos.checkpoint import parse_dtype
from protos.cli import corolla_version, progress, setup_logging, write_ready_file
from protos.dht import host_maddr, start_dht_node, visible_maddrs
from protos.errors import InvalidInputError
from protos.health import HealthServer, notify_systemd
from protos.identity import Identity
from protos.model_id import derive_model_id
from protos.prepare import default_cache_dir
from protos.records import PeerRecord, PeerState, is_loopback
from protos.relay import RelayDialer, RelayedServer, circuit_maddrs
from protos.settings import parse_config
from protos.swarm import read_records
from protos.swarm_key import SwarmGuard, SwarmKey
from protos.tls import ServerTls

logger = logging.getLogger(__name__)

EXPIRY_CHECK_PERIOD = 5.0
START_JITTER = 1.0  # seconds: peers started together read the swarm at different moments
CLAIM_SETTLE = 1.0  # seconds between announcing a claimed span and reading the swarm back
STOP_GRACE = 2.0  # at most this many seconds for RPCs in flight once the sessions are retired
HEALTH_SERVICE = "corolla"  # the grpc.health.v1 service name that is SERVING while the node serves
HEALTH_CLIENT_CALLS = 4  # calls one client may hold on the health port (of its 16)
HEALTH_REQUEST_TIMEOUT = 2.0  # seconds a probe's request may take to arrive (it is a service name)
DRAIN_ANNOUNCE_TIMEOUT = 3.0  # seconds the DRAINING announcement may take before the drain goes on
MAX_STREAMS_PER_CONNECTION = 100  # calls one connection may have open at once; more wait at the client
KEEPALIVE_PERIOD = 60.0  # seconds between the server's pings on a quiet connection: finds dead clients
KEEPALIVE_TIMEOUT = 20.0  # seconds a pinged client has to answer before its connection is closed
IDENTITY_ONLY = 1  # gRPC's bitset of the compression algorithms a server accepts: bit 0 is "none"


M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, M_ARENA_MAX = -3, -1, -8  # glibc mallopt parameters
MALLOC_ARENAS = 2
MMAP_THRESHOLD_BYTES = 1 << 20
MAX_OPEN_FILES = 1 << 20  # the soft limit asked for when the hard one is unlimited


def return_freed_memory() -> None:
    """Give buffers of 1 MiB or more (messages, tensors) their own mappings, unmapped when freed. glibc's
    default threshold rises with each large free, after which a burst of big messages (a push flood) stays
    in the heap for good: peer RSS then shows the worst burst, not what is held."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to tune
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        libc.mallopt(M_TRIM_THRESHOLD, MMAP_THRESHOLD_BYTES)  # free heap tops go back to the system
        libc.mallopt(M_ARENA_MAX, MALLOC_ARENAS)  # gRPC's threads share arenas instead of fragmenting more


def raise_open_file_limit() -> int:
    """Raise the soft limit on open files to the hard one (as Petals does) and return it: every connection,
    call and p2pd stream is a descriptor, and the usual soft default (1024) is below --max-concurrent-rpcs."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = MAX_OPEN_FILES if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError) as e:  # a sandbox that refuses: the peer runs with what it has
            logger.warning("open file limit kept soft=%s hard=%s reason=%s", soft, hard, e)
            return soft
        logger.info("open file limit raised soft=%s->%s hard=%s", soft, wanted, hard)
        return wanted
    return soft


def server_options(config: PeerConfig) -> list[tuple[str, int]]:
    """The gRPC server's options: message caps, and connection limits so idle, half-open or too many
    connections (slowloris) cannot hold file descriptors; clients may not ping more often than HTTP/2
    allows. Per-client caps on calls and on messages being received are `peer.admission`'s."""
    return [
        *channel_options(config.max_message_bytes),
        ("grpc.max_connection_idle_ms", int(config.connection_idle_timeout * 1000)),
        ("grpc.max_connection_age_ms", int(config.connection_age_timeout * 1000)),
        ("grpc.max_connection_age_grace_ms", int(config.session_timeout * 1000)),
        ("grpc.keepalive_time_ms", int(KEEPALIVE_PERIOD * 1000)),
        ("grpc.keepalive_timeout_ms", int(KEEPALIVE_TIMEOUT * 1000)),
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.http2.bdp_probe", 0),  # windows stay 64 KiB per stream: a flood buffers little
        ("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION),
        ("grpc.max_allowed_incoming_connections", config.max_connections),
        ("grpc.server_handshake_timeout_ms", int(config.handshake_timeout * 1000)),
        # identity only: corolla never compresses, and a compressed request would be a bomb that inflates
        # to --max-message-bytes from a few kilobytes on the wire
        ("grpc.compression_enabled_algorithms_bitset", IDENTITY_ONLY),
    ]


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
    network: float | None = None  # decode steps/s the link carries; None: no cap
    decode: float = 0.0  # steps per second through the span
    forward: float = 0.0  # tokens per second of a forward through the span
    batched: float = 0.0  # decode tokens per second through the span, many sessions batched

    def update(self, span: tuple[int, int]) -> None:
        if self.per_block is not None:
            self.decode, self.forward = self.per_block.for_span(span[1] - span[0], self.network)
            self.batched = self.per_block.batch_tps / (span[1] - span[0])


def health_guard() -> CallGuard:
    """The health port's call guard: a few calls per client, each request within a short deadline."""
    return CallGuard(
        max_client_calls=HEALTH_CLIENT_CALLS,
        max_receives=HEALTH_CLIENT_CALLS,
        max_client_receives=HEALTH_CLIENT_CALLS // 2,
        request_timeout=HEALTH_REQUEST_TIMEOUT,
    )


class Peer:
    """One `corolla serve`: joins the DHT, claims or takes its span, loads it, serves it over gRPC, announces
    it, moves when rebalancing says so, and on `stop` drains and leaves (also after a failed start)."""

    def __init__(self, config: PeerConfig) -> None:
        self.config = config
        self.device = resolve_device(config.device)  # fails here, before anything starts, without one
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.sessions = SessionTable.from_config(config)
        self.metrics = PeerMetrics(model=config.model_id)
        self.metrics_port: int | None = None  # where /metrics is served, once it is
        self.scheduler = Scheduler(
            max_batch_tokens=config.max_batch_tokens,
            max_stateless_tokens=config.compute_chunk_tokens,
            on_batch=self.metrics.batch,
            inline_seconds=config.inline_step_ms / 1000,
        )
        # one key for the DHT id, the records' signatures and the TLS certificate (protos.identity)
        self.identity = Identity.load_or_create(config.identity)
        self.tls = None if config.insecure else ServerTls.create(self.identity)
        # a private swarm's peer refuses every call without the swarm token bound to its certificate
        self.swarm_key = SwarmKey.load(config.swarm_key) if config.swarm_key is not None else None
        guard = []
        if self.swarm_key is not None:
            if self.tls is None:  # PeerConfig refuses it too: never a private swarm without its guard
                raise InvalidInputError("--swarm-key needs TLS (drop --insecure)")
            guard.append(SwarmGuard(self.swarm_key.grpc_token(self.tls.certificate)))
        counted = [self.metrics.interceptor] if config.metrics_port is not None else []  # first: sees all
        self.server = grpc.aio.server(
            options=server_options(config),
            maximum_concurrent_rpcs=config.max_concurrent_rpcs,
            # strangers refused first, then per-client caps and turns (peer.admission) for members' calls
            interceptors=[*counted, *guard, CallGuard.from_config(config)],
        )
        self.health = (
            HealthServer(
                config.health_host, config.health_port, service=HEALTH_SERVICE, interceptors=[health_guard()]
            )
            if config.health_port is not None
            else None
        )
        self.speed = _Speed()
        self.version = corolla_version()
        self.num_blocks = 0  # blocks in the whole model, known once its config is read
        self.address = ""
        self.relay_maddrs: tuple[str, ...] = ()  # set when the swarm cannot dial this peer (peer.reach)
        self._relayed: RelayedServer | None = None
        self.port_mapper: PortMapper | None = None  # --nat-port-map's mapping of the gRPC port
        self.node: DHTNode | None = None
        self.announcer: Announcer | None = None
        self.service: PeerService | None = None
        self._rebalancing: asyncio.Task[None] | None = None
        self.pinger: Pinger | None = None  # round trips to likely next hops, once ONLINE
        self._pinging: asyncio.Task[None] | None = None

    @property
    def peer_id(self) -> str:
        return self.node.peer_id.to_base58() if self.node is not None else ""

    async def run(self, stop: asyncio.Event) -> None:
        """Start, serve until `stop` is set (expiring idle sessions meanwhile), then drain and stop."""
        try:
            await self.start()
            service = self._serving()[0]
            config = self.config
            period = min(EXPIRY_CHECK_PERIOD, config.session_timeout / 2, config.first_step_timeout / 2)
            while not stop.is_set():
                try:
                    await asyncio.wait_for(stop.wait(), period)
                except TimeoutError:
                    service.expire_idle()
        finally:
            await self.stop()

    async def start(self) -> None:
        config = self.config
        if self.health is not None:  # alive (liveness) from here on; ready once ONLINE
            await self.health.start()
        self.num_blocks = await asyncio.to_thread(count_blocks, config.model)
        logger.info("model model_id=%s from=%s", config.model_id, await asyncio.to_thread(id_source, config))
        if config.span is not None and config.span[1] > self.num_blocks:
            raise InvalidInputError(
                f"--blocks {config.blocks} is outside the model's blocks [0, {self.num_blocks})"
            )
        # off loopback, the node joins as a client until the swarm says whether it can dial this peer
        self.node = await self._start_node(client_mode=not is_loopback(config.host))
        if is_loopback(config.host):
            port = self._add_port(self.server, config.port)
            self.address = f"{config.announce_host}:{port}"
        else:
            port = self._add_port(self.server, await self._reach_swarm(config.port))
        if config.new_swarm:
            logger.info(
                "new swarm started; others join it with: --initial-peers %s",
                " ".join(await visible_maddrs(self.node)),
            )
        announcer = self.announcer = Announcer(
            self.node,
            model_id=config.model_id,
            num_blocks=self.num_blocks,
            span=config.span or (0, 1),
            make_record=self.make_record,
            period=config.announce_period,
        )
        if config.span is None:
            span = await claim_span(
                announcer,
                self._read_records,
                num_blocks=self.num_blocks,
                length=await self._span_length(),
                settle=CLAIM_SETTLE,
                jitter=START_JITTER,
            )
        else:
            span = config.span
            await announcer.announce(PeerState.JOINING)
        announcer.start()  # keeps the claim alive while a large span loads
        self._serve_metrics(announcer)
        with progress(f"loading blocks [{span[0]},{span[1]})", enabled=config.log_format == "text"):
            hosted = await asyncio.to_thread(self._load, span)
        if config.bandwidth is not None:
            self.speed.network = network_rps(config.bandwidth, hosted.hidden_size, hosted.dtype.itemsize)
        key = throughput.cache_key(hosted, config.model_id, self.version)
        cache_dir = config.cache_dir or default_cache_dir()
        with progress("measuring throughput", enabled=config.log_format == "text"):
            self.speed.per_block = await self.scheduler.run(
                lambda: throughput.resolve(config.throughput, hosted, key=key, cache_dir=cache_dir)
            )
        self.speed.update(span)
        self.service = PeerService(
            span=hosted,
            config=config,
            sessions=self.sessions,
            scheduler=self.scheduler,
            peer_id=self.peer_id,
            make_record=lambda: self.make_record(announcer.state, announcer.span),
            version=self.version,
            swarm_key=self.swarm_key,
            metrics=self.metrics,
        )
        self.service.channels.relays = RelayDialer(self.node.p2p)  # pushes to peers nobody can dial
        wire.add_to_server(self.service, self.server)
        await self.server.start()
        if self.relay_maddrs:  # relayed connections arrive as libp2p streams, piped into the gRPC port
            local_host = "127.0.0.1" if config.host in WILDCARD_HOSTS else config.host
            self._relayed = RelayedServer(self.node.p2p, port, grpc_host=local_host)
            await self._relayed.start()
        await announcer.announce(PeerState.ONLINE)
        if self.health is not None:
            await self.health.set_ready(True)
        logger.info(
            "serving model=%s blocks=[%d,%d) address=%s peer_id=%s throughput=%.1f",
            config.model_id,
            *span,
            self.address,
            self.peer_id,
            self.speed.decode,
        )
        self._write_ready(span)
        self.pinger = Pinger(
            peer_id=self.peer_id,
            span=lambda: announcer.span,
            read_records=self._read_records,
            channels=self.service.channels,
            period=config.ping_period,
        )
        self._pinging = asyncio.create_task(self.pinger.run_forever(), name="corolla-pings")
        if config.span_length is not None:
            rebalancer = Rebalancer(
                announcer,
                self._read_records,
                num_blocks=self.num_blocks,
                throughput=lambda: self.speed.decode,
                move=self.move,
                period=config.balance_period,
                margin=config.balance_margin,
                settle=CLAIM_SETTLE,
            )
            self._rebalancing = asyncio.create_task(rebalancer.run_forever(), name="corolla-rebalance")

    async def _start_node(self, *, client_mode: bool = False, relays: Sequence[str] = ()) -> DHTNode:
        config = self.config
        return await start_dht_node(
            initial_peers=config.initial_peers,
            host=config.host,
            port=config.dht_port,
            client_mode=client_mode,
            identity=self.identity,
            nat_port_map=config.nat_port_map,
            swarm_key=self.swarm_key,
            relay_service=config.relay,
            relays=relays,
            announce_maddrs=announced_dht_maddrs(config),
        )

    def _add_port(self, server: grpc.aio.Server, port: int) -> int:
        address = self.config.bind_address(port)
        if self.tls is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, self.tls.server_credentials())

    async def _reach_swarm(self, port: int) -> int:
        """Before anything is claimed or loaded: the address to announce and whether the swarm can dial it
        (`peer.reach`); the DHT node then rejoins as a server, or as a relayed client. Returns the port."""
        if self.node is None:
            raise RuntimeError("the peer has not joined the DHT")
        reached = await reach.reach_swarm(
            self.config,
            self.node,
            port,
            add_port=self._add_port,
            certificate=self.tls.certificate if self.tls is not None else None,
        )
        self.address, self.port_mapper = reached.address, reached.port_mapper
        await self.node.shutdown()  # one libp2p host per identity: the new node takes its place
        self.node = await self._start_node(relays=reached.relays)
        if reached.relays:
            self.relay_maddrs = circuit_maddrs(reached.relays)
            logger.warning("serving through relays address=%s relays=%d", self.address, len(reached.relays))
        return reached.port

    def make_record(self, state: PeerState, span: tuple[int, int]) -> PeerRecord:
        """This peer's announcement now: `span` is what it serves or, while it loads one, what it claimed."""
        config = self.config
        return PeerRecord(
            state=state,
            address=self.address,
            start=span[0],
            end=span[1],
            throughput=self.speed.decode,
            forward_throughput=self.speed.forward,
            batch_throughput=self.speed.batched,
            free_cache_tokens=self.sessions.free_tokens,
            num_sessions=len(self.sessions),
            queued=self.scheduler.in_flight,
            max_length=config.max_length,
            max_batch_size=config.max_batch_size,
            max_forward_tokens=config.max_forward_tokens,
            dtype=self.dtype,  # type: ignore[arg-type]  # validated by PeerConfig
            quantization=config.quant,
            adapters=tuple(parse_adapter_spec(spec)[0] for spec in config.adapters),
            version=self.version,
            public_name=config.public_name,
            certificate=self.tls.certificate.decode() if self.tls is not None else None,
            relay_maddrs=self.relay_maddrs,
            pings=dict(self.pinger.pings) if self.pinger is not None else {},
        )

    async def move(self, target: tuple[int, int]) -> None:
        """Load the new span first, serve and announce it, then end the old span's sessions and free it."""
        service, announcer = self._serving()
        new = await asyncio.to_thread(self._load, target)
        old_span, old_sessions = service.swap_span(new)
        self.speed.update(target)
        await announcer.announce(PeerState.ONLINE)
        self._write_ready(target)
        await service.retire(old_sessions, f"peer moved to blocks [{target[0]}, {target[1]})")
        logger.warning(
            "moved blocks=[%d,%d) -> [%d,%d) address=%s sessions_moved=%d",
            old_span.start,
            old_span.end,
            *target,
            self.address,
            len(old_sessions),
        )
        del old_span
        gc.collect()

    async def _span_length(self) -> int:
        """--num-blocks K, or with `auto` as many blocks as fit the device's free memory now."""
        config = self.config
        if config.span_length != "auto":
            return config.span_length or 1
        memory = await asyncio.to_thread(
            block_memory,
            config.model,
            dtype=parse_dtype(self.dtype),
            quant=config.quant,
            cache_tokens=config.max_cache_tokens,
        )
        free = free_memory_bytes(self.device)
        length = auto_num_blocks(free, memory, num_blocks=self.num_blocks)
        logger.info(
            "num_blocks auto=%d device=%s free_bytes=%d reserve_bytes=%d block_bytes=%d cache_bytes=%d "
            "model_blocks=%d (blocks that fit after the reserve, each with its cache; give --num-blocks to "
            "leave memory free)",
            length,
            self.device,
            free,
            memory.reserve_bytes,
            memory.weight_bytes,
            memory.cache_bytes,
            self.num_blocks,
        )
        return length

    def _serve_metrics(self, announcer: Announcer) -> None:
        if self.config.metrics_port is None:
            return
        self.metrics.watch(
            sessions=self.sessions,
            scheduler=self.scheduler,
            record=lambda: self.make_record(announcer.state, announcer.span),
            labels={"peer_id": self.peer_id},
        )
        self.metrics_port = self.metrics.serve(self.config.metrics_host, self.config.metrics_port)

    def _load(self, span: tuple[int, int]) -> HostedSpan:
        config = self.config
        hosted = HostedSpan.load(
            config.model, *span, dtype=self.dtype, device=self.device, quant=config.quant
        )
        hosted.load_adapters(config.adapters)
        return hosted

    async def stop(self) -> None:
        """The one shutdown path: stop rebalancing; when serving, refuse new sessions, announce DRAINING, let
        the steps in flight finish (at most `drain_timeout`) and end open sessions with UNAVAILABLE; then stop
        the server, cancel pushes still queued, announce OFFLINE and leave the DHT. Bounded in time: about
        `drain_timeout` plus a few seconds, whatever is queued."""
        for task in (self._rebalancing, self._pinging):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        grace = None
        if self.service is not None and self.announcer is not None:
            logger.info("draining sessions=%d", len(self.sessions))
            notify_systemd(STOPPING="1", STATUS=f"draining {len(self.sessions)} sessions")
            self.service.accepting = False
            if self.health is not None:
                await self.health.set_ready(False)
            try:
                await asyncio.wait_for(self.announcer.announce(PeerState.DRAINING), DRAIN_ANNOUNCE_TIMEOUT)
            except Exception as e:  # draining goes on: the final OFFLINE may still get through
                logger.warning("announce failed state=draining reason=%r", e)
            await self.scheduler.drain(self.config.drain_timeout)
            await self.service.retire_all("peer is shutting down")
            grace = min(self.config.drain_timeout, STOP_GRACE)
        await self.server.stop(grace=grace)
        if self.service is not None:
            await self.service.close()
        if self.announcer is not None:
            await self.announcer.stop(final_state=PeerState.OFFLINE)
        if self._relayed is not None:
            await self._relayed.close()
        if self.port_mapper is not None:
            await self.port_mapper.close()
        self.scheduler.shutdown()
        self.metrics.close()
        if self.config.ready_file is not None:
            self.config.ready_file.unlink(missing_ok=True)  # a stopped peer is not ready
        if self.node is not None:
            await self.node.shutdown()
        if self.health is not None:
            await self.health.stop()
        logger.info("stopped peer_id=%s", self.peer_id)

    def _serving(self) -> tuple[PeerService, Announcer]:
        if self.service is None or self.announcer is None:
            raise RuntimeError("the peer is not serving yet")
        return self.service, self.announcer

    async def _read_records(self) -> dict[str, PeerRecord]:
        if self.node is None:
            raise RuntimeError("the peer has not joined the DHT")
        latest = await read_records(self.node, self.config.model_id, self.num_blocks)
        return {other: record for other, (_, record) in latest.items()}

    def _write_ready(self, span: tuple[int, int]) -> None:
        """The ready file and systemd (`Type=notify`) learn that the peer serves `span`, at start and after a
        move."""
        notify_systemd(READY="1", STATUS=f"serving {self.config.model_id} blocks [{span[0]},{span[1]})")
        if self.config.ready_file is None:
            return
        content = {
            "peer_id": self.peer_id,
            "address": self.address,
            "start": span[0],
            "end": span[1],
            "model_id": self.config.model_id,
            "pid": os.getpid(),
            "certificate": self.tls.certificate.decode() if self.tls is not None else None,
            "metrics_port": self.metrics_port,
            "relay_maddrs": list(self.relay_maddrs),
        }
        write_ready_file(self.config.ready_file, content)


async def serve(config: PeerConfig) -> None:
    await Peer(config).run(_stop_event())


def serve_main(argv: Sequence[str], prog: str) -> int:
    config = parse_config(
        PeerConfig,
        argv,
        prog=prog,
        description="Serve a span of a model's blocks to a corolla swarm.",
        positional=("model",),
    )
    setup_logging(log_format=config.log_format)
    if not config.initial_peers and not config.new_swarm:
        logger.error("%s", NO_SWARM_CHOSEN)
        return 2
    return_freed_memory()
    raise_open_file_limit()
    asyncio.run(serve(config))
    return 0


NO_SWARM_CHOSEN = (
    "no --initial-peers: pass the multiaddresses of the swarm to join (`corolla dht` prints them), or "
    "--new-swarm to start a new swarm of your own"
)


def announced_dht_maddrs(config: PeerConfig) -> list[str]:
    """Where the peer's DHT node says it is: at --announce-host (given, not derived from --host) on a fixed
    --dht-port; else (empty) the addresses it listens on, as p2pd finds them."""
    if "announce_host" not in config.model_fields_set or config.announce_host is None:
        return []
    if config.dht_port == 0:
        logger.warning(
            "--announce-host without --dht-port: the DHT node announces the addresses it listens on (in a "
            "container, its own); give --dht-port and publish it to announce %s there too",
            config.announce_host,
        )
        return []
    return [host_maddr(config.announce_host, config.dht_port)]


def id_source(config: PeerConfig) -> str:
    """How the peer's model id came about, for the start log: `--model-id`, or what it was derived from."""
    identity = derive_model_id(config.model)
    return identity.source if identity.model_id == config.model_id else "--model-id"


async def run_dht(config: DhtConfig) -> None:
    """A bootstrap DHT node until SIGTERM/SIGINT; prints its multiaddresses, one per line."""
    stop = _stop_event()
    node = await start_dht_node(
        host=config.host,
        port=config.port,
        identity=Identity.load_or_create(config.identity),
        nat_port_map=config.nat_port_map,
        swarm_key=SwarmKey.load(config.swarm_key) if config.swarm_key is not None else None,
        relay_service=config.relay,
        announce_maddrs=[host_maddr(config.announce_host, config.port)] if config.announce_host else [],
    )
    health = None
    if config.health_port is not None:
        health = HealthServer(
            config.health_host, config.health_port, service=HEALTH_SERVICE, interceptors=[health_guard()]
        )
        await health.start()
        await health.set_ready(True)
    try:
        maddrs = await visible_maddrs(node)
        for maddr in maddrs:
            print(maddr, flush=True)
        if config.ready_file is not None:
            write_ready_file(config.ready_file, {"maddrs": maddrs, "pid": os.getpid()})
        notify_systemd(READY="1", STATUS=f"DHT node at {' '.join(maddrs)}")
        await stop.wait()
        notify_systemd(STOPPING="1")
    finally:
        if config.ready_file is not None:
            config.ready_file.unlink(missing_ok=True)
        if health is not None:
            await health.stop()
        await node.shutdown()


def dht_main(argv: Sequence[str], prog: str) -> int:
    config = parse_config(
        DhtConfig,
        argv,
        prog=prog,
        description="Run a bootstrap DHT node for a swarm. Prints the multiaddresses that peers and clients "
        "pass as --initial-peers, one per line, and runs until SIGTERM or Ctrl-C.",
    )
    setup_logging(log_format=config.log_format)
    raise_open_file_limit()
    asyncio.run(run_dht(config))
    return 0
