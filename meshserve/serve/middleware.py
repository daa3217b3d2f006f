"""Pure-ASGI middlewares of the HTTP front (streaming and disconnect detection pass through
untouched): the request-header size limit (431) and the bearer-token check (401), both answering in
OpenAI's error shape and counting the error in /metrics."""
from __future__ import annotations

import hmac
from typing import Optional

from fastapi.responses import JSONResponse

from meshserve.serve.metrics import ServerMetrics
from meshserve.serve.protocol import error_body


class AuthMiddleware:
    """Bearer token on every route but /health, compared in constant time (pure ASGI, so
    streaming and disconnect detection pass through untouched)."""

    def __init__(self, app, api_key: str, metrics: ServerMetrics):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("path") == "/health":
            return await self.app(scope, receive, send)
        given = b""
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                given = value
                break
        if not hmac.compare_digest(given, self.expected):
            self.metrics.on_error(401)
            message = ("missing API key: send `Authorization: Bearer <key>`" if not given
                       else "incorrect API key provided")
            response = JSONResponse(error_body(message, "invalid_request_error", None, "invalid_api_key"),
                                    status_code=401, headers={"WWW-Authenticate": "Bearer"})
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)


class HeaderLimitMiddleware:
    """Requests whose headers (names and values together) pass the limit are a 431 in OpenAI's error
    shape, before routing or authentication: a client cannot make every request carry megabytes."""

    def __init__(self, app, limit: int, metrics: Optional[ServerMetrics] = None):
        self.app = app
        self.limit = limit
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            size = sum(len(k) + len(v) for k, v in scope.get("headers", ()))
            if size > self.limit:
                if self.metrics is not None:
                    self.metrics.on_error(431)
                response = JSONResponse(error_body(
                    f"the request headers are {size} bytes, more than this server reads ({self.limit} bytes; "
                    f"serve --max_request_header_kb raises it)", "invalid_request_error", None,
                    "request_header_fields_too_large"), status_code=431)
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)
