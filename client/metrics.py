"""Prometheus metrics of a client: steps sent through the swarm, their latency in all and per hop,
failovers and bans, for one `SwarmConnection`.

Attached from outside (`instrument`), so sessions and routing know nothing of metrics: it wraps the
connection's session factory, its peer statistics and its ban list, one counter or histogram update per
step, hop sample or ban. Labels are status codes and ban reasons, never peer or session ids.

    metrics = instrument(model.swarm)
    metrics.serve(9100)  # http://127.0.0.1:9100/metrics (`corolla generate --metrics-port 9100`)

    register(model.swarm, registry)  # or on another endpoint's registry (the gateway's /metrics)
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    start_http_server,
)

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from client.session import InferenceSession
    from client.swarm import SwarmConnection

logger = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)
_CODES = frozenset(code.name for code in grpc.StatusCode)


def ban_reason(reason: str) -> str:
    """A ban's reason as a label: its status code, or the kind of check that found the peer wrong."""
    if reason in _CODES:
        return reason
    return "spot_check" if reason.startswith("spot check") else "other"


class ClientMetrics:
    """A client's metrics in a registry of its own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        reg = self.registry
        self.sessions = Counter("corolla_client_sessions", "Inference sessions started", registry=reg)
        self.steps = Counter(
            "corolla_client_steps",
            "Inference steps sent through the swarm (a prompt is one step), failed ones included",
            registry=reg,
        )
        self.step_errors = Counter(
            "corolla_client_step_errors", "Steps that failed after their retries", registry=reg
        )
        self.step_seconds = Histogram(
            "corolla_client_step_seconds",
            "Seconds of one step through the whole route, failovers and replays included",
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.hop_seconds = Histogram(
            "corolla_client_hop_seconds",
            "Seconds of a decode step at one hop: from the previous hop's output (or the send) to this hop's",
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.failovers = Counter(
            "corolla_client_failovers",
            "Hops replaced after a failure, by the failure's status code",
            ["code"],
            registry=reg,
        )
        self.bans = Counter(
            "corolla_client_bans",
            "Peers banned, by reason (a status code or spot_check)",
            ["reason"],
            registry=reg,
        )
        self._server: WSGIServer | None = None

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve /metrics on host:port (0: a free port) from a thread of its own; returns the port."""
        disable_created_metrics()  # no `*_created` series: they double the output and say little
        self._server, _ = start_http_server(port, addr=host, registry=self.registry)
        bound = int(self._server.server_port)
        logger.info("client metrics serving address=http://%s:%d/metrics", host, bound)
        return bound

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def instrument(swarm: SwarmConnection, metrics: ClientMetrics | None = None) -> ClientMetrics:
    """Count what `swarm`'s sessions do from now on (sessions started before are not counted)."""
    metrics = metrics if metrics is not None else ClientMetrics()
    observe_step = swarm.stats.observe_step

    def observed(peer_id: str, blocks: int, seconds: float) -> None:
        observe_step(peer_id, blocks, seconds)
        metrics.hop_seconds.observe(seconds)

    ban = swarm.bans.ban

    def banned(peer_id: str, reason: str) -> float:
        metrics.bans.labels(ban_reason(reason)).inc()
        return ban(peer_id, reason)

    new_session = swarm.new_session

    def session(max_length: int, *, adapter: str = "") -> InferenceSession:
        started = new_session(max_length, adapter=adapter)
        metrics.sessions.inc()
        started.astep = _timed(started, started.astep, metrics)  # type: ignore[method-assign,assignment]
        return started

    # instance attributes shadow the methods for this connection only
    swarm.stats.observe_step = observed  # type: ignore[method-assign]
    swarm.bans.ban = banned  # type: ignore[method-assign]
    swarm.new_session = session  # type: ignore[method-assign]
    return metrics


def register(swarm: SwarmConnection, registry: CollectorRegistry) -> ClientMetrics:
    """Count what `swarm`'s sessions do from now on in `registry`, one another endpoint serves (the
    gateway's /metrics): the client's series sit beside its own under their `corolla_client_` names."""
    return instrument(swarm, ClientMetrics(registry))


def _timed(
    session: InferenceSession, astep: Callable[..., Awaitable[Any]], metrics: ClientMetrics
) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(astep)
    async def step(*args: Any, **kwargs: Any) -> Any:
        failovers = len(session.failovers)
        started = time.perf_counter()
        try:
            return await astep(*args, **kwargs)
        except Exception:
            metrics.step_errors.inc()
            raise
        finally:
            metrics.steps.inc()
            metrics.step_seconds.observe(time.perf_counter() - started)
            for event in session.failovers[failovers:]:
                metrics.failovers.labels(event.reason).inc()

    return step
