"""`corolla monitor --initial-peers ... --port 8080`: a live web page of any swarm, public or private, and
its JSON.

Joins the DHT as a client and, every half `refresh_period`, reads which models the swarm serves, every
peer's record, and each peer's `Info` (its round trip is the latency shown, its answer the live load). A
peer that does not answer is shown as unreachable and no longer counts for coverage. The page
(`client/static/`: plain HTML, CSS and JS, no build step) polls `/api/swarm` four times per period, so a
change shows within `refresh_period`. Reads only: it never opens a session.

Anyone can put any address in a signed record, so the monitor must not become a port scanner or a
reflector: it calls only peers whose TLS certificate binds to their peer id (a plaintext peer only with
`--probe-plaintext`), at most `max_probes_per_refresh` of them per read (the longest unprobed first), and
publishes only whether a peer answered, never why not.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import grpc
from hivemind.dht.node import DHTNode
from hivemind.utils.timed_storage import ValueWithExpiration
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from client.browser_guard import host_allowed
from client.config import ClientConfig
from client.discovery import SwarmView
from client.errors import short_id
from client.health import report
from protos import peer_pb2, tls
from protos.channels import ChannelPool
from protos.cli import corolla_version, setup_logging, write_ready_file
from protos.dht import JoinError, start_dht_node
from protos.errors import InvalidInputError
from protos.extras import MissingExtraError, require_extra
from protos.records import MODEL_INDEX_KEY, PeerRecord, PeerState, validate_model_id
from protos.relay import RelayDialer
from protos.settings import (
    add_config_arguments,
    command_parser,
    config_from_arguments,
    validation_problems,
)
from protos.swarm import MAX_ENTRIES_PER_KEY, MAX_NUM_BLOCKS, Latest, read_records
from protos.swarm_key import SwarmKey

logger = logging.getLogger(__name__)

MAX_MODELS = 32  # models of one swarm shown; a swarm index with more is cut (largest counts first)
_CLIENT_OPTIONS = ("initial_peers", "swarm_key", "join_timeout", "fetch_timeout")
_STATIC = ("index.html", "monitor.css", "monitor.js")
_TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css", ".js": "text/javascript"}
# the page loads nothing from elsewhere and runs no inline code; peers' strings are shown as text only
_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}


class MonitorConfig(BaseModel):
    """`corolla monitor` options (the client's `initial_peers`, `swarm_key`... come with them); here, not in
    client/config.py: only this command reads them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field(
        default="127.0.0.1",
        description="address the page listens on; 127.0.0.1 by default: showing it to other machines "
        "(0.0.0.0) is an explicit choice",
    )
    port: int = Field(default=8080, ge=0, le=65535, description="HTTP port of the page; 0 picks a free one")
    model_id: str | None = Field(
        default=None, description="show only this model; default: every model the swarm announces"
    )
    refresh_period: float = Field(
        default=5.0,
        ge=0.5,
        allow_inf_nan=False,
        description="the page shows a change in the swarm within this many seconds (the swarm is read "
        "twice and the page polls four times per period)",
    )
    probe_timeout: float = Field(
        default=3.0,
        gt=0,
        allow_inf_nan=False,
        description="seconds a peer has to answer the monitor's Info call before it is shown as unreachable",
    )
    max_probes_per_refresh: int = Field(
        default=64,
        ge=1,
        le=4096,
        description="peers called (Info) per read of the swarm, the longest unprobed first; the others keep "
        "their last result until their turn. Bounds the connections any set of records can make the "
        "monitor open",
    )
    probe_plaintext: bool = Field(
        default=False,
        description="also call peers whose record announces no TLS certificate (`corolla serve --insecure`: "
        "tests, trusted networks); by default only peers whose certificate binds to their peer id are "
        "called, shown and counted as serving",
    )
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="names the page may be reached by (the Host header), beside IP addresses, localhost and "
        "--host; `*`: any. Other names get 400: a web page cannot read it through DNS rebinding",
    )
    log_format: Literal["text", "json"] = Field(
        default="text", description="logs on stderr as text lines, or as one JSON object per line"
    )
    ready_file: Path | None = Field(
        default=None,
        description="once serving, write {url, port, pid} as JSON here (for tests and supervisors)",
    )

    @field_validator("model_id")
    @classmethod
    def _model_id(cls, model_id: str | None) -> str | None:
        return None if model_id is None else validate_model_id(model_id)


@dataclass(frozen=True)
class Probe:
    """One Info call to a peer: its round trip, or why it failed (logged, never published)."""

    latency_ms: float | None = None
    info: peer_pb2.InfoReply | None = None
    error: str | None = None

    @property
    def reachable(self) -> bool:
        return self.error is None


async def read_models(node: DHTNode) -> dict[str, int]:
    """model_id -> number of blocks of the models announced in the swarm's index (the count most of its
    peers give; entries that do not validate are skipped)."""
    entry = await node.get(MODEL_INDEX_KEY, latest=True)
    entries = entry.value if isinstance(entry, ValueWithExpiration) else None
    counts: dict[str, Counter[int]] = {}
    for item in list(entries.values())[:MAX_ENTRIES_PER_KEY] if isinstance(entries, dict) else []:
        value = item.value if isinstance(item, ValueWithExpiration) else None
        if not isinstance(value, dict):
            continue
        model_id, num_blocks = value.get("model_id"), value.get("num_blocks")
        with contextlib.suppress(InvalidInputError):
            if isinstance(model_id, str) and type(num_blocks) is int and 1 <= num_blocks <= MAX_NUM_BLOCKS:
                validate_model_id(model_id)
                counts.setdefault(model_id, Counter())[num_blocks] += 1
    ranked = sorted(counts.items(), key=lambda item: (-item[1].total(), item[0]))[:MAX_MODELS]
    return {model_id: count.most_common(1)[0][0] for model_id, count in sorted(ranked)}


def model_report(
    model_id: str,
    num_blocks: int,
    records: dict[str, PeerRecord],
    probes: dict[str, Probe],
    *,
    unverified: Collection[str] = (),
) -> dict[str, Any]:
    """One model's part of the page: coverage, per-block throughput and the bottleneck over the peers that
    serve (ONLINE, verified and not found unreachable), and every peer with its record and what the monitor
    measured. `unverified` peers (a certificate that does not bind to them, or none) are never called."""
    serving = {
        peer_id: record
        for peer_id, record in records.items()
        if peer_id not in unverified and (peer_id not in probes or probes[peer_id].reachable)
    }
    health = report(SwarmView.from_records(num_blocks, serving), model_id)
    peers = []
    for peer_id, record in sorted(records.items(), key=lambda item: (item[1].start, item[1].end, item[0])):
        probe = probes.get(peer_id)
        info = probe.info if probe is not None else None
        peers.append(
            {
                "peer_id": peer_id,
                "short_id": short_id(peer_id),
                **record.model_dump(mode="json", exclude={"pings", "certificate"}),
                "tls": record.certificate is not None,
                "verified": peer_id not in unverified,
                "serving": record.state is PeerState.ONLINE and peer_id in serving,
                "reachable": None if probe is None else probe.reachable,
                "latency_ms": None if probe is None else probe.latency_ms,
                # fresher than the record (announced every few tens of seconds)
                "live": None
                if info is None
                else {
                    "num_sessions": info.num_sessions,
                    "queued": info.queued,
                    "free_cache_tokens": info.free_cache_tokens,
                    "max_cache_tokens": info.max_cache_tokens,
                    "steps_computed": info.steps_computed,
                    "device": info.device,
                },
            }
        )
    health["peers"] = peers
    health["num_online"] = sum(peer["serving"] for peer in peers)
    return health


Target = tuple[str, str]  # (peer id, address): what one probe calls


class SwarmWatch:
    """Reads the swarm and probes its peers in a loop; `snapshot` is the latest state as plain data."""

    def __init__(self, node: DHTNode, config: MonitorConfig, client: ClientConfig) -> None:
        self.node = node
        self.config = config
        self.client = client
        swarm_key = SwarmKey.load(client.swarm_key) if client.swarm_key is not None else None
        size = client.max_message_bytes
        self._secure = ChannelPool(max_message_bytes=size, swarm_key=swarm_key)
        if isinstance(node, DHTNode):  # peers nobody can dial are probed through their relays
            self._secure.relays = RelayDialer(node.p2p)
        # plaintext peers (no certificate, `--insecure`): called only when asked, never in a private swarm
        plain = config.probe_plaintext and swarm_key is None
        self._plain = ChannelPool(max_message_bytes=size, insecure=True) if plain else None
        self._warm: set[Target] = set()  # probed and answered: its channel is open
        self._results: dict[Target, Probe] = {}  # the last probe of each target still in the swarm
        self._probed_at: dict[Target, int] = {}  # the refresh that last probed it (who goes next)
        self._round = 0
        self._latest: dict[str, Latest] = {}
        self.snapshot: dict[str, Any] = {"updated_at": None, "models": [], "error": "reading the swarm"}

    async def run(self) -> None:
        period = self.config.refresh_period / 2
        while True:
            started = time.monotonic()
            try:
                await asyncio.wait_for(self.refresh(), max(self.client.fetch_timeout, period))
            except Exception as e:  # the page keeps the last state and says what failed
                logger.warning("swarm read failed reason=%r", e)
                self.snapshot = {**self.snapshot, "error": f"reading the swarm failed: {e!r}"[:500]}
            await asyncio.sleep(max(period - (time.monotonic() - started), 0.0))

    async def refresh(self) -> None:
        models = await read_models(self.node)
        if self.config.model_id is not None:
            models = {k: v for k, v in models.items() if k == self.config.model_id}
        swarm: dict[str, dict[str, PeerRecord]] = {}
        for model_id, num_blocks in models.items():
            latest = await read_records(self.node, model_id, num_blocks, previous=self._latest.get(model_id))
            self._latest[model_id] = latest
            swarm[model_id] = {peer_id: record for peer_id, (_, record) in latest.items()}
        self._latest = {k: v for k, v in self._latest.items() if k in models}
        targets = {
            (peer_id, record.address): record
            for records in swarm.values()
            for peer_id, record in records.items()
            if self.callable(peer_id, record)
        }
        await self._probe(targets)
        reports = []
        for model_id, records in swarm.items():
            probes = {
                peer_id: self._results[(peer_id, record.address)]
                for peer_id, record in records.items()
                if (peer_id, record.address) in self._results
            }
            unverified = {
                peer_id for peer_id, record in records.items() if not self.verified(peer_id, record)
            }
            reports.append(model_report(model_id, models[model_id], records, probes, unverified=unverified))
        self.snapshot = {
            "updated_at": time.time(),
            "refresh_period": self.config.refresh_period,
            "version": corolla_version(),
            "models": reports,
            "error": None if reports else "no model is announced in this swarm (yet)",
        }

    def verified(self, peer_id: str, record: PeerRecord) -> bool:
        """Whether the monitor may call this record's address: its certificate binds to the peer id (what a
        TLS client checks), or it is a plaintext peer and `probe_plaintext` allows those."""
        if record.certificate is None:
            return self._plain is not None
        return tls.binds(record.certificate.encode(), peer_id)

    def callable(self, peer_id: str, record: PeerRecord) -> bool:
        # a JOINING peer serves no gRPC yet, an OFFLINE one is gone
        return record.state in (PeerState.ONLINE, PeerState.DRAINING) and self.verified(peer_id, record)

    async def _probe(self, targets: dict[Target, PeerRecord]) -> None:
        """Probe at most `max_probes_per_refresh` targets, each address once, those probed longest ago (or
        never) first; forget the results and channels of targets gone from the swarm."""
        self._round += 1
        chosen: list[Target] = []
        addresses: set[str] = set()  # records of many identities naming one address: one call per read
        for target in sorted(targets, key=lambda target: (self._probed_at.get(target, 0), target)):
            if len(chosen) < self.config.max_probes_per_refresh and target[1] not in addresses:
                chosen.append(target)
                addresses.add(target[1])
        probes = await asyncio.gather(*(self._probe_one(*target, targets[target]) for target in chosen))
        for target, probe in zip(chosen, probes, strict=True):
            self._results[target] = probe
            self._probed_at[target] = self._round
        self._results = {t: p for t, p in self._results.items() if t in targets}
        self._probed_at = {t: r for t, r in self._probed_at.items() if t in targets}
        self._warm &= set(targets)

    async def _probe_one(self, peer_id: str, address: str, record: PeerRecord) -> Probe:
        pool = self._secure if record.certificate is not None else self._plain
        if pool is None:  # `callable` let no such record through
            return Probe(error="not verified")
        certificate = record.certificate.encode() if record.certificate is not None else None
        timeout = self.config.probe_timeout
        try:
            relay = (peer_id, record.relay_maddrs) if record.relay_maddrs else None
            stub = pool.stub(address, certificate, relay=relay)
            if (peer_id, address) not in self._warm:  # the first call also connects: not latency
                await stub.Info(peer_pb2.InfoRequest(), timeout=timeout)
                self._warm.add((peer_id, address))
            started = time.perf_counter()
            info = await stub.Info(peer_pb2.InfoRequest(), timeout=timeout)
        except Exception as e:  # an RPC error, a refused certificate: the peer is not reachable from here
            self._warm.discard((peer_id, address))
            reason = e.code().name if isinstance(e, grpc.aio.AioRpcError) else type(e).__name__
            logger.debug("probe failed peer=%s reason=%s", short_id(peer_id), reason)
            return Probe(error=reason)
        return Probe(latency_ms=round((time.perf_counter() - started) * 1000, 2), info=info)

    async def close(self) -> None:
        await self._secure.close()
        if self._plain is not None:
            await self._plain.close()


def make_app(watch: SwarmWatch) -> Any:
    """The page, its static files, `/api/swarm` (the snapshot as JSON) and `/health` for probes."""
    from fastapi import FastAPI, HTTPException
    from fastapi.responses import JSONResponse, Response

    folder = resources.files("client") / "static"
    files = {name: (folder / name).read_bytes() for name in _STATIC}
    app = FastAPI(title="corolla monitor", docs_url=None, redoc_url=None, openapi_url=None)

    def static(name: str) -> Response:
        if name not in files:
            raise HTTPException(status_code=404)
        media = _TYPES[Path(name).suffix]
        return Response(files[name], media_type=media, headers=_HEADERS)

    config = watch.config

    @app.middleware("http")
    async def known_host(request: Any, call_next: Any) -> Response:
        # no DNS rebinding: a page on a name the operator did not choose cannot read the swarm through us
        host = request.headers.get("host")
        if not host_allowed(host, listen_host=config.host, allowed=config.allowed_hosts):
            body = {"error": "this monitor does not answer for that host (name it with --allowed-hosts)"}
            return JSONResponse(body, status_code=400, headers=_HEADERS)
        response: Response = await call_next(request)
        return response

    @app.get("/")
    async def index() -> Response:
        return static("index.html")

    @app.get("/static/{name}")
    async def asset(name: str) -> Response:
        return static(name)

    @app.get("/api/swarm")
    async def swarm() -> Response:
        return JSONResponse(watch.snapshot, headers=_HEADERS)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


def _parse(argv: Sequence[str], prog: str) -> tuple[MonitorConfig, ClientConfig]:
    parser = command_parser(
        prog,
        "Serve a live web page of a swarm (every model it serves: which peers serve which blocks, coverage, "
        "throughput and the bottleneck, each peer's state, version, load and latency) and its JSON at "
        "/api/swarm.",
    )
    add_config_arguments(parser, MonitorConfig)
    skip = [name for name in ClientConfig.model_fields if name not in _CLIENT_OPTIONS]
    add_config_arguments(parser, ClientConfig, skip=skip)
    namespace = parser.parse_args(list(argv))
    try:
        config = config_from_arguments(MonitorConfig, namespace)
        client = config_from_arguments(ClientConfig, namespace)
    except ValidationError as e:
        parser.error(validation_problems(e))
    if not client.initial_peers:
        parser.error("--initial-peers is required: the multiaddresses `corolla dht` or a peer printed")
    return config, client


async def serve(config: MonitorConfig, client: ClientConfig) -> None:
    """Join the DHT, watch the swarm and serve the page until SIGTERM or Ctrl-C."""
    require_extra("api", needed_by="corolla monitor")  # before joining the swarm, not after
    import uvicorn

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        # uvicorn takes these while it serves and raises them again once it stopped: they land here, a no-op,
        # so the DHT node and its daemon are shut down below instead of the process dying at once
        loop.add_signal_handler(sig, lambda: None)
    swarm_key = SwarmKey.load(client.swarm_key) if client.swarm_key is not None else None
    node = await asyncio.wait_for(
        start_dht_node(initial_peers=client.initial_peers, client_mode=True, swarm_key=swarm_key),
        client.join_timeout,
    )
    watch = SwarmWatch(node, config, client)
    watching = asyncio.create_task(watch.run(), name="corolla-monitor")
    server = uvicorn.Server(
        uvicorn.Config(make_app(watch), host=config.host, port=config.port, log_level="warning")
    )
    try:
        serving = asyncio.ensure_future(server.serve())
        while not server.started and not serving.done():
            await asyncio.sleep(0.05)
        if server.started:
            port = server.servers[0].sockets[0].getsockname()[1]
            url = f"http://{config.host}:{port}/"
            logger.info("monitor serving url=%s initial_peers=%d", url, len(client.initial_peers))
            if config.ready_file is not None:
                write_ready_file(config.ready_file, {"url": url, "port": port, "pid": os.getpid()})
        await serving
    finally:
        watching.cancel()
        await asyncio.gather(watching, return_exceptions=True)
        await watch.close()
        await node.shutdown()
        if config.ready_file is not None:
            config.ready_file.unlink(missing_ok=True)


def monitor_main(argv: Sequence[str], prog: str) -> int:
    config, client = _parse(argv, prog)
    setup_logging(log_format=config.log_format)
    try:
        asyncio.run(serve(config, client))
    except TimeoutError:
        logger.error("cannot join the DHT through --initial-peers within %.0f s", client.join_timeout)
        return 1
    except (JoinError, MissingExtraError) as e:
        logger.error("%s", e)
        return 1
    return 0
