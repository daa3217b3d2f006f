"""Pure-ASGI middlewares of the HTTP front (streaming and disconnect detection pass through
untouched): the request-header size limit (431) and the bearer-token check (401), both answering in
OpenAI's error shape and counting the error in /metrics."""
from __future__ import annotations

import hmac
from typing import Callable, Optional

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

    def __init__(self, app, limit: int, on_error: Optional[Callable[[int], None]] = None):
        self.app = app
        self.limit = limit
        self.on_error = on_error  # counts the refusal in the server's metrics (its status code)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            size = sum(len(k) + len(v) for k, v in scope.get("headers", ()))
            if size > self.limit:
                if self.on_error is not None:
                    self.on_error(431)
                response = JSONResponse(error_body(
                    f"the request headers are {size} bytes, more than this server reads ({self.limit} bytes; "
                    f"--max_request_header_kb raises it)", "invalid_request_error", None,
                    "request_header_fields_too_large"), status_code=431)
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


def header_timeout_protocol(base: type, seconds: float) -> type:
    """uvicorn's HTTP protocol class `base` (httptools' or h11's) with a deadline on request headers:
    a connection that has not sent a whole request line and headers `seconds` after it opened (or
    after its previous response, keep-alive) is answered 408 and closed, as nginx's
    client_header_timeout does. uvicorn has no such limit: a slowloris client could hold sockets open
    forever (no engine resources, but file descriptors and memory)."""

    class HeaderTimeoutProtocol(base):  # type: ignore[misc, valid-type]
        _header_timer = None
        _armed_cycle = None

        def _arm(self) -> None:
            self._disarm()
            self._armed_cycle = self.cycle
            self._header_timer = self.loop.call_later(seconds, self._header_timeout)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_timeout(self) -> None:
            self._header_timer = None
            cycle = self.cycle  # no new request since the timer was armed, and none being answered (a
            # pipelined request that started inside on_response_complete re-arms when it completes)
            waiting = cycle is self._armed_cycle and (cycle is None or cycle.response_complete)
            if waiting and not self.transport.is_closing():
                self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain\r\n"
                                     b"content-length: 0\r\nconnection: close\r\n\r\n")
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._header_timer is not None and self.cycle is not self._armed_cycle:
                self._disarm()  # a request's headers are complete

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()  # the next request on this keep-alive connection

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

    HeaderTimeoutProtocol.__name__ = f"HeaderTimeout{base.__name__}"
    return HeaderTimeoutProtocol
