"""The HTTP front's error answers: each exception a route can raise, as OpenAI's error body.

`install_error_handlers(app, metrics)` maps APIError (a 4xx/5xx the request earned), the engine's
QueueFullError (503 + Retry-After), EngineDeadError, RequestRejectedError (400), KvTransferError,
a client that went away (499) and anything unexpected (500, logged) to JSON bodies; `stream_error`
is the same for a stream whose 200 headers are already sent.
"""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from meshserve.engine.async_engine import EngineDeadError, KvTransferError, QueueFullError, RequestRejectedError
from meshserve.serve.protocol import APIError, error_body, from_value_error, http_error

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 1


class ClientDisconnected(Exception):
    """The client went away before its answer (499; its sequences are aborted in the engine)."""


def stream_error(err: Exception) -> dict:
    """The error event of a stream whose 200 headers are already sent."""
    if isinstance(err, RequestRejectedError):
        return error_body(str(err), "invalid_request_error", None, 400)
    return error_body(str(err), "server_error", None, 503 if isinstance(err, EngineDeadError) else 500)


def install_error_handlers(app: FastAPI, metrics) -> None:
    """Every error the routes raise answered as OpenAI's JSON error body (counted in `metrics`)."""
    def error_response(err: APIError) -> JSONResponse:
        metrics.on_error(err.status)
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, err: APIError):
        return error_response(err)

    @app.exception_handler(QueueFullError)
    async def _queue_full(_: Request, err: QueueFullError):
        return error_response(APIError(503, str(err), "server_error", None, "queue_full",
                                       headers={"Retry-After": str(RETRY_AFTER_S)}))

    @app.exception_handler(EngineDeadError)
    async def _engine_dead(_: Request, err: EngineDeadError):
        return error_response(APIError(503, f"the engine is not running: {err}", "server_error", None,
                                       "engine_unavailable"))

    @app.exception_handler(RequestRejectedError)
    async def _rejected(_: Request, err: RequestRejectedError):
        return error_response(from_value_error(err))

    @app.exception_handler(KvTransferError)
    async def _kv_transfer_failed(_: Request, err: KvTransferError):
        return error_response(APIError(503, f"the KV cache transfer from the context server failed: {err}",
                                       "server_error", None, "kv_transfer_failed"))

    @app.exception_handler(ClientDisconnected)
    async def _gone(_: Request, err: ClientDisconnected):
        return Response(status_code=499)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        return error_response(http_error(request, err.status_code, err.detail, err.headers))

    @app.exception_handler(Exception)
    async def _internal(_: Request, err: Exception):
        logger.exception("internal error")
        return error_response(APIError(500, f"internal server error: {type(err).__name__}: {err}", "server_error"))
