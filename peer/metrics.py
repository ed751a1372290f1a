"""Prometheus metrics of one peer (`corolla serve --metrics-port`): steps and tokens served (prompt and
generated apart), waits and latencies, sessions and cache usage, errors by status code, bytes on the wire,
announced throughput, the peer's state. Updated once per step, batch or call (never per token), labelled by
a few fixed values (never a session or client id) and, every series, by the served `model`; the peer's state
is read at scrape time. Knows no model code."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from protos.records import PeerRecord, PeerState

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from peer.scheduler import Scheduler
    from peer.sessions import SessionTable
    from protos import peer_pb2

logger = logging.getLogger(__name__)

# seconds: a decode step of a small span takes a millisecond or two, a long prefill on a CPU seconds
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
METHODS = ("Session", "Push", "PushStream", "Forward", "Backward", "Info")  # others count as "other"
_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


def code_name(code: grpc.StatusCode | int | None) -> str:
    """A status code's name for a label ("OK" for None, "UNKNOWN" for a number gRPC does not define)."""
    if code is None:
        return "OK"
    if isinstance(code, grpc.StatusCode):
        return code.name
    return _CODE_NAMES.get(code, "UNKNOWN")


class PeerMetrics:
    """The metrics of one peer in a registry of its own (several in-process peers never collide); every
    series it exposes carries `model=` the served model's id (set it before scraping: `model`)."""

    def __init__(self, registry: CollectorRegistry | None = None, *, model: str = "") -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.model = model
        reg = CollectorRegistry()  # the peer's own collectors; `registry` sees them through the model label
        self.registry.register(_Labelled(reg, lambda: {"model": self.model}))
        self._collectors = reg
        self.steps = Counter("corolla_peer_steps", "Inference steps served", registry=reg)
        self.tokens = Counter(
            "corolla_peer_tokens",
            "Tokens (rows x positions) of inference steps served, by phase: prompt (a session's steps from "
            "position 0) or generated (its later steps: decode steps and speculative drafts verified)",
            ["phase"],
            registry=reg,
        )
        self._prompt_tokens = self.tokens.labels("prompt")
        self._generated_tokens = self.tokens.labels("generated")
        self.batch_size = Histogram(
            "corolla_peer_batch_size",
            "Jobs computed in one forward of the span, by kind of work (step, forward, backward)",
            ["kind"],
            buckets=BATCH_BUCKETS,
            registry=reg,
        )
        self.queue_wait = Histogram(
            "corolla_peer_queue_wait_seconds",
            "Seconds an inference step waited between its arrival and its compute (earlier steps of its "
            "session, the compute queue)",
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.step_latency = Histogram(
            "corolla_peer_step_seconds",
            "Seconds from an inference step's arrival to its result handed to the stream",
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.requests = Counter(
            "corolla_peer_requests", "gRPC calls received, by method", ["method"], registry=reg
        )
        self.errors = Counter(
            "corolla_peer_errors",
            "Failed calls and failed steps, by gRPC method and status code (a step's error counts under "
            "Session, where it is answered)",
            ["method", "code"],
            registry=reg,
        )
        self.received = Counter(
            "corolla_peer_received_bytes",
            "Bytes of messages received, by gRPC method",
            ["method"],
            registry=reg,
        )
        self.sent = Counter(
            "corolla_peer_sent_bytes",
            "Bytes of messages sent, by gRPC method (Push: the steps pushed to the next hop and the replies "
            "to pushes received)",
            ["method"],
            registry=reg,
        )
        self._pushed = self.sent.labels("Push")
        self._batch_sizes: dict[str, Any] = {}  # kind -> its histogram child, looked up once
        self.interceptor = MetricsInterceptor(self)
        self._server: WSGIServer | None = None

    # ---- hooks on the serving path (one call per step or batch) ---------------------------------------

    def step(self, *, tokens: int, prompt: bool, wait: float, seconds: float) -> None:
        """One inference step served: `tokens` computed (of a `prompt`, or generated), after `wait` seconds
        queued, `seconds` in all."""
        self.steps.inc()
        (self._prompt_tokens if prompt else self._generated_tokens).inc(tokens)
        self.queue_wait.observe(wait)
        self.step_latency.observe(seconds)

    def batch(self, kind: str, size: int) -> None:
        """One forward of the span computed `size` jobs of `kind` (the scheduler's hook)."""
        histogram = self._batch_sizes.get(kind)
        if histogram is None:
            histogram = self._batch_sizes[kind] = self.batch_size.labels(kind)
        histogram.observe(size)

    def pushed(self, message: peer_pb2.Step) -> None:
        self._pushed.inc(message.ByteSize())

    # ---- the HTTP endpoint -------------------------------------------------------------------------------

    def watch(
        self,
        *,
        sessions: SessionTable,
        scheduler: Scheduler,
        record: Callable[[], PeerRecord | None],
        labels: dict[str, str],
    ) -> None:
        """Report the peer's state when scraped: sessions, pages, queue, announced throughput, span, state;
        `labels` go on the info series (peer_id and the like: what never changes while the peer runs)."""
        self._collectors.register(_PeerState(sessions, scheduler, record, labels))
        ProcessCollector(registry=self._collectors)

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics on host:port (0: a free port) from a thread of its own; returns the port."""
        disable_created_metrics()  # no `*_created` series: they double the output and say little
        self._server, _ = start_http_server(port, addr=host, registry=self.registry)
        bound = int(self._server.server_port)
        logger.info("metrics serving address=http://%s:%d/metrics", host, bound)
        return bound

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _PeerState(Collector):
    """Gauges and counters read from the peer's own bookkeeping at scrape time."""

    def __init__(
        self,
        sessions: SessionTable,
        scheduler: Scheduler,
        record: Callable[[], PeerRecord | None],
        labels: dict[str, str],
    ) -> None:
        self.sessions = sessions
        self.scheduler = scheduler
        self.record = record
        self.labels = labels

    def collect(self) -> Iterator[Metric]:
        sessions, scheduler = self.sessions, self.scheduler
        yield GaugeMetricFamily("corolla_peer_sessions", "Sessions open", value=len(sessions))
        pages = GaugeMetricFamily(
            "corolla_peer_cache_pages", "KV-cache pages of the pool, used and free", labels=["state"]
        )
        pages.add_metric(["used"], sessions.num_pages - sessions.free_pages)
        pages.add_metric(["free"], sessions.free_pages)
        yield pages
        used = (sessions.num_pages - sessions.free_pages) / sessions.num_pages if sessions.num_pages else 0.0
        yield GaugeMetricFamily(
            "corolla_peer_cache_usage_ratio", "Share of the KV-cache pages in use, 0 to 1", value=used
        )
        yield GaugeMetricFamily(
            "corolla_peer_cache_page_tokens",
            "Positions of one batch row per page",
            value=sessions.page_tokens,
        )
        yield CounterMetricFamily(
            "corolla_peer_sessions_preempted",
            "Sessions closed to make room for other sessions' steps",
            value=sessions.preempted,
        )
        yield GaugeMetricFamily(
            "corolla_peer_queued_jobs", "Compute jobs queued or running", value=scheduler.in_flight
        )
        yield CounterMetricFamily(
            "corolla_peer_jobs_shed",
            "Jobs refused because they would have waited past their deadline",
            value=scheduler.shed,
        )
        yield CounterMetricFamily(
            "corolla_peer_jobs_expired",
            "Jobs skipped because their deadline passed while they waited",
            value=scheduler.skipped,
        )
        record = self.record()
        if record is None:
            return
        yield GaugeMetricFamily(
            "corolla_peer_announced_throughput_steps_per_second",
            "Decode steps per second through the span, as announced in the DHT",
            value=record.throughput,
        )
        yield GaugeMetricFamily(
            "corolla_peer_announced_forward_tokens_per_second",
            "Tokens per second of a stateless forward through the span, as announced (0: not measured)",
            value=record.forward_throughput,
        )
        yield GaugeMetricFamily(
            "corolla_peer_announced_batch_tokens_per_second",
            "Decode tokens per second through the span with 8 sessions batched, as announced",
            value=record.batch_throughput,
        )
        yield GaugeMetricFamily("corolla_peer_span_start_block", "First block served", value=record.start)
        yield GaugeMetricFamily(
            "corolla_peer_span_end_block", "One past the last block served", value=record.end
        )
        state = GaugeMetricFamily(
            "corolla_peer_state",
            "The peer's announced state: 1 for the current one, 0 for the others",
            labels=["state"],
        )
        for each in PeerState:
            state.add_metric([each.value], float(each is record.state))
        yield state
        info = GaugeMetricFamily(
            "corolla_peer_info",
            "The peer's identity and software (always 1)",
            labels=[*self.labels, "version", "dtype", "quantization"],
        )
        info.add_metric([*self.labels.values(), record.version, record.dtype, record.quantization], 1)
        yield info


class _Labelled(Collector):
    """Every series of `registry` with `labels()` added (the served model, known once the peer starts)."""

    def __init__(self, registry: CollectorRegistry, labels: Callable[[], dict[str, str]]) -> None:
        self._registry = registry
        self._labels = labels

    def collect(self) -> Iterator[Metric]:
        labels = self._labels()
        for family in self._registry.collect():
            labelled = Metric(family.name, family.documentation, family.type, family.unit)
            labelled.samples = [
                sample._replace(labels={**labels, **sample.labels}) for sample in family.samples
            ]
            yield labelled


_Behavior = Callable[[Any, grpc.aio.ServicerContext], Any]


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts every call by method, its bytes in and out (as serialized), and the status it ends with; a
    Session stream's step errors and a PushStream's nacks are counted as they are serialized. Goes first
    among the server's interceptors, so calls another interceptor refuses are counted too."""

    def __init__(self, metrics: PeerMetrics) -> None:
        self._metrics = metrics
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = str(handler_call_details.method).rpartition("/")[2]  # type: ignore[attr-defined]
        method = method if method in METHODS else "other"
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:  # the servicer's handlers are built once
            return cached[1]
        wrapped = self._wrap(handler, method)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        metrics = self._metrics
        calls, received, sent = (
            metrics.requests.labels(method),
            metrics.received.labels(method),
            metrics.sent.labels(method),
        )
        deserializer, serializer = handler.request_deserializer, handler.response_serializer

        def deserialize(data: bytes) -> Any:
            received.inc(len(data))
            return deserializer(data) if deserializer is not None else data

        def serialize(message: Any) -> bytes:
            data = serializer(message) if serializer is not None else message
            sent.inc(len(data))
            if method == "Session" and message.HasField("error"):
                metrics.errors.labels(method, code_name(message.error.code)).inc()
            elif method == "PushStream":  # every message back is a refused frame's nack
                metrics.errors.labels(method, code_name(message.code)).inc()
            return data

        def ended(context: grpc.aio.ServicerContext, error: BaseException | None) -> None:
            code = context.code()
            if code is None and isinstance(error, Exception) and not isinstance(error, grpc.aio.AbortError):
                code = grpc.StatusCode.UNKNOWN  # what gRPC answers for an exception it was not told of
            if code not in (None, grpc.StatusCode.OK):
                metrics.errors.labels(method, code_name(code)).inc()

        kind = _kind(handler)
        inner: _Behavior = getattr(handler, kind)
        if handler.response_streaming:

            async def streaming(request: Any, context: grpc.aio.ServicerContext) -> Any:
                calls.inc()
                replies = inner(request, context)
                error: BaseException | None = None
                try:
                    if inspect.isasyncgen(replies):
                        async for reply in replies:
                            yield reply
                    else:  # a coroutine that writes with `context.write`, or refuses the call
                        await replies
                except BaseException as e:
                    error = e
                    raise
                finally:
                    if inspect.isasyncgen(replies):
                        await replies.aclose()
                    ended(context, error)

            behavior: _Behavior = streaming
        else:

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                calls.inc()
                error: BaseException | None = None
                try:
                    return await inner(request, context)
                except BaseException as e:
                    error = e
                    raise
                finally:
                    ended(context, error)

            behavior = unary
        make = getattr(grpc, f"{kind}_rpc_method_handler")
        wrapped: grpc.RpcMethodHandler = make(
            behavior, request_deserializer=deserialize, response_serializer=serialize
        )
        return wrapped


def _kind(handler: grpc.RpcMethodHandler) -> str:
    requests = "stream" if handler.request_streaming else "unary"
    return f"{requests}_{'stream' if handler.response_streaming else 'unary'}"
