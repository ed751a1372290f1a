"""In front of the OpenAI gateway's app, before any handler runs: the Host (no DNS rebinding), the API key (on
/v1/), a JSON body (no cross-site form posts), the body size (413 before a larger body is read whole), and
one log line per request with its status and time, its path escaped (a stream's time runs to its last
event). Refusals have OpenAI's error shape; the checks themselves are `client/browser_guard.py`."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from client.browser_guard import host_allowed, host_name, is_json, loggable
from client.config import GatewayConfig
from client.openai_types import GatewayError, error_body

logger = logging.getLogger("client.gateway")  # the request lines stay the gateway's, as they always were

KEY_SCOPE = "corolla.api_key"  # the ASGI scope entry naming the API key a request carries ("" without keys)
_BODILESS = frozenset({"GET", "HEAD"})


class Guard:
    """The checks, in order: Host (400), API key (401), JSON body (415), declared body size (413)."""

    def __init__(self, app: ASGIApp, config: GatewayConfig, key_of: Callable[[bytes | None], str | None]):
        self.app, self.config, self.key_of = app, config, key_of
        self.limit = config.max_request_bytes

    def refusal(self, scope: Scope) -> GatewayError | None:
        """Why the request is refused before the app sees it, or None; notes its API key in the scope."""
        headers = scope.get("headers", [])
        hosts = [value for name, value in headers if name == b"host"]
        if len(hosts) != 1 or not host_allowed(
            hosts[0], listen_host=self.config.host, allowed=self.config.allowed_hosts
        ):
            shown = loggable(str(host_name(hosts[0]) if len(hosts) == 1 else None), limit=100)
            return GatewayError(
                400,
                f"this gateway does not answer for the host {shown} (name it with --allowed-hosts)",
                kind="invalid_request_error",
                code="host_not_allowed",
            )
        fields = dict(headers)
        key = self.key_of(fields.get(b"authorization"))
        if scope["path"].startswith("/v1/") and key is None:
            return GatewayError(
                401,
                "a valid API key is required (Authorization: Bearer KEY)",
                kind="invalid_request_error",
                code="invalid_api_key",
            )
        scope[KEY_SCOPE] = key or ""
        if scope.get("method") not in _BODILESS and not is_json(fields.get(b"content-type")):
            return GatewayError(
                415,
                "request bodies must be JSON, sent with Content-Type: application/json",
                kind="invalid_request_error",
                code="unsupported_media_type",
            )
        declared = fields.get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.limit:
            return GatewayError(
                413,
                f"request bodies are limited to {self.limit} bytes",
                kind="invalid_request_error",
                code="request_too_large",
            )
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 0

        async def logged(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise HTTPException(413, f"request bodies are limited to {self.limit} bytes")
            return message

        try:
            error = self.refusal(scope)
            if error is not None:
                await _send_error(logged, error)
            else:
                await self.app(scope, limited, logged)
        finally:
            logger.info(
                "%s %s %d %.3fs",
                loggable(str(scope.get("method", "")), limit=16),
                loggable(scope["path"]),
                status,
                time.perf_counter() - started,
            )


async def _send_error(send: Send, error: GatewayError) -> None:
    data = json.dumps(error_body(str(error), error.kind, error.code, error.param)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": data})
