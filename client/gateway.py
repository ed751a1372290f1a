"""`corolla api`: the OpenAI HTTP API over the swarm (FastAPI + uvicorn), backed by the client library.

    GET  /v1/models             the served model and the LoRA adapters its peers serve
    POST /v1/chat/completions   the model's own chat template; streamed (server-sent events) or whole
    POST /v1/completions        text or token-id prompts
    GET  /health, /ready        the process is up; the swarm serves every block (503 names the gap)
    GET  /metrics               Prometheus metrics (`client/gateway_metrics.py`), open as /health is

Bodies are read as clients send them: explicit nulls are defaults, vLLM's `top_k`, `min_p` and
`repetition_penalty` apply (transformers' processors), other unknown fields are logged once per name and
ignored, `tool` messages and assistant `tool_calls` reach the chat template (`--chat-template FILE` replaces
the tokenizer's); `tools` is refused, since the model's tool calls are not parsed. The prompts of one
/v1/completions request run together (one prefill forward and one decode step per token in the engine, one
left-padded batch in `--no-engine`).

Running requests decode together in the engine loop (`client/engine.py`): one batched forward of the
client's modules per token for all of them, each choice in its own inference session, whose steps go out
together so the peers batch them; requests join and leave between steps. With `--no-engine` each request
runs transformers' `generate()` on a worker thread instead (`client/completions.py`). With `--speculative
ngram`, greedy requests in the engine verify prompt-lookup drafts in their steps (same tokens). A client that
disconnects cancels its generation after the step in flight, which closes its sessions on every peer.
Errors have OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

A request's `model` names the base model or, as with vLLM's LoRA modules, a LoRA adapter that peers serve
(`corolla serve --adapters`): its sessions then run that adapter (`Plan.adapter`). The adapters are the
names the records in the client's current view of the swarm announce (as discovery refreshes it), so they
come and go with the peers; `/v1/models` lists them with `parent` = the base model, and any other name is
404 `model_not_found`.

Before a handler runs (`client/gateway_guard.py`), the Host must be a name the operator chose, the API key
valid, a body JSON (no DNS rebinding or cross-site form posts, even on loopback) and small enough. A
request's budget is bounded in tokens (max_tokens x n x prompts), time and response bytes (past the last
two its choices end with finish_reason "length", which OpenAI clients take as a cut completion), and the
slots are shared between API keys (`client/admission.py`).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from protos.extras import missing_extra

try:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.background import BackgroundTask
    from starlette.exceptions import HTTPException
    from starlette.types import ASGIApp
except ModuleNotFoundError as e:  # without the [api] extra: say how to install it
    raise (missing_extra(e, needed_by="the OpenAI gateway (client.gateway)") or e) from None

from client import metrics as client_metrics
from client.admission import Admission, Ticket
from client.completions import (
    ContextLengthError,
    Delta,
    Plan,
    Stop,
    TokenBudgetError,
    chat_prompt,
    check_chat_template,
    completion_prompts,
    make_plan,
    run_plan,
)
from client.config import GatewayConfig
from client.discovery import SwarmView
from client.engine import Engine, Job
from client.errors import PeerFailure, SwarmError, format_ranges
from client.gateway_guard import KEY_SCOPE, Guard
from client.gateway_metrics import CONTENT_TYPE, GatewayMetrics
from client.openai_types import (
    ChatCompletionRequest,
    ChatReplies,
    CompletionReplies,
    CompletionRequest,
    GatewayError,
    Replies,
    SamplingRequest,
    error_body,
    sse_event,
    unknown_fields,
)
from client.route import Needs, missing_blocks
from protos.errors import CorollaError, InvalidInputError
from protos.records import PeerState

logger = logging.getLogger(__name__)

READY_TIMEOUT = 10.0  # seconds to read the swarm's coverage before a request or /ready gives up
MAX_SERVED_ADAPTERS = 256  # adapter names the gateway takes from one view (each record announces <= 16)
MAX_NAMED_MODELS = 16  # model names a 404 lists
MAX_LOGGED_FIELDS = 256  # unknown request field names logged (each once); beyond them none is
MAX_FIELD_NAME_CHARS = 64  # of an unknown field's name in the log


def served_adapters(view: SwarmView, *, limit: int = MAX_SERVED_ADAPTERS) -> list[str]:
    """The LoRA adapters the peers of `view` announce (OFFLINE ones left out), sorted: the first `limit`
    names met, peers taken in peer_id order (so a request may name any of them)."""
    names: set[str] = set()
    for record in view.peers().values():
        if record.state is PeerState.OFFLINE:
            continue
        for name in record.adapters:
            if len(names) >= limit:
                return sorted(names)
            names.add(name)
    return sorted(names)


def _error_response(error: GatewayError) -> JSONResponse:
    body = error_body(str(error), error.kind, error.code, error.param)
    return JSONResponse(body, status_code=error.status)


def _http_error(error: BaseException) -> GatewayError:
    """The one map from the client library's errors to HTTP statuses."""
    if isinstance(error, GatewayError):
        return error
    if isinstance(error, ContextLengthError):
        return GatewayError(400, str(error), kind="invalid_request_error", code="context_length_exceeded")
    if isinstance(error, TokenBudgetError):
        return GatewayError(400, str(error), kind="invalid_request_error", param="max_tokens")
    if isinstance(error, InvalidInputError):
        return GatewayError(400, str(error), kind="invalid_request_error")
    if isinstance(error, SwarmError):
        return GatewayError(503, str(error), kind="server_error", code="swarm_unavailable")
    if isinstance(error, PeerFailure):
        return GatewayError(
            502, f"a peer refused the request: {error}", kind="server_error", code="peer_error"
        )
    logger.error("request failed", exc_info=error)
    return GatewayError(500, f"internal error: {type(error).__name__}", kind="server_error")


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


@dataclass
class _End:
    completion_tokens: int = 0
    error: BaseException | None = None


class Run:
    """One request's generation: `begin` hands it to the engine (or starts `run_plan` on a worker thread)
    once its ticket holds a slot, its deltas come out of `deltas()` on the server's loop. Leaving `deltas()`
    early or `cancel()` (the client went away) stops the generation; so do its time and byte budgets
    (`spend`): finish "length"."""

    def __init__(
        self, gateway: Gateway, plan: Plan, endpoint: str, ticket: Ticket, *, arrived: float | None = None
    ) -> None:
        self.gateway, self.plan, self.endpoint, self.ticket = gateway, plan, endpoint, ticket
        self.stop = Stop()
        self.sent_bytes = 0
        self.over_budget = False  # past max_response_bytes
        self.queue: asyncio.Queue[Delta | _End] = asyncio.Queue()
        self.prompt_tokens = sum(len(ids) for ids in plan.prompts)
        self.completion_tokens = 0
        self.started = time.perf_counter() if arrived is None else arrived  # the request's arrival
        self.first_token: float | None = None
        self.finish_reasons: dict[int, str] = {}
        self.future: asyncio.Future[None] | None = None

    def _work(self, emit: Callable[[Delta | _End], None]) -> None:
        try:
            emit(_End(run_plan(self.gateway.model, self.gateway.tokenizer, self.plan, emit, self.stop)))
        except BaseException as e:  # handed to the request's handler, which answers with it
            emit(_End(error=e))

    async def begin(self) -> None:
        """Wait for a slot, then start generating on a worker thread (its time budget starts now)."""
        gateway = self.gateway
        try:
            await gateway.granted(self.ticket)
        except BaseException:
            gateway.leave(self.ticket)
            raise
        self.stop.deadline = time.monotonic() + gateway.config.generation_timeout
        loop = asyncio.get_running_loop()

        def emit(item: Delta | _End) -> None:
            loop.call_soon_threadsafe(self.queue.put_nowait, item)

        if gateway.engine is None:
            self.future = loop.run_in_executor(gateway.executor, self._work, emit)
        else:
            future: asyncio.Future[None] = loop.create_future()

            def ended(completion_tokens: int, error: BaseException | None) -> None:
                emit(_End(completion_tokens, error))
                loop.call_soon_threadsafe(_resolve, future)

            try:
                gateway.engine.submit(Job(self.plan, emit, self.stop, ended))
            except InvalidInputError as e:  # closed: the gateway is stopping
                gateway.leave(self.ticket)
                raise GatewayError(503, str(e), kind="server_error", code="shutting_down") from None
            self.future = future
        self.future.add_done_callback(lambda _: gateway.leave(self.ticket))

    def cancel(self) -> None:
        """Stop generating after the step in flight (its session then closes on every peer)."""
        if self.future is not None and not self.future.done() and self.stop.request("cancelled"):
            self._log("cancelled (client gone)")

    def spend(self, num_bytes: int) -> None:
        """Count bytes of the response; past `max_response_bytes` the choices end with this delta."""
        self.sent_bytes += num_bytes
        if self.sent_bytes > self.gateway.config.max_response_bytes and not self.over_budget:
            self.over_budget = True
            self.stop.request("length")
            logger.info("request cut endpoint=%s reason=max_response_bytes", self.endpoint)

    async def deltas(self) -> AsyncGenerator[Delta, None]:
        try:
            while True:
                item = await self.queue.get()
                if isinstance(item, _End):
                    if item.error is not None:
                        raise item.error
                    self.completion_tokens = item.completion_tokens
                    self._log("done")
                    self.gateway.metrics.finished(
                        seconds=time.perf_counter() - self.started,
                        prompt_tokens=self.prompt_tokens,
                        generation_tokens=self.completion_tokens,
                    )
                    return
                if self.over_budget:  # what the worker made meanwhile is dropped: the choices end here
                    if item.finish_reason is None:
                        continue
                    item = Delta(item.index, finish_reason="length")
                if self.first_token is None and (item.text or item.logprobs or item.finish_reason):
                    self.first_token = time.perf_counter()
                    self.gateway.metrics.first_token_seen(self.first_token - self.started)
                if item.finish_reason is not None:
                    self.finish_reasons[item.index] = item.finish_reason
                yield item
        finally:
            self.cancel()

    def _log(self, outcome: str) -> None:
        elapsed = time.perf_counter() - self.started
        first = self.first_token - self.started if self.first_token is not None else float("nan")
        rate = self.completion_tokens / elapsed if elapsed > 0 else 0.0
        logger.info(
            "request %s endpoint=%s key=%s prompt_tokens=%d completion_tokens=%d ttft=%.3fs total=%.3fs "
            "tokens_per_s=%.1f finish=%s",
            outcome,
            self.endpoint,
            self.ticket.key or "-",
            self.prompt_tokens,
            self.completion_tokens,
            first,
            elapsed,
            rate,
            ",".join(sorted(set(self.finish_reasons.values()))) or "-",
        )


class Gateway:
    """The HTTP app over one model loaded with `AutoDistributedModelForCausalLM` (`app()`)."""

    def __init__(self, model: Any, tokenizer: Any, config: GatewayConfig, *, name: str) -> None:
        self.model, self.tokenizer, self.config, self.name = model, tokenizer, config, name
        self.chat_template: str | None = None
        if config.chat_template is not None:
            try:
                self.chat_template = config.chat_template.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise InvalidInputError(f"cannot read the chat template {config.chat_template}: {e}") from e
            check_chat_template(tokenizer, self.chat_template)
            logger.info("chat template path=%s", config.chat_template)
        context = int(getattr(model.config, "max_position_embeddings", 0) or 0) or None
        limits = [x for x in (context, config.max_model_len) if x]
        if not limits:
            raise InvalidInputError("the model's config names no context length: pass --max-model-len")
        self.context_length = min(limits)
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.executor = ThreadPoolExecutor(config.max_concurrent_requests, thread_name_prefix="corolla-api")
        self.engine = (
            Engine(
                model,
                tokenizer,
                max_requests=config.max_concurrent_requests,
                speculative=config.speculative,
                max_draft_tokens=config.draft_tokens,
            )
            if config.engine
            else None
        )
        # key label ("key1", ...) -> key; a request's label names its key in logs and the admission
        keys = ([config.api_key] if config.api_key is not None else []) + list(config.api_keys)
        self.keys = {f"key{i}": key.encode() for i, key in enumerate(dict.fromkeys(keys), 1)}
        room = config.max_concurrent_requests + config.max_waiting_requests
        share = config.max_requests_per_key or max(1, room // max(1, len(self.keys)))
        self.admission = Admission(
            num_slots=config.max_concurrent_requests,
            num_waiting=config.max_waiting_requests,
            max_per_key=share,
        )
        self.waiters: dict[Ticket, asyncio.Future[None]] = {}
        self.created = int(time.time())
        self.unknown_fields: set[str] = set()  # the names logged so far
        self.metrics = GatewayMetrics(name, lambda: (self.admission.num_running, self.admission.num_queued))
        # the client library's own series (sessions, steps, hops, failovers) on the same /metrics
        client_metrics.register(model.swarm, self.metrics.registry)

    def start(self, plan: Plan, endpoint: str, key: str, *, arrived: float | None = None) -> Run:
        """A new run for API key `key`, or 429 when every place, or every place of that key, is taken."""
        ticket = self.admission.admit(key)
        if isinstance(ticket, Ticket):
            return Run(self, plan, endpoint, ticket, arrived=arrived)
        if ticket == "full":
            raise GatewayError(
                429,
                "the gateway is at its request limit; retry shortly",
                kind="rate_limit_error",
                code="busy",
            )
        raise GatewayError(
            429,
            f"this API key has {self.admission.max_per_key} requests generating or waiting, its share of "
            "the gateway; retry when one finishes",
            kind="rate_limit_error",
            code="key_busy",
        )

    async def granted(self, ticket: Ticket) -> None:
        """Returns once `ticket` holds a slot."""
        self._grant()
        if ticket.granted:
            return
        waiter = asyncio.get_running_loop().create_future()
        self.waiters[ticket] = waiter
        try:
            await waiter
        finally:
            self.waiters.pop(ticket, None)

    def leave(self, ticket: Ticket) -> None:
        self.admission.leave(ticket)
        self._grant()

    def _grant(self) -> None:
        for ticket in self.admission.grant():
            waiter = self.waiters.get(ticket)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    async def view(self) -> SwarmView:
        """The client's current view of the swarm (discovery keeps it fresh); 503 when it cannot be read."""
        swarm = self.model.swarm
        future = asyncio.run_coroutine_threadsafe(swarm.discovery.view(), swarm.runtime.loop)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), READY_TIMEOUT)
        except TimeoutError:
            future.cancel()
            raise GatewayError(
                503,
                "the swarm's records could not be read in time",
                kind="server_error",
                code="swarm_unavailable",
            ) from None

    async def check_ready(self, adapter: str = "") -> int:
        """The model's number of blocks when usable peers (not banned, serving the LoRA `adapter` if one is
        named) serve them all in the client's current view of the swarm; else 503 naming the blocks nobody
        serves."""
        view = await self.view()
        needs = Needs(adapter=adapter) if adapter else None
        gaps = missing_blocks(view, banned=self.model.swarm.bans.banned(), needs=needs)
        if gaps:
            served = f"{self.name} with adapter {adapter}" if adapter else self.name
            raise GatewayError(
                503,
                f"the swarm cannot serve {served} now: no peer serves blocks {format_ranges(gaps)} "
                f"(of {view.num_blocks})",
                kind="server_error",
                code="swarm_unavailable",
            )
        return view.num_blocks

    async def adapters(self) -> list[str]:
        """The LoRA adapters peers serve now, sorted (none when the swarm's records cannot be read)."""
        try:
            return served_adapters(await self.view())
        except (GatewayError, SwarmError) as e:
            logger.info("adapters unknown reason=%s", e)
            return []

    def close(self) -> None:
        """Stop the engine (requests still running end "cancelled") and the worker threads."""
        if self.engine is not None:
            self.engine.close()
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def resolve(self, model: str) -> str:
        """The served LoRA adapter a request's `model` names ("" for the base model), read from the current
        view; 404 `model_not_found` naming what is served for any other name."""
        if model == self.name:
            return ""
        adapters = await self.adapters()
        if model in adapters:
            return model
        names = [self.name, *adapters]
        listed = ", ".join(f"`{name}`" for name in names[:MAX_NAMED_MODELS])
        more = f" and {len(names) - MAX_NAMED_MODELS} more" if len(names) > MAX_NAMED_MODELS else ""
        raise GatewayError(
            404,
            f"The model `{model}` does not exist; this gateway serves {listed}{more}",
            kind="invalid_request_error",
            code="model_not_found",
            param="model",
        )

    def note_unknown_fields(self, body: SamplingRequest, endpoint: str) -> None:
        """Log each field name no request before carried (the first MAX_LOGGED_FIELDS names): accepted and
        ignored, as vLLM does, so an operator sees what clients send that does nothing."""
        for name in unknown_fields(body):
            if name in self.unknown_fields or len(self.unknown_fields) >= MAX_LOGGED_FIELDS:
                continue
            self.unknown_fields.add(name)
            logger.warning(
                "request field ignored endpoint=%s field=%r (unknown to this gateway; logged once)",
                endpoint,
                name[:MAX_FIELD_NAME_CHARS],
            )

    async def respond(
        self, request: Request, plan: Plan, replies: Replies, stream: bool, *, arrived: float
    ) -> Any:
        await self.check_ready(plan.adapter)
        key = str(request.scope.get(KEY_SCOPE, ""))
        run = self.start(plan, request.url.path, key, arrived=arrived)
        await run.begin()
        if stream:  # after the stream, finished or cut by the client: `cancel` is then a no-op or stops it
            events = self._events(run, replies)
            return StreamingResponse(
                events, media_type="text/event-stream", background=BackgroundTask(run.cancel)
            )
        collect = asyncio.ensure_future(_collect(run, replies))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not collect.done():  # the client left: stop generating for it
            collect.cancel()
            run.cancel()
            return JSONResponse({}, status_code=499)
        return collect.result()

    async def _events(self, run: Run, replies: Replies) -> AsyncIterator[str]:
        deltas = run.deltas()
        try:
            for chunk in replies.opening(run.plan):
                yield sse_event(chunk)
            async for delta in deltas:
                event = sse_event(replies.chunk(delta))
                run.spend(len(event))
                yield event
            if replies.include_usage:
                yield sse_event(replies.usage_chunk(run.prompt_tokens, run.completion_tokens))
        except Exception as e:  # the status line is sent: the error travels as an event, as OpenAI does
            error = _http_error(e)
            yield sse_event(error_body(str(error), error.kind, error.code, error.param))
        finally:
            await deltas.aclose()
        yield "data: [DONE]\n\n"

    def app(self) -> ASGIApp:
        """The FastAPI app, behind the guard (API key, body limit, request log)."""
        app = FastAPI(title="corolla", docs_url=None, redoc_url=None, openapi_url=None)
        gateway = self

        async def gateway_error(request: Request, error: Exception) -> JSONResponse:
            return _error_response(_http_error(error))

        for kind in (GatewayError, CorollaError, Exception):
            app.add_exception_handler(kind, gateway_error)

        @app.exception_handler(RequestValidationError)
        async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
            problems = [
                (".".join(str(p) for p in e.get("loc", ()) if p != "body"), str(e.get("msg", "")))
                for e in error.errors()
            ]
            message = "; ".join(f"{where or 'body'}: {what}" for where, what in problems[:5])
            param = problems[0][0] if problems and problems[0][0] else None
            return JSONResponse(error_body(message, "invalid_request_error", None, param), status_code=400)

        @app.exception_handler(HTTPException)
        async def http_error(request: Request, error: HTTPException) -> JSONResponse:
            body = error_body(str(error.detail), "invalid_request_error", None, None)
            return JSONResponse(body, status_code=error.status_code)

        @app.get("/health")
        async def health() -> dict[str, str]:
            return {"status": "ok"}

        @app.get("/ready")
        async def ready() -> dict[str, Any]:
            return {"status": "ready", "model": gateway.name, "num_blocks": await gateway.check_ready()}

        @app.get("/metrics")
        async def metrics() -> Response:
            return Response(gateway.metrics.exposition(), media_type=CONTENT_TYPE)

        @app.get("/v1/models")
        async def models() -> dict[str, Any]:
            adapters = await gateway.adapters()
            return {"object": "list", "data": [gateway.model_card(name) for name in ["", *adapters]]}

        @app.get("/v1/models/{name:path}")
        async def model(name: str) -> dict[str, Any]:
            return gateway.model_card(await gateway.resolve(name))

        @app.post("/v1/chat/completions")
        async def chat(body: ChatCompletionRequest, request: Request) -> Any:
            arrived = time.perf_counter()
            gateway.note_unknown_fields(body, request.url.path)
            adapter = await gateway.resolve(body.model)
            # templating and tokenizing a long prompt takes a while: off the loop that streams the others
            prompt = await asyncio.to_thread(
                chat_prompt, gateway.tokenizer, body.messages, chat_template=gateway.chat_template
            )
            plan = gateway.plan(body, [prompt], adapter=adapter)
            replies = ChatReplies(body.model, body.include_usage(), logprobs=body.logprobs)
            return await gateway.respond(request, plan, replies, body.stream, arrived=arrived)

        @app.post("/v1/completions")
        async def completions(body: CompletionRequest, request: Request) -> Any:
            arrived = time.perf_counter()
            gateway.note_unknown_fields(body, request.url.path)
            adapter = await gateway.resolve(body.model)
            prompts = await asyncio.to_thread(completion_prompts, gateway.tokenizer, body)
            plan = gateway.plan(body, prompts, adapter=adapter)
            replies = CompletionReplies(body.model, body.include_usage(), logprobs=body.logprobs is not None)
            return await gateway.respond(request, plan, replies, body.stream, arrived=arrived)

        return self.metrics.counting(Guard(app, self.config, self.key_of))

    def plan(
        self, body: ChatCompletionRequest | CompletionRequest, prompts: list[list[int]], *, adapter: str = ""
    ) -> Plan:
        return make_plan(
            body,
            prompts,
            context_length=self.context_length,
            vocab_size=self.vocab_size,
            max_request_tokens=self.config.max_request_tokens,
            adapter=adapter,
        )

    def key_of(self, header: bytes | None) -> str | None:
        """The label of the API key an Authorization header carries ("" on a gateway without keys), or None
        when it carries none of them. Every key is compared, in constant time."""
        if not self.keys:
            return ""
        scheme, _, given = (header or b"").decode("latin-1").partition(" ")
        token = given.strip().encode()
        found = None
        for label, key in self.keys.items():
            if hmac.compare_digest(token, key):
                found = label
        return found if scheme.lower() == "bearer" else None

    def model_card(self, adapter: str = "") -> dict[str, Any]:
        """The base model's card, or a served LoRA adapter's (as vLLM lists LoRA modules: `root` its name,
        `parent` the base model)."""
        return {
            "id": adapter or self.name,
            "object": "model",
            "created": self.created,
            "owned_by": "corolla",
            "root": adapter or self.name,
            "parent": self.name if adapter else None,
            "max_model_len": self.context_length,
        }


async def _collect(run: Run, replies: Replies) -> JSONResponse:
    texts: dict[int, list[Delta]] = {}
    async for delta in run.deltas():
        run.spend(replies.size(delta))
        texts.setdefault(delta.index, []).append(delta)
    return JSONResponse(replies.whole(run.plan, texts, run.prompt_tokens, run.completion_tokens))


async def _disconnected(request: Request) -> None:
    """Returns when the client closes its connection (the body was read: the next message is the end)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
