"""Prometheus metrics of the OpenAI gateway (`GET /metrics`), named and shaped as vLLM's: time to first token,
end-to-end latency, prompt and generated tokens per request (histograms), running and waiting requests
(gauges, read from the admission at scrape time) and API requests by endpoint and HTTP status. Every series
carries the served model's name as `model`. Knows no HTTP handler: the gateway reports what happened."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# seconds: a first token through a swarm takes a prefill and a round trip per hop; a request up to the timeout
FIRST_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
REQUEST_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
ENDPOINTS = {  # path -> its `endpoint` label; other /v1/ paths count as "other"
    "/v1/chat/completions": "chat_completions",
    "/v1/completions": "completions",
    "/v1/models": "models",
}


class _Requests(Collector):
    """Running and waiting requests, read when scraped (`counts` returns them)."""

    def __init__(self, model: str, counts: Callable[[], tuple[int, int]]) -> None:
        self.model, self.counts = model, counts

    def collect(self) -> Iterator[Metric]:
        running, waiting = self.counts()
        for name, doc, value in [
            ("corolla_gateway_requests_running", "Requests generating now", running),
            ("corolla_gateway_requests_waiting", "Requests waiting for a free slot", waiting),
        ]:
            family = GaugeMetricFamily(name, doc, labels=["model"])
            family.add_metric([self.model], value)
            yield family


class GatewayMetrics:
    """The gateway's metrics in a registry of their own, for the model served as `model`."""

    def __init__(self, model: str, counts: Callable[[], tuple[int, int]]) -> None:
        self.model = model
        self.registry = reg = CollectorRegistry()
        labels = ["model"]
        self.first_token = Histogram(
            "corolla_gateway_time_to_first_token_seconds",
            "Seconds from a generation request's arrival to its first token",
            labels,
            buckets=FIRST_TOKEN_BUCKETS,
            registry=reg,
        )
        self.latency = Histogram(
            "corolla_gateway_e2e_request_latency_seconds",
            "Seconds from a generation request's arrival to its last token",
            labels,
            buckets=REQUEST_BUCKETS,
            registry=reg,
        )
        self.prompt_tokens = Histogram(
            "corolla_gateway_request_prompt_tokens",
            "Prompt tokens of a finished generation request (all its prompts)",
            labels,
            buckets=TOKEN_BUCKETS,
            registry=reg,
        )
        self.generation_tokens = Histogram(
            "corolla_gateway_request_generation_tokens",
            "Tokens generated for a finished request (all its choices)",
            labels,
            buckets=TOKEN_BUCKETS,
            registry=reg,
        )
        self.requests = Counter(
            "corolla_gateway_requests",
            "API requests (/v1/) answered, by endpoint and HTTP status (a stream counts its opening status)",
            ["model", "endpoint", "status"],
            registry=reg,
        )
        reg.register(_Requests(model, counts))

    def first_token_seen(self, seconds: float) -> None:
        self.first_token.labels(self.model).observe(seconds)

    def finished(self, *, seconds: float, prompt_tokens: int, generation_tokens: int) -> None:
        """A generation request ended after `seconds` with these tokens: finished, cut by the gateway's time
        or byte budget, or stopped by its shutdown (one whose client left, or that failed, is not counted)."""
        self.latency.labels(self.model).observe(seconds)
        self.prompt_tokens.labels(self.model).observe(prompt_tokens)
        self.generation_tokens.labels(self.model).observe(generation_tokens)

    def exposition(self) -> bytes:
        """The text format Prometheus scrapes."""
        return generate_latest(self.registry)

    def counting(self, app: ASGIApp) -> ASGIApp:
        """`app` with each /v1/ request counted by endpoint and the status it answered."""
        counter = self.requests
        model = self.model

        async def counted(scope: Scope, receive: Receive, send: Send) -> None:
            path = str(scope.get("path", "")) if scope["type"] == "http" else ""
            if not path.startswith("/v1/"):
                await app(scope, receive, send)
                return
            endpoint = ENDPOINTS.get(path, "models" if path.startswith("/v1/models/") else "other")

            async def noted(message: Message) -> None:
                if message["type"] == "http.response.start":
                    counter.labels(model, endpoint, str(message["status"])).inc()
                await send(message)

            await app(scope, receive, noted)

        return counted
