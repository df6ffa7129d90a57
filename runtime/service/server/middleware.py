"""Pure ASGI middleware, outermost first: the request log, the API key, the body size limit.

Plain ASGI rather than Starlette's BaseHTTPMiddleware, which would buffer streaming answers and
hide client disconnects from the routes.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.exceptions import HTTPException

from edgellm.service.server.metrics import ServerMetrics
from edgellm.service.server.openai_schema import error_body

log = logging.getLogger("edgellm.service.server")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# A body larger than the limit is read and thrown away up to this size before the 413 is sent, so
# that a client that writes its whole body before reading the answer gets the 413, not a reset.
# Beyond it the connection is simply closed.
DISCARD_AT_MOST = 64 << 20
# Paths counted under their own label in edgellm_requests_total; anything else is "other".
KNOWN_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/openapi.json")
# Probes polled every few seconds: logged at DEBUG when they succeed, so the journal keeps to the API.
QUIET_PATHS = ("/health", "/metrics")


async def send_error(
    send: Send,
    status: int,
    message: str,
    type: str = "invalid_request_error",
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> None:
    body = json.dumps(error_body(message, type, None, code)).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class RequestLog:
    """One line per request (method, path, status, latency, tokens) and the request counter.

    Routes that generate leave their figures in scope["state"]["generation"] (request.state)."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [0]
        scope.setdefault("state", {})

        async def send_and_note(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            self._log(scope, status[0] or 500, time.perf_counter() - started)

    def _log(self, scope: Scope, status: int, seconds: float) -> None:
        path = scope.get("path", "")
        label = path if path in KNOWN_PATHS else ("/v1/models" if path.startswith("/v1/models/") else "other")
        self.metrics.requests.inc(1, label, str(status))
        figures = scope["state"].get("generation") or {}
        if label in ("/v1/chat/completions", "/v1/completions") and figures:
            self.metrics.duration.observe(seconds)
        parts = [scope.get("method", "?"), path, str(status), f"{seconds:.3f}s"]
        parts += [f"{k}={v}" for k, v in figures.items()]
        client = scope.get("client")
        if client:
            parts.append(f"client={client[0]}")
        level = logging.DEBUG if path in QUIET_PATHS and status == 200 else logging.INFO
        log.log(level, " ".join(parts))


class ApiKey:
    """`Authorization: Bearer KEY` on every path but /health and /openapi.json, compared in constant time."""

    OPEN_PATHS = ("/health", "/openapi.json")

    def __init__(self, app: ASGIApp, key: str | None):
        self.app = app
        self.key = key.encode() if key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.key is None or scope.get("path") in self.OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        given = b""
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    given = token.strip()
        if not hmac.compare_digest(given, self.key):
            message = (
                "You didn't provide an API key: send it as 'Authorization: Bearer KEY'."
                if not given
                else "Incorrect API key provided."
            )
            await _discard_body(scope, receive)
            await send_error(send, 401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            return
        await self.app(scope, receive, send)


class BodyTooLarge(HTTPException):
    """Raised from receive() when a body without Content-Length grows past the limit; FastAPI lets
    HTTPExceptions through its body parsing, and the app's handler turns it into a 413."""

    def __init__(self, limit: int):
        super().__init__(413, f"the request body is larger than {limit} bytes")


class BodyLimit:
    """Refuses bodies over `limit` bytes with a 413, by Content-Length before reading, else while reading."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = None
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = None
        if declared is not None and declared > self.limit:
            if declared <= DISCARD_AT_MOST:
                await _discard_body(scope, receive)
            await send_error(
                send,
                413,
                f"the request body is {declared} bytes; this server takes at most {self.limit}",
                code="body_too_large",
            )
            return
        received = 0

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    if message.get("more_body"):
                        await _discard_body(scope, receive, DISCARD_AT_MOST - received)
                    raise BodyTooLarge(self.limit)
            return message

        await self.app(scope, limited_receive, send)


async def _discard_body(scope: Scope, receive: Receive, at_most: int = DISCARD_AT_MOST) -> None:
    if scope.get("method") in ("GET", "HEAD"):
        return
    seen = 0
    while seen <= at_most:
        message = await receive()
        if message["type"] != "http.request":
            return
        seen += len(message.get("body", b""))
        if not message.get("more_body"):
            return
