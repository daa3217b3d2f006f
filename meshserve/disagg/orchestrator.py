"""The orchestrator of disaggregated serving (`meshserve disaggregated -c disagg-config.yml`).

An OpenAI-compatible front (FastAPI) over context servers and generation servers, which are plain
`meshserve serve` servers with `cache_transceiver_config` (docs/disaggregated.md has the contract).
Per request (`/v1/completions`, `/v1/chat/completions`), context first:

1. a context server (its group's router picks among the healthy ones) gets the client's body with
   `stream: false` and `disaggregated_params: {request_type: context_only}`; it prefills, samples
   the first token and answers it with `disaggregated_params` (first_gen_tokens, ctx_request_id,
   opaque_state). A connection error or a 5xx sends the body to another context server, up to
   `max_retries` times; a 4xx goes back to the client as it is.
2. a generation server gets the client's body as it came (streaming or not) plus
   `disaggregated_params: {request_type: generation_only, ...}` from the context answer; its answer
   (an SSE stream passed through byte for byte, or one JSON body) is the client's. Only a connection
   that was never made is retried here: once a generation server has the request, the context
   server's KV blocks are its to pull or release.

3. failover: when the generation server dies, stalls (no chunk for `stall_timeout` seconds) or
   sends a 5xx error event mid-stream, the output's token ids so far (the servers stream them:
   `return_token_ids`) and the prompt's (from the context answer) go to another generation server
   (else, in a pinch, a context server) as a `/v1/completions` request with
   `resume_output_token_ids`, and the client's stream goes on from there (StreamRelay: no text
   twice, none lost, the same id/created/model, usage as one run). A failure before anything
   reached the client sends the client's request again. At most `max_failovers` per request.

`X-Request-Id` (made up when the client sends none) goes to both servers and back to the client.
Every server's `/health` is polled every `health_check_interval` seconds; an unhealthy server is
skipped until it answers 200 again (a request that finds no healthy server in a group probes the
group once before answering 503); each poll also carries a random key challenge, and a server that
answers it with a proof of another key (params.key_proof) is taken for unhealthy, its error naming
how to share the key. Servers join and leave while it runs (`POST /register`, `/unregister`, a
bearer token derived from the shared key: `membership_token`). `/metrics` has
per-hop histograms and retry/failure/failover counters (`meshserve_disagg_*`, DisaggMetrics).

The pieces: orchestrator_config.py (the YAML: DisaggConfig, parse_config, load_config, ConfigError),
orchestrator_metrics.py (DisaggMetrics), relay.py (passing answers and streams on: StreamRelay,
StreamMeter, SSEResponse), failover.py (the generation hop and failover: GenerationHop); this module
has the server pool (health checks, membership), the context hop, the routes and the app, and
re-exports the others' names.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import secrets
import time
import uuid
from typing import Any, Optional, Sequence

import httpx
import msgspec
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

import meshserve
from meshserve.disagg.failover import COMPLETIONS_DEFAULT_MAX_TOKENS, RESUME_KEYS, GenerationHop
from meshserve.disagg.orchestrator_config import (GROUP_KEYS, TOP_KEYS, ConfigError, DisaggConfig, GroupConfig, _url,
                                                  load_config, parse_config)
from meshserve.disagg.orchestrator_metrics import DisaggMetrics
from meshserve.disagg.orchestrator_models import forward_to_one, list_models, model_card_of, reset_prefix_cache
from meshserve.disagg.params import (CHALLENGE_HEADER, HOW_TO_SHARE, PROOF_HEADER, SECRET_FILE_ENV, default_key_file,
                                     key_from_secret, key_proof, read_key_file)
from meshserve.disagg.relay import (SSE_DONE, SSEResponse, StreamMeter, StreamRelay, UpstreamFailed, _ints, _one_line,
                                    _passthrough, describe)
from meshserve.disagg.router import Router, Server, create_router
from meshserve.serve.middleware import HeaderLimitMiddleware
from meshserve.sampling_params import short_repr
from meshserve.serve.protocol import (MAX_REQUEST_BODY_BYTES, MAX_REQUEST_HEADER_BYTES, REQUEST_BODY_TIMEOUT_S,
                                      STREAMED_PROMPT_LOGPROBS, APIError, decode_json_body, http_error, read_body)

__all__ = [  # this module's names, and the ones it re-exports from the modules it was split into
    "COMPLETIONS_DEFAULT_MAX_TOKENS", "GROUP_KEYS", "MEMBERSHIP_LABEL", "ORCHESTRATOR_KEYS", "RESUME_KEYS", "SSE_DONE",
    "TOP_KEYS", "ConfigError", "DisaggConfig", "DisaggMetrics", "GenerationHop", "GroupConfig", "Orchestrator",
    "SSEResponse", "StreamMeter", "StreamRelay", "UpstreamFailed", "build_app", "describe", "load_config",
    "membership_token", "parse_config",
]

logger = logging.getLogger("meshserve.disagg")

ORCHESTRATOR_KEYS = ("disaggregated_params", "resume_output_token_ids")  # set by the orchestrator, never by clients
MEMBERSHIP_LABEL = b"meshserve disaggregated membership v1"


def membership_token(key: Optional[bytes] = None) -> str:
    """The bearer token of the orchestrator's /register and /unregister: HMAC-SHA256 of a fixed
    label under the shared key (MESHSERVE_SECRET, else the key file: MESHSERVE_SECRET_FILE or the
    default one; `key` overrides them), in hex, so the secret itself never travels. A ValueError
    when there is no key."""
    if key is None:
        secret = os.environ.get("MESHSERVE_SECRET")
        if secret:
            key = key_from_secret(secret)
        else:
            path = os.environ.get(SECRET_FILE_ENV) or default_key_file()
            key = read_key_file(path)  # a KeyFileError (ValueError) when it cannot be trusted
            if key is None:
                raise ValueError(f"MESHSERVE_SECRET is not set and there is no key file {path} (`meshserve "
                                 f"disaggregated` makes it)")
    return hmac.new(key, MEMBERSHIP_LABEL, hashlib.sha256).hexdigest()


class Orchestrator(GenerationHop):
    def __init__(self, config: DisaggConfig, request_timeout: float = 180.0,
                 metrics: Optional[DisaggMetrics] = None, key: Optional[bytes] = None,
                 max_request_body_bytes: int = MAX_REQUEST_BODY_BYTES,
                 request_body_timeout_s: float = REQUEST_BODY_TIMEOUT_S,
                 max_request_header_bytes: int = MAX_REQUEST_HEADER_BYTES):
        self.config = config
        self.request_timeout = float(request_timeout)
        # the front door's limits (disaggregated --max_request_body_mb, --request_body_timeout,
        # --max_request_header_kb): a 413, 408 or 431 before a byte goes to a server
        self.max_request_body_bytes = max_request_body_bytes
        self.request_body_timeout_s = request_body_timeout_s
        self.max_request_header_bytes = max_request_header_bytes
        self.metrics = metrics or DisaggMetrics()
        # the shared key (MESHSERVE_SECRET or the key file): guards /register and /unregister and checks the
        # servers hold it too (None: the routes answer 503, no check)
        self.key = key
        self.context = [Server(u, "context") for u in config.context.urls]
        self.generation = [Server(u, "generation") for u in config.generation.urls]
        self.context_router = create_router(config.context.router, self.context, **config.context.router_args)
        self.generation_router = create_router(config.generation.router, self.generation,
                                               **config.generation.router_args)
        self.client: Optional[httpx.AsyncClient] = None
        self._health_task: Optional[asyncio.Task] = None
        self._probes: dict[str, asyncio.Future] = {}  # role -> the running probe of a group with none healthy

    async def _read_body(self, raw: Request) -> bytes:
        return await read_body(raw, self.max_request_body_bytes, self.request_body_timeout_s)

    @property
    def servers(self) -> list[Server]:
        return self.context + self.generation

    def _group(self, role: str) -> tuple[list[Server], Router]:
        return (self.context, self.context_router) if role == "context" else (self.generation,
                                                                               self.generation_router)

    # ---- lifecycle -----------------------------------------------------------------------------------
    async def start(self) -> None:
        t = self.request_timeout
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(t, connect=min(10.0, t)), trust_env=False,
            limits=httpx.Limits(max_connections=4096, max_keepalive_connections=512, keepalive_expiry=30.0))
        await self.check_all()
        self._health_task = asyncio.create_task(self._health_loop(), name="meshserve-disagg-health")

    async def stop(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
            self._health_task = None
        if self.client is not None:
            await self.client.aclose()
            self.client = None

    # ---- health --------------------------------------------------------------------------------------
    def _set_health(self, server: Server, ok: bool, error: Optional[str] = None) -> None:
        if ok and not server.healthy:
            logger.info("%s server %s is healthy%s", server.role, server.address, " again" if server.seen else "")
        elif not ok and server.healthy and server.seen:
            logger.warning("%s server %s is unhealthy: %s; skipping it until /health answers 200", server.role,
                           server.address, error)
        elif not ok and server.healthy:
            logger.info("%s server %s does not answer yet (%s); it takes requests once /health answers 200",
                        server.role, server.address, error)
        server.healthy = ok
        server.seen = server.seen or ok
        server.last_error = None if ok else error

    async def check(self, server: Server) -> bool:
        challenge = secrets.token_hex(16) if self.key is not None else None
        try:
            r = await self.client.get(server.url + "/health", timeout=self.config.health_check_timeout,
                                      headers={CHALLENGE_HEADER: challenge} if challenge else None)
            ok, error = r.status_code == 200, None if r.status_code == 200 else (
                f"/health answered {r.status_code}: {_one_line(r)}")
        except httpx.HTTPError as e:
            ok, error = False, describe(e)
        else:
            # a server with cache_transceiver_config proves it holds the key (one without answers no
            # proof; the disaggregated_params it would be sent tell it so)
            proof = r.headers.get(PROOF_HEADER) if challenge else None
            if ok and proof is not None and not hmac.compare_digest(proof.encode(),
                                                                    key_proof(self.key, challenge).encode()):
                error = (f"it holds another key than this orchestrator's, so its disaggregated_params and KV "
                         f"transfers would be refused: {HOW_TO_SHARE}, and restart it")
                if server.last_error != error:
                    logger.warning("%s server %s is not used: %s", server.role, server.address, error)
                server.healthy, server.last_error = False, error
                return False
        self._set_health(server, ok, error)
        return ok

    async def check_all(self, servers: Optional[Sequence[Server]] = None) -> None:
        await asyncio.gather(*(self.check(s) for s in (servers if servers is not None else self.servers)))

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_check_interval)
            try:
                await self.check_all()
            except Exception:  # noqa: BLE001 - the loop must go on
                logger.exception("health check round failed")

    def health(self) -> tuple[bool, dict]:
        groups = {"context_servers": self.context, "generation_servers": self.generation}
        body: dict[str, Any] = {name: [{"url": s.address, "healthy": s.healthy, "inflight": s.inflight,
                                        **({"error": s.last_error} if s.last_error else {})} for s in servers]
                                for name, servers in groups.items()}
        missing = [name for name, servers in groups.items() if not any(s.healthy for s in servers)]
        body = {"status": "unhealthy" if missing else "ok", **body}
        if missing:
            body["error"] = f"no healthy server among {' and '.join(missing)}"
        return not missing, body

    # ---- membership (/register, /unregister) ----------------------------------------------------------
    def _authorize(self, raw: Request) -> None:
        if self.key is None:
            raise APIError(503, "this orchestrator has no key (MESHSERVE_SECRET or a key file), so it takes no "
                           "registrations",
                           "server_error", None, "no_key")
        given = raw.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, f"Bearer {membership_token(self.key)}".encode()):
            raise APIError(401, "missing or wrong membership token: send `Authorization: Bearer <token>`, the token "
                           "being membership_token() of the orchestrator's key (MESHSERVE_SECRET or its key file; "
                           "docs/disaggregated.md)",
                           "invalid_request_error", None, "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def membership(self, raw: Request, join: bool) -> Response:
        """POST /register or /unregister {"url": "host:port", "role": "context" | "generation"}."""
        self._authorize(raw)
        body = decode_json_body(await self._read_body(raw))
        if not isinstance(body, dict):
            raise APIError(400, "expected a JSON object {\"url\": \"host:port\", \"role\": \"context\" or "
                           "\"generation\"}")
        unknown = [k for k in body if k not in ("url", "role")]
        if unknown:
            raise APIError(400, f"unknown key(s) {', '.join(map(str, unknown))}; accepted: url, role", param=unknown[0])
        role = body.get("role")
        if role not in ("context", "generation"):
            raise APIError(400, f"role={role!r}: expected \"context\" or \"generation\"", param="role")
        try:
            url = _url("/register" if join else "/unregister", "url", body.get("url"))
        except ConfigError as e:
            raise APIError(400, str(e), param="url") from None
        servers, router = self._group(role)
        target = Server(url, role).url
        existing = next((s for s in servers if s.url == target), None)
        if not join:
            if existing is None:
                raise APIError(404, f"no {role} server {url} is registered", param="url")
            servers.remove(existing)
            router.remove(existing)
            self.metrics.forget(existing)
            logger.info("%s server %s unregistered: no new requests go to it; %d in flight finish there", role,
                        existing.address, existing.inflight)
            return JSONResponse({"status": "unregistered", "role": role, "url": existing.address,
                                 "inflight": existing.inflight})
        if existing is not None:
            return JSONResponse({"status": "already registered", "role": role, "url": existing.address,
                                 "healthy": existing.healthy})
        server = Server(url, role)
        await self.check(server)  # it takes requests once /health answers 200 (now or at a later poll)
        existing = next((s for s in servers if s.url == target), None)  # registered meanwhile
        if existing is not None:
            return JSONResponse({"status": "already registered", "role": role, "url": existing.address,
                                 "healthy": existing.healthy})
        servers.append(server)
        router.add(server)
        logger.info("%s server %s registered (%s)", role, url, "healthy" if server.healthy else
                    f"not healthy yet: {server.last_error}")
        return JSONResponse({"status": "registered", "role": role, "url": url, "healthy": server.healthy})

    # ---- routing -------------------------------------------------------------------------------------
    async def _pick(self, role: str, tried: list[Server], body: dict, probed: list[bool]) -> Optional[Server]:
        """A healthy server of the group not tried yet; when the group has none at all, it is probed
        once first (concurrent requests share one probe)."""
        servers, router = self._group(role)
        candidates = [s for s in servers if s.healthy and s not in tried]
        if not candidates and not tried and not probed[0] and servers:
            probed[0] = True
            await self._probe(role, servers)
            candidates = [s for s in servers if s.healthy]
        return router.choose(candidates, body) if candidates else None

    async def _probe(self, role: str, servers: Sequence[Server]) -> None:
        """Health-check the group's servers now; concurrent callers share one probe."""
        probe = self._probes.get(role)
        if probe is None or probe.done():
            probe = self._probes[role] = asyncio.ensure_future(self.check_all(list(servers)))
        await asyncio.shield(probe)

    async def _require_healthy(self, role: str) -> None:
        """A 503 naming each server unless the group has a healthy server (probed once first when
        none is counted healthy)."""
        servers, _ = self._group(role)
        if servers and not any(s.healthy for s in servers):
            await self._probe(role, servers)
        if not any(s.healthy for s in servers):
            raise self._down(role, servers, {})

    async def _failover_target(self, exclude: list[Server], body: dict) -> Optional[Server]:
        """Where a failed generation goes on: a healthy generation server not in `exclude`, else (in
        a pinch) a healthy context server, which serves it as an ordinary request. When none is
        counted healthy, the others are probed once first: a health check missed on a loaded host
        must not end a stream that another server could carry on."""
        for attempt in range(2):
            for role in ("generation", "context"):
                servers, router = self._group(role)
                candidates = [s for s in servers if s.healthy and s not in exclude]
                if candidates:
                    return router.choose(candidates, body)
            others = [s for role in ("generation", "context") for s in self._group(role)[0] if s not in exclude]
            if attempt or not others:
                return None
            await self.check_all(others)
        return None

    @staticmethod
    def _down(role: str, servers: Sequence[Server], errors: dict) -> APIError:
        if not servers:
            return APIError(503, f"no {role} server is registered", "server_error", None, "no_healthy_server")
        reasons = "; ".join(f"{s.address}: {errors.get(s) or s.last_error or 'unhealthy'}" for s in servers)
        return APIError(503, f"no {role} server is available ({reasons})", "server_error", None,
                        "no_healthy_server")

    # ---- requests ------------------------------------------------------------------------------------
    async def handle(self, raw: Request, route: str) -> Response:
        arrival = time.perf_counter()
        rid = raw.headers.get("x-request-id") or uuid.uuid4().hex
        self.metrics.requests.labels(route).inc()
        try:
            body = await self._read_body(raw)
            response = await self._until_disconnect(raw, self._handle(body, raw.headers, route, rid, arrival))
        except APIError as err:
            response = JSONResponse(err.body(), status_code=err.status, headers=err.headers)
        if response is None:  # the client went away: the hop in progress was cancelled
            logger.info("request %s: the client went away; cancelled", rid)
            return Response(status_code=499)
        if response.status_code >= 400:
            self.metrics.errors.labels(str(response.status_code)).inc()
        if not isinstance(response, StreamingResponse):
            self.metrics.e2e.observe(time.perf_counter() - arrival)
        response.headers["X-Request-Id"] = rid
        return response

    @staticmethod
    async def _until_disconnect(raw: Request, work) -> Optional[Response]:
        """`work`'s response, or None when the client disconnects first (`work` is then cancelled,
        which closes its connection to the server: that server aborts the request)."""
        async def disconnected():
            while (await raw.receive())["type"] != "http.disconnect":
                pass

        task = asyncio.ensure_future(work)
        watcher = asyncio.ensure_future(disconnected())
        try:
            done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                return task.result()
            return None
        finally:
            watcher.cancel()
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task

    async def _handle(self, raw_body: bytes, client_headers, route: str, rid: str, arrival: float) -> Response:
        body = decode_json_body(raw_body)
        if not isinstance(body, dict):
            raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
        for key in ORCHESTRATOR_KEYS:
            if key in body:
                raise APIError(400, f"{key} is set by the orchestrator, not by clients; remove it", param=key)
        for key in ("n", "best_of"):
            value = body.get(key)
            if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
                value = int(value)  # the servers' pydantic takes "2" as 2
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 1:
                raise APIError(400, f"{key}={value}: disaggregated serving runs one sequence per request (the "
                               f"generation server decodes on from one context server's KV); accepted: 1, or "
                               f"send several requests", param=key)
        if body.get("use_beam_search") not in (None, False):
            raise APIError(400, f"use_beam_search={short_repr(body['use_beam_search'])}: beam search runs on one "
                           f"server (each round asks for one token of every beam), not through the disaggregated "
                           f"orchestrator; send it to a `meshserve serve` server", param="use_beam_search")
        if body.get("stream") is True and body.get("prompt_logprobs") is not None:
            # the generation server would refuse it, after the context server had prefilled and pinned the KV
            raise APIError(400, STREAMED_PROMPT_LOGPROBS, param="prompt_logprobs")
        headers = {"X-Request-Id": rid}
        if "authorization" in client_headers:  # the servers check the client's key (serve --api_key)
            headers["Authorization"] = client_headers["authorization"]

        # no generation server to hand the KV to: a 503 now, before a context server prefills and pins it
        await self._require_healthy("generation")
        # return_token_ids: the prompt's token ids, which a failover needs (a chat prompt is rendered there)
        ctx_body = {**body, "stream": False, "return_token_ids": True,
                    "disaggregated_params": {"request_type": "context_only"}}
        ctx_body.pop("stream_options", None)
        ctx = await self._context_hop(route, ctx_body, headers, rid)
        if isinstance(ctx, Response):
            return ctx
        prompt_ids, prompt_tokens = self._prompt_of(ctx, body.get("return_token_ids") is True)
        params = ctx.get("disaggregated_params")
        if not isinstance(params, dict) or not params.get("opaque_state"):
            choices = ctx.get("choices") or [{}]
            if all(isinstance(c, dict) and c.get("finish_reason") for c in choices):
                return self._finished_at_context(ctx, body, route)  # e.g. the first token was EOS
            raise APIError(502, "the context server answered without disaggregated_params (is "
                           "cache_transceiver_config in its --config?)", "server_error", None, "bad_upstream")
        gen_params = {k: v for k, v in params.items() if k != "request_type"}
        gen_body = {**body, "disaggregated_params": {"request_type": "generation_only", **gen_params}}
        if body.get("stream"):  # the token ids streamed so far are what a failover continues from
            gen_body["return_token_ids"] = True
        return await self._generation_hop(route, gen_body, headers, rid, arrival, body, prompt_ids, prompt_tokens)

    @staticmethod
    def _prompt_of(ctx: dict, want_ids: bool) -> tuple[Optional[list[int]], Optional[int]]:
        """The prompt's token ids and count from a context answer (return_token_ids), taken out of
        it unless the client asked for them."""
        choices = [c for c in ctx.get("choices") or () if isinstance(c, dict)]
        ids = _ints(ctx.get("prompt_token_ids"))  # chat: top level
        if ids is None and choices:
            ids = _ints(choices[0].get("prompt_token_ids"))  # completions: in the choice
        usage = ctx.get("usage")
        count = usage.get("prompt_tokens") if isinstance(usage, dict) else None
        count = count if isinstance(count, int) else (len(ids) if ids is not None else None)
        if not want_ids:
            ctx.pop("prompt_token_ids", None)
            for c in choices:
                c.pop("prompt_token_ids", None)
                c.pop("token_ids", None)
        return ids, count

    async def _context_hop(self, route: str, body: dict, headers: dict, rid: str):
        """The context answer's JSON, or a Response to hand the client as it is (a 4xx, a last 5xx)."""
        payload = msgspec.json.encode(body)
        headers = {**headers, "Content-Type": "application/json"}
        tried: list[Server] = []
        errors: dict[Server, str] = {}
        probed = [False]
        last: Optional[httpx.Response] = None  # the last 5xx, answered as it is when no server is left
        while True:
            server = await self._pick("context", tried, body, probed)
            if server is None:
                if last is not None:
                    return _passthrough(last)
                raise self._down("context", tried or self.context, errors)
            tried.append(server)
            server.inflight += 1
            start = time.perf_counter()
            try:
                r = await self.client.post(server.url + route, content=payload, headers=headers)
            except httpx.TimeoutException:
                self.metrics.failures.labels("context").inc()
                raise APIError(504, f"context server {server.address} did not answer in {self.request_timeout:g} s "
                               f"(meshserve disaggregated -t)", "server_error", None, "upstream_timeout") from None
            except httpx.HTTPError as e:
                self.metrics.failures.labels("context").inc()
                errors[server] = describe(e)
                if isinstance(e, (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError)):
                    self._set_health(server, False, errors[server])
                logger.warning("request %s: context server %s failed: %s", rid, server.address, errors[server])
                last = None
            else:
                if r.status_code == 200:
                    self.metrics.context.observe(time.perf_counter() - start)
                    try:
                        data = r.json()
                    except ValueError:
                        data = None
                    if not isinstance(data, dict):
                        raise APIError(502, f"context server {server.address} answered a body that is not a JSON "
                                       f"object", "server_error", None, "bad_upstream")
                    return data
                if r.status_code < 500:
                    return _passthrough(r)
                self.metrics.failures.labels("context").inc()
                errors[server] = f"answered {r.status_code}: {_one_line(r)}"
                logger.warning("request %s: context server %s %s", rid, server.address, errors[server])
                last = r
            finally:
                server.inflight -= 1
            if len(tried) > self.config.max_retries:
                if last is not None:
                    return _passthrough(last)
                raise APIError(503, f"the context stage failed on {len(tried)} server(s) (max_retries="
                               f"{self.config.max_retries}): " + "; ".join(f"{s.address}: {errors[s]}" for s in tried),
                               "server_error", None, "context_failed")
            self.metrics.retries.labels("context").inc()


# ---- the app -----------------------------------------------------------------------------------------
def build_app(orch: Orchestrator, cors: Optional[dict] = None) -> FastAPI:
    """The orchestrator's FastAPI app; its lifespan starts (HTTP client, health checks) and stops it.
    `cors`: CORSMiddleware's keywords (disaggregated --allowed_origins ...), None for none."""

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        await orch.start()
        try:
            yield
        finally:
            await orch.stop()

    app = FastAPI(title="meshserve disaggregated", version=meshserve.__version__, docs_url=None, redoc_url=None,
                  openapi_url=None, lifespan=lifespan)

    def error_response(err: APIError) -> JSONResponse:
        orch.metrics.errors.labels(str(err.status)).inc()
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, err: APIError):
        return error_response(err)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        return error_response(http_error(request, err.status_code, err.detail, err.headers))

    @app.exception_handler(Exception)
    async def _internal(_: Request, err: Exception):
        logger.exception("internal error")
        return error_response(APIError(500, f"internal server error: {type(err).__name__}: {err}", "server_error"))

    @app.post("/v1/completions")
    async def completions(raw: Request):
        return await orch.handle(raw, "/v1/completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(raw: Request):
        return await orch.handle(raw, "/v1/chat/completions")

    @app.get("/v1/models")
    async def models(raw: Request):
        return await list_models(orch, raw)

    @app.get("/v1/models/{model:path}")
    async def model_card(model: str, raw: Request):  # OpenAI's models.retrieve
        return await model_card_of(orch, raw, model)

    @app.post("/tokenize")
    async def tokenize(raw: Request):  # vLLM's; every server holds the model's tokenizer
        return await forward_to_one(orch, raw, "/tokenize")

    @app.post("/detokenize")
    async def detokenize(raw: Request):
        return await forward_to_one(orch, raw, "/detokenize")

    @app.post("/reset_prefix_cache")
    async def reset_prefix_caches(raw: Request):  # vLLM's, on every healthy server
        return await reset_prefix_cache(orch, raw)

    @app.post("/register")
    async def register(raw: Request):
        return await orch.membership(raw, join=True)

    @app.post("/unregister")
    async def unregister(raw: Request):
        return await orch.membership(raw, join=False)

    @app.get("/health")
    async def health():
        ok, body = orch.health()
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/version")
    async def version():
        return {"version": meshserve.__version__}

    @app.get("/metrics")
    async def metrics():
        return Response(orch.metrics.render(orch.servers), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(HeaderLimitMiddleware, limit=orch.max_request_header_bytes,
                       on_error=lambda status: orch.metrics.errors.labels(str(status)).inc())
    if cors:  # outermost: a preflight is answered here, and errors carry the headers too
        app.add_middleware(CORSMiddleware, **cors)
    return app
