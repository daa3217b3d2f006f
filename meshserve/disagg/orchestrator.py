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
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Optional, Sequence

import httpx
import msgspec
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

import meshserve
from meshserve.disagg.params import (CHALLENGE_HEADER, HOW_TO_SHARE, PROOF_HEADER, SECRET_FILE_ENV, default_key_file,
                                     key_from_secret, key_proof, read_key_file)
from meshserve.disagg.router import ROUTERS, Router, Server, create_router
from meshserve.serve.protocol import APIError, error_body

logger = logging.getLogger("meshserve.disagg")

SSE_DONE = b"data: [DONE]\n\n"


# ---- configuration -----------------------------------------------------------------------------------
class ConfigError(ValueError):
    """A one-line description of what is wrong in the orchestrator's YAML."""


@dataclass
class GroupConfig:
    urls: list[str]
    router: str = "round_robin"
    router_args: dict = field(default_factory=dict)


@dataclass
class DisaggConfig:
    context: GroupConfig
    generation: GroupConfig
    hostname: str = "localhost"
    port: int = 8000
    backend: str = "pytorch"
    max_retries: int = 1
    health_check_interval: float = 5.0
    health_check_timeout: float = 5.0
    max_failovers: int = 2
    stall_timeout: float = 30.0


# top-level key -> what it holds (the seed's keys, then TensorRT-LLM's max_retries, then ours)
TOP_KEYS = {
    "hostname": "address the orchestrator listens on (default localhost)",
    "port": "its port (default 8000)",
    "backend": "pytorch (the servers' backend; the only one)",
    "context_servers": "{num_instances, urls, router}",
    "generation_servers": "{num_instances, urls, router}",
    "max_retries": "times a failed context request is re-sent to another server (default 1)",
    "health_check_interval": "seconds between /health polls of every server (default 5)",
    "health_check_timeout": "seconds a /health poll may take (default 5)",
    "max_failovers": "times a request whose generation server failed is continued on another (default 2; 0: never)",
    "stall_timeout": "seconds a generation stream may go without a chunk before it is continued elsewhere (default 30)",
}
GROUP_KEYS = ("num_instances", "urls", "router")


def load_config(path: str) -> DisaggConfig:
    import yaml

    if not os.path.isfile(path):
        raise ConfigError(f"-c {path}: no such file")
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML: {problem}{where}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read it: {getattr(e, 'strerror', None) or e}") from None
    return parse_config(raw, path)


def _unknown(where: str, given, accepted: Sequence[str]) -> None:
    unknown = [k for k in given if k not in accepted]
    if unknown:
        raise ConfigError(f"{where}: unknown key{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(map(str, unknown))}; accepted: {', '.join(accepted)}")


def _int(where: str, name: str, value, lo: int, hi: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        bound = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ConfigError(f"{where}: {name}={value!r}: expected an integer {bound}")
    return value


def _seconds(where: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"{where}: {name}={value!r}: expected a number of seconds > 0")
    return float(value)


def _url(where: str, name: str, value) -> str:
    text = value if isinstance(value, str) else ""
    rest = text.split("://", 1)[1] if "://" in text else text
    host, sep, port = rest.rstrip("/").rpartition(":")
    if not (sep and host and port.isdigit() and 0 < int(port) < 65536) or "/" in rest.rstrip("/"):
        raise ConfigError(f"{where}: {name}={value!r}: expected \"host:port\" (or \"http://host:port\")")
    return text.rstrip("/")


def _group(where: str, name: str, raw) -> GroupConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: {name} must be a mapping with {', '.join(GROUP_KEYS)}, got {raw!r}")
    _unknown(f"{where}: {name}", raw, GROUP_KEYS)
    urls = raw.get("urls")
    if not isinstance(urls, list) or not urls:
        raise ConfigError(f"{where}: {name}.urls={urls!r}: expected a list of \"host:port\" (one per server)")
    urls = [_url(where, f"{name}.urls[{i}]", u) for i, u in enumerate(urls)]
    if len(set(urls)) != len(urls):
        raise ConfigError(f"{where}: {name}.urls lists a server twice: {urls}")
    n = raw.get("num_instances", len(urls))
    _int(where, f"{name}.num_instances", n, 1)
    if n != len(urls):
        raise ConfigError(f"{where}: {name}.num_instances={n} but {name}.urls lists {len(urls)} server(s)")
    router = raw.get("router") or {}
    if not isinstance(router, dict):
        raise ConfigError(f"{where}: {name}.router must be a mapping such as {{type: round_robin}}, got {router!r}")
    router = dict(router)
    kind = router.pop("type", "round_robin")
    if kind not in ROUTERS:
        raise ConfigError(f"{where}: {name}.router.type={kind!r}; accepted: {', '.join(ROUTERS)}")
    spec = ROUTERS[kind].ARGS
    _unknown(f"{where}: {name}.router ({kind})", router, ["type", *spec])
    for arg, value in router.items():
        _int(where, f"{name}.router.{arg}", value, 1)
    return GroupConfig(urls, kind, router)


def parse_config(raw, where: str = "the config") -> DisaggConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of {', '.join(TOP_KEYS)}, got {type(raw).__name__}")
    _unknown(where, raw, list(TOP_KEYS))
    for name in ("context_servers", "generation_servers"):
        if name not in raw:
            raise ConfigError(f"{where}: {name} is required ({TOP_KEYS[name]})")
    cfg = DisaggConfig(_group(where, "context_servers", raw["context_servers"]),
                       _group(where, "generation_servers", raw["generation_servers"]))
    hostname = raw.get("hostname", cfg.hostname)
    if not isinstance(hostname, str) or not hostname:
        raise ConfigError(f"{where}: hostname={hostname!r}: expected an address such as localhost or 0.0.0.0")
    cfg.hostname = hostname
    cfg.port = _int(where, "port", raw.get("port", cfg.port), 0, 65535)
    backend = raw.get("backend", cfg.backend)
    if backend != "pytorch":
        raise ConfigError(f"{where}: backend={backend!r}; accepted: pytorch")
    cfg.max_retries = _int(where, "max_retries", raw.get("max_retries", cfg.max_retries), 0)
    cfg.max_failovers = _int(where, "max_failovers", raw.get("max_failovers", cfg.max_failovers), 0)
    for name in ("health_check_interval", "health_check_timeout", "stall_timeout"):
        setattr(cfg, name, _seconds(where, name, raw.get(name, getattr(cfg, name))))
    return cfg


# ---- metrics -----------------------------------------------------------------------------------------
_HOP_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0, 160.0, 640.0)
_TOKEN_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                  1.0, 2.5, 5.0, 10.0)


class DisaggMetrics:
    """The orchestrator's Prometheus metrics, in a registry of its own."""

    def __init__(self):
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter("meshserve_disagg_requests", "Requests received, by route", ["route"], registry=r)
        self.errors = Counter("meshserve_disagg_request_errors", "Requests answered with an error, by HTTP status "
                              "(the servers' errors passed on included)", ["status"], registry=r)
        self.retries = Counter("meshserve_disagg_retries", "Requests re-sent to another server after a failure, "
                               "by stage", ["stage"], registry=r)
        self.failures = Counter("meshserve_disagg_failures", "Server hops that failed (connection error, timeout, "
                                "5xx, a stream cut short or stalled), retried or not, by stage", ["stage"], registry=r)
        self.failovers = Counter("meshserve_disagg_failovers", "Requests whose generation server failed (died, "
                                 "stalled past stall_timeout, or sent a 5xx error event) continued on another "
                                 "server", registry=r)
        self.context = Histogram("meshserve_disagg_context_seconds", "Context hop: from sending the context-only "
                                 "request to its answer (prefill + first token: the context TTFT)",
                                 buckets=_HOP_BUCKETS, registry=r)
        self.gen_first_byte = Histogram("meshserve_disagg_generation_first_byte_seconds", "Generation hop: from "
                                        "sending the generation-only request to the first body bytes (KV transfer "
                                        "+ first chunk; a non-streaming answer: all of it)", buckets=_HOP_BUCKETS,
                                        registry=r)
        self.gen_tpot = Histogram("meshserve_disagg_generation_tpot_seconds", "Mean time between output tokens "
                                  "of a streamed generation (tokens from usage when the client asked for it, else "
                                  "one per content chunk)", buckets=_TOKEN_BUCKETS, registry=r)
        self.ttft = Histogram("meshserve_disagg_time_to_first_token_seconds", "Streamed requests: from arrival to "
                              "the first generated chunk passed on", buckets=_HOP_BUCKETS, registry=r)
        self.e2e = Histogram("meshserve_disagg_request_seconds", "From arrival to the last byte answered",
                             buckets=_HOP_BUCKETS, registry=r)
        self.healthy = Gauge("meshserve_disagg_server_healthy", "1 while the server answers /health, else 0",
                             ["role", "server"], registry=r)
        self.inflight = Gauge("meshserve_disagg_server_inflight", "Requests this orchestrator has open on the "
                              "server", ["role", "server"], registry=r)

    def forget(self, server: Server) -> None:
        """A server that left (/unregister): its gauges go."""
        for gauge in (self.healthy, self.inflight):
            with contextlib.suppress(KeyError):
                gauge.remove(server.role, server.address)

    def render(self, servers: Sequence[Server]) -> bytes:
        for s in servers:
            self.healthy.labels(s.role, s.address).set(1 if s.healthy else 0)
            self.inflight.labels(s.role, s.address).set(s.inflight)
        return generate_latest(self.registry)


# ---- the orchestrator --------------------------------------------------------------------------------
def describe(err: BaseException) -> str:
    """A transport error in a few words."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    if isinstance(err, httpx.ConnectError):
        return f"cannot connect ({text or 'connection refused'})"
    if isinstance(err, httpx.TimeoutException):
        return f"no answer in time ({type(err).__name__})"
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _one_line(r: httpx.Response) -> str:
    """A server's error answer in one line: its OpenAI error message, else the start of its body."""
    try:
        message = r.json()["error"]["message"]
    except Exception:  # noqa: BLE001 - any body
        message = r.text
    message = " ".join(str(message).split())
    return message[:300] if message else "(empty body)"


def _passthrough(r: httpx.Response, content: Optional[bytes] = None) -> Response:
    """A server's (error) answer as it came."""
    headers = {k: r.headers[k] for k in ("retry-after", "www-authenticate") if k in r.headers}
    return Response(content if content is not None else r.content, status_code=r.status_code, headers=headers,
                    media_type=r.headers.get("content-type", "application/json"))


class SSEResponse(StreamingResponse):
    """Always closes its generator (and runs `on_close`, which a generator that never started would
    skip), so a client that went away closes the upstream stream at once: the generation server then
    aborts the request."""

    def __init__(self, content, on_close=None, **kwargs):
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            if self.on_close is not None:
                await self.on_close()


def _sse(obj) -> bytes:
    return b"data: " + msgspec.json.encode(obj) + b"\n\n"


class StreamMeter:
    """Counts a streamed answer's content chunks (and reads usage) as the bytes pass, for TTFT/TPOT."""

    def __init__(self):
        self.buffer = b""
        self.first: Optional[float] = None  # time of the first chunk with content
        self.last: Optional[float] = None
        self.chunks = 0
        self.usage_tokens: Optional[int] = None

    def feed(self, data: bytes, now: float) -> None:
        self.buffer += data
        *events, self.buffer = self.buffer.split(b"\n\n")
        for event in events:
            if not event.startswith(b"data: ") or event == SSE_DONE[:-2]:
                continue
            try:
                obj = msgspec.json.decode(event[6:])
            except msgspec.DecodeError:
                continue
            if not isinstance(obj, dict):
                continue
            usage = obj.get("usage")
            if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
                self.usage_tokens = usage["completion_tokens"]
            for choice in obj.get("choices") or ():
                delta = choice.get("delta") if isinstance(choice, dict) else None
                text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
                if text:
                    self.chunks += 1
                    self.first = self.first if self.first is not None else now
                    self.last = now
                    break

    def tpot(self) -> Optional[float]:
        tokens = self.usage_tokens if self.usage_tokens is not None else self.chunks
        if self.first is None or tokens < 2 or self.last <= self.first:
            return None
        return (self.last - self.first) / (tokens - 1)


# ---- failover ----------------------------------------------------------------------------------------
# What a resumed request keeps of the client's body: the sampling settings (its prompt is token ids;
# max_tokens, min_tokens and the stream settings are set anew; chat-only fields have done their work).
RESUME_KEYS = ("model", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids", "presence_penalty",
               "frequency_penalty", "repetition_penalty", "logit_bias", "ignore_eos", "include_stop_str_in_output",
               "skip_special_tokens", "spaces_between_special_tokens", "user")
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # the servers' (OpenAI's) default for /v1/completions
ORCHESTRATOR_KEYS = ("disaggregated_params", "resume_output_token_ids")  # set by the orchestrator, never by clients


class UpstreamFailed(Exception):
    """A generation server failed mid-answer (the reason in a few words)."""


async def _within(seconds: float, awaitable):
    if hasattr(asyncio, "timeout"):  # 3.11: no task per call
        async with asyncio.timeout(seconds):
            return await awaitable
    return await asyncio.wait_for(awaitable, seconds)


def _ints(value) -> Optional[list[int]]:
    if isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        return value
    return None


class StreamRelay:
    """One client's stream across the servers that generate it.

    It remembers what reached the client (the output's token ids and text, the first event's
    id/created/model, whether the chat role chunk, a finish_reason and the usage chunk went out) and
    turns each upstream event into the client's: token ids stripped unless the client asked for
    them (`return_token_ids`), a chunk left with nothing to say dropped, and after a failover the
    text the client already has skipped (the resumed server answers the whole output's text), the
    first stream's id/created/model kept, usage counted as one run, and a resumed completion's
    chunks turned into chat chunks for a chat client."""

    def __init__(self, chat: bool, want_ids: bool):
        self.chat = chat
        self.want_ids = want_ids
        self.object = "chat.completion.chunk" if chat else "text_completion"
        self.head: Optional[tuple] = None  # (id, created, model) of the client's stream
        self.ids: list[int] = []  # the output's token ids the client has
        self.ids_known = True  # every piece of text relayed came with its token ids
        self.single = True  # one choice (index 0): what can be resumed
        self.parts: list[str] = []  # the output's text the client has
        self.length = 0
        self.role_sent = self.finished = self.usage_sent = self.prompt_ids_sent = False
        self.aborted = False  # the upstream ended the output with finish_reason "abort" (not the client's doing)
        # the upstream now relayed
        self.chat_upstream = chat  # its events are chat chunks
        self.skip = 0  # characters of its text the client already has
        self.skipped: list[str] = []
        self.given = 0  # output tokens it was given back: its usage counts them as prompt
        self.diverged: Optional[str] = None  # set when a resumed server's text does not start as the client's

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def can_resume(self) -> bool:
        return self.ids_known and self.single and not self.finished

    def resume(self, chat_upstream: bool, given: int) -> None:
        """Another upstream takes over: a completion given back the `given` output tokens the client
        has (0: the client's own request sent again, nothing having reached the client)."""
        self.chat_upstream, self.given = chat_upstream, given
        self.skip, self.skipped = self.length, []

    def _fix_usage(self, usage):
        if not (self.given and isinstance(usage, dict) and isinstance(usage.get("prompt_tokens"), int)
                and isinstance(usage.get("completion_tokens"), int)):
            return usage
        return {**usage, "prompt_tokens": usage["prompt_tokens"] - self.given,
                "completion_tokens": usage["completion_tokens"] + self.given}

    def feed(self, obj) -> Optional[list]:
        """The client's events for one upstream event (decoded JSON): None to relay its bytes as
        they are, else the events to send (maybe none). Raises UpstreamFailed for a 5xx error event
        (the server's engine died or failed)."""
        if not isinstance(obj, dict):
            return None
        err = obj.get("error")
        if isinstance(err, dict):
            code = err.get("code")
            if (isinstance(code, int) and code >= 500) or (code is None and err.get("type") == "server_error"):
                raise UpstreamFailed(f"it sent an error event: {' '.join(str(err.get('message')).split())[:200]}")
            return None
        choices = obj.get("choices")
        if not isinstance(choices, list):
            return None
        if self.head is None:
            self.head = (obj.get("id"), obj.get("created"), obj.get("model"))
        changed = (obj.get("id"), obj.get("created"), obj.get("model")) != self.head or obj.get("object") != self.object
        keep_top = "prompt_token_ids" in obj and self.want_ids and not self.prompt_ids_sent  # chat: the first chunk's
        changed = changed or ("prompt_token_ids" in obj and not keep_top)
        before: list[dict] = []  # a role chunk a resumed completion's first chunk needs in front of it
        kept = []
        for c in choices:
            if not isinstance(c, dict):
                kept.append(c)
                continue
            if c.get("index", 0) != 0:
                self.single = False
            c = dict(c)
            text = _text_of(c, self.chat_upstream)
            text = text if isinstance(text, str) else ""
            cut = False
            if self.skip and text:
                n = min(self.skip, len(text))
                self.skipped.append(text[:n])
                text, self.skip, cut = text[n:], self.skip - n, True
                if not self.skip and "".join(self.skipped) != self.text:
                    self.diverged = "".join(self.skipped)
            ids = _ints(c.get("token_ids"))
            if ids is not None:
                self.ids.extend(ids)
            elif text:
                self.ids_known = False
            if text:
                self.parts.append(text)
                self.length += len(text)
            finish = c.get("finish_reason")
            if finish == "abort":  # the server gave up on it (the client is still here): a failure, not an end
                self.aborted, finish, c["finish_reason"], changed = True, None, None, True
                c.pop("stop_reason", None)
            if finish is not None:
                self.finished = True
            if "prompt_token_ids" in c and (not self.want_ids or self.prompt_ids_sent):
                del c["prompt_token_ids"]
                changed = True
            if "token_ids" in c and not self.want_ids:
                del c["token_ids"]
                changed = True
            role = False
            if self.chat and self.chat_upstream:
                delta = dict(c.get("delta") or {})
                if "role" in delta and self.role_sent:
                    delta.pop("role")
                    if not delta.get("content"):
                        delta.pop("content", None)
                    changed = True
                elif "role" in delta:
                    self.role_sent = role = True
                if cut:
                    delta = {k: v for k, v in delta.items() if k != "content"}
                    if text:
                        delta["content"] = text
                    changed = True
                c["delta"] = delta
            elif self.chat:  # a resumed completion, for a chat client
                if not self.role_sent:
                    self.role_sent = True
                    before.append({"id": self.head[0], "object": self.object, "created": self.head[1],
                                   "model": self.head[2], "choices": [{"index": 0, "delta": {
                                       "role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]})
                    if "usage" in obj:
                        before[-1]["usage"] = None
                c = {"index": c.get("index", 0), "delta": {"content": text} if text else {}, "logprobs": None,
                     "finish_reason": finish, "stop_reason": c.get("stop_reason"),
                     **({"token_ids": ids} if self.want_ids and ids is not None else {})}
                changed = True
            elif cut:
                c["text"] = text
                changed = True
            if not (text or role or finish is not None or c.get("logprobs") or (self.want_ids and ids)):
                changed = True  # nothing to say any more (token ids only, or text the client has)
                continue
            if "prompt_token_ids" in c:
                self.prompt_ids_sent = True
            kept.append(c)
        if choices and not kept:
            return before
        if not choices and "usage" in obj:
            self.usage_sent = True
        if keep_top:
            self.prompt_ids_sent = True
        if self.given and isinstance(obj.get("usage"), dict):
            changed = True
        if not changed:
            return None
        event = {"id": self.head[0], "object": self.object, "created": self.head[1], "model": self.head[2],
                 "choices": kept}
        for k, v in obj.items():
            if k in event or (k == "prompt_token_ids" and not keep_top):
                continue
            event[k] = self._fix_usage(v) if k == "usage" else v
        return before + [event]


def _text_of(choice: dict, chat: bool):
    if chat:
        delta = choice.get("delta")
        return delta.get("content") if isinstance(delta, dict) else None
    return choice.get("text")


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


class Orchestrator:
    def __init__(self, config: DisaggConfig, request_timeout: float = 180.0,
                 metrics: Optional[DisaggMetrics] = None, key: Optional[bytes] = None):
        self.config = config
        self.request_timeout = float(request_timeout)
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
        try:
            body = msgspec.json.decode(await raw.body())
        except msgspec.DecodeError as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from None
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
            probe = self._probes.get(role)
            if probe is None or probe.done():
                probe = self._probes[role] = asyncio.ensure_future(self.check_all(list(servers)))
            await asyncio.shield(probe)
            candidates = [s for s in servers if s.healthy]
        return router.choose(candidates, body) if candidates else None

    async def _failover_target(self, exclude: list[Server], body: dict) -> Optional[Server]:
        """Where a failed generation goes on: a healthy generation server not in `exclude`, else (in
        a pinch) a healthy context server, which serves it as an ordinary request."""
        for role in ("generation", "context"):
            servers, router = self._group(role)
            candidates = [s for s in servers if s.healthy and s not in exclude]
            if candidates:
                return router.choose(candidates, body)
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
            response = await self._until_disconnect(raw, self._handle(await raw.body(), raw.headers, route, rid,
                                                                      arrival))
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
        try:
            body = msgspec.json.decode(raw_body)
        except msgspec.DecodeError as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
        for key in ORCHESTRATOR_KEYS:
            if key in body:
                raise APIError(400, f"{key} is set by the orchestrator, not by clients; remove it", param=key)
        headers = {"X-Request-Id": rid}
        if "authorization" in client_headers:  # the servers check the client's key (serve --api_key)
            headers["Authorization"] = client_headers["authorization"]

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

    # ---- the generation hop, and failover -----------------------------------------------------------
    async def _generation_hop(self, route: str, body: dict, headers: dict, rid: str, arrival: float,
                              client_body: dict, prompt_ids: Optional[list[int]],
                              prompt_tokens: Optional[int]) -> Response:
        stream = bool(client_body.get("stream"))
        payload = msgspec.json.encode(body)
        headers = {**headers, "Content-Type": "application/json"}
        tried: list[Server] = []  # servers this request went to (a failover goes elsewhere)
        errors: dict[Server, str] = {}
        probed = [False]
        failovers = 0
        while True:
            server = await self._pick("generation", tried, body, probed)
            if server is None:
                raise self._down("generation", tried or self.generation, errors)
            tried.append(server)
            server.inflight += 1
            start = time.perf_counter()
            request = self.client.build_request("POST", server.url + route, content=payload, headers=headers)
            try:
                r = await self.client.send(request, stream=stream)
            except httpx.ConnectError as e:  # never reached the server: another one may take it
                server.inflight -= 1
                self.metrics.failures.labels("generation").inc()
                errors[server] = describe(e)
                self._set_health(server, False, errors[server])
                logger.warning("request %s: generation server %s failed: %s", rid, server.address, errors[server])
                if len(tried) > self.config.max_retries:
                    raise self._down("generation", tried, errors) from None
                self.metrics.retries.labels("generation").inc()
                continue
            except httpx.HTTPError as e:  # it had the request and failed before answering: start again elsewhere
                server.inflight -= 1
                self.metrics.failures.labels("generation").inc()
                reason = describe(e)
                timeout = isinstance(e, httpx.TimeoutException)
                self._set_health(server, False, reason)
                logger.warning("request %s: generation server %s failed before answering: %s", rid, server.address,
                               reason)
                moved = f"max_failovers={self.config.max_failovers}"
                if self.config.max_failovers > 0:
                    failovers = 1
                    moved = await self._failover(route, client_body, headers, rid, stream, tried, [], prompt_ids)
                if isinstance(moved, str):
                    raise APIError(504 if timeout else 502, f"generation server {server.address} failed: {reason}; "
                                   f"not continued elsewhere: {moved}", "server_error", None,
                                   "upstream_timeout" if timeout else "bad_upstream") from None
                server, r = moved
                start = time.perf_counter()
            except BaseException:  # cancelled (the client went away)
                server.inflight -= 1
                raise
            break
        if not stream or r.status_code != 200:
            try:
                content = await r.aread()
            except httpx.HTTPError as e:
                self.metrics.failures.labels("generation").inc()
                raise APIError(502, f"generation server {server.address} failed: {describe(e)}", "server_error",
                               None, "bad_upstream") from None
            finally:
                server.inflight -= 1
                await r.aclose()
            if r.status_code >= 500:
                self.metrics.failures.labels("generation").inc()
            if r.status_code == 200:
                self.metrics.gen_first_byte.observe(time.perf_counter() - start)
                if b'"disaggregated_params"' in content:
                    data = msgspec.json.decode(content)
                    data.pop("disaggregated_params", None)
                    content = msgspec.json.encode(data)
            return _passthrough(r, content)
        return self._stream(route, client_body, headers, rid, arrival, start, server, r, tried, failovers,
                            prompt_ids, prompt_tokens)

    def _stream(self, route: str, client_body: dict, headers: dict, rid: str, arrival: float, start: float,
                server: Server, r: httpx.Response, tried: list[Server], failovers: int,
                prompt_ids: Optional[list[int]], prompt_tokens: Optional[int]) -> Response:
        """The client's SSE stream: the generation server's events as StreamRelay rewrites them; when
        that server dies, stalls past stall_timeout or sends a 5xx error event, the output so far
        goes to another server (`_failover`) and the stream goes on from there."""
        chat = route.endswith("chat/completions")
        relay = StreamRelay(chat, client_body.get("return_token_ids") is True)
        opts = client_body.get("stream_options")
        include_usage = bool(isinstance(opts, dict) and opts.get("include_usage"))
        meter = StreamMeter()
        upstream: list = [server, r]
        closed = []

        async def release() -> None:  # the upstream now relayed
            s, resp = upstream
            if s is None:
                return
            upstream[0] = None
            s.inflight -= 1
            await resp.aclose()

        async def close() -> None:  # once, whether the stream ran, broke or never started
            if closed:
                return
            closed.append(True)
            await release()
            tpot = meter.tpot()
            if tpot is not None:
                self.metrics.gen_tpot.observe(tpot)
            self.metrics.e2e.observe(time.perf_counter() - arrival)

        def end(finish: Optional[str] = None) -> bytes:
            """What a stream that has all its tokens still owes the client: a finish_reason, usage, [DONE]."""
            out = b""
            head = relay.head or (None, int(time.time()), client_body.get("model"))
            if finish is not None:
                choice = {"index": 0, "delta": {}} if chat else {"index": 0, "text": ""}
                out += _sse({"id": head[0], "object": relay.object, "created": head[1], "model": head[2],
                             "choices": [{**choice, "logprobs": None, "finish_reason": finish, "stop_reason": None}],
                             **({"usage": None} if include_usage else {})})
            if include_usage and not relay.usage_sent and prompt_tokens is not None:
                out += _sse({"id": head[0], "object": relay.object, "created": head[1], "model": head[2],
                             "choices": [], "usage": {"prompt_tokens": prompt_tokens,
                                                      "completion_tokens": len(relay.ids),
                                                      "total_tokens": prompt_tokens + len(relay.ids)}})
            return out + SSE_DONE

        async def events() -> AsyncIterator[bytes]:
            nonlocal failovers
            first = True
            try:
                while True:
                    current = upstream[0]
                    try:
                        async with contextlib.aclosing(self._events(upstream[1])) as stream_events:
                            async for event in stream_events:
                                now = time.perf_counter()
                                if first:
                                    first = False
                                    self.metrics.gen_first_byte.observe(now - start)
                                if event == SSE_DONE[:-2]:
                                    break
                                out = None
                                if event.startswith(b"data: "):
                                    try:
                                        obj = msgspec.json.decode(event[6:])
                                    except msgspec.DecodeError:
                                        obj = None
                                    out = relay.feed(obj)
                                data = event + b"\n\n" if out is None else b"".join(map(_sse, out))
                                if data:
                                    had = meter.first
                                    meter.feed(data, now)
                                    if had is None and meter.first is not None:
                                        self.metrics.ttft.observe(now - arrival)
                                    yield data
                                if relay.aborted:
                                    relay.aborted = False
                                    raise UpstreamFailed("it aborted the request (finish_reason abort)")
                            else:
                                raise UpstreamFailed("its stream ended before [DONE]")
                        if relay.diverged is not None:
                            logger.warning("request %s: the text of %s server %s did not start with the text the "
                                           "client had", rid, current.role, current.address)
                        yield SSE_DONE
                        return
                    except (httpx.HTTPError, UpstreamFailed) as e:
                        reason = describe(e) if isinstance(e, httpx.HTTPError) else str(e)
                    self.metrics.failures.labels("generation").inc()
                    self._set_health(current, False, f"failed mid-stream: {reason}")
                    await release()
                    if relay.finished:  # it had sent every token: only usage or [DONE] was missing
                        yield end()
                        return
                    why_not = None
                    if failovers >= self.config.max_failovers:
                        why_not = f"max_failovers={self.config.max_failovers} reached"
                    elif not relay.can_resume():
                        why_not = "its stream carried no token ids to continue from"
                    elif relay.ids and prompt_ids is None:
                        why_not = "the context server did not answer the prompt's token ids"
                    elif relay.ids and client_body.get("echo"):
                        why_not = "a stream with echo is not resumed"
                    remaining = self._remaining(route, client_body, len(relay.ids))
                    if why_not is None and remaining is not None and remaining <= 0:
                        yield end("length")
                        return
                    moved = why_not
                    if why_not is None:
                        failovers += 1
                        logger.warning("request %s: %s server %s failed mid-stream after %d tokens: %s; continuing "
                                       "elsewhere", rid, current.role, current.address, len(relay.ids), reason)
                        moved = await self._failover(route, client_body, headers, rid, True, tried, relay.ids,
                                                     prompt_ids)
                    if isinstance(moved, str):
                        logger.warning("request %s: %s server %s failed mid-stream: %s; not continued: %s", rid,
                                       current.role, current.address, reason, moved)
                        yield _sse(error_body(f"generation server {current.address} failed mid-stream: {reason}; "
                                              f"not continued elsewhere: {moved}", "server_error", None, 502))
                        yield SSE_DONE
                        return
                    upstream[:] = moved
                    new_server, new_r = moved
                    if new_r.status_code != 200:
                        with contextlib.suppress(httpx.HTTPError):
                            await new_r.aread()
                        await release()
                        yield _sse(error_body(f"generation server {current.address} failed mid-stream: {reason}; "
                                              f"{new_server.address} refused to continue: {new_r.status_code} "
                                              f"{_one_line(new_r)}", "server_error", None, 502))
                        yield SSE_DONE
                        return
                    relay.resume(chat_upstream=chat and not relay.ids, given=len(relay.ids))
            finally:
                await close()

        return SSEResponse(events(), media_type="text/event-stream", on_close=close)

    async def _events(self, r: httpx.Response) -> AsyncIterator[bytes]:
        """A streamed answer's SSE events (without the blank line ending each); UpstreamFailed when
        no bytes come for stall_timeout seconds."""
        stall = self.config.stall_timeout
        chunks = r.aiter_bytes().__aiter__()
        buffer = b""
        while True:
            try:
                data = await _within(stall, chunks.__anext__())
            except StopAsyncIteration:
                return
            except asyncio.TimeoutError:
                raise UpstreamFailed(f"no chunk in {stall:g} s (stall_timeout)") from None
            buffer += data
            if b"\n\n" in buffer:
                *events, buffer = buffer.split(b"\n\n")
                for event in events:
                    if event:
                        yield event

    @staticmethod
    def _remaining(route: str, client_body: dict, produced: int) -> Optional[int]:
        """max_tokens left after `produced` tokens (None: up to the context, chat without a limit)."""
        limit = client_body.get("max_completion_tokens")
        limit = limit if limit is not None else client_body.get("max_tokens")
        if limit is None and not route.endswith("chat/completions"):
            limit = COMPLETIONS_DEFAULT_MAX_TOKENS
        return limit - produced if isinstance(limit, int) and not isinstance(limit, bool) else None

    def _resume_body(self, route: str, client_body: dict, prompt_ids: list[int], ids: list[int]) -> dict:
        """The /v1/completions request that continues an output: the prompt's token ids, the output's
        (`resume_output_token_ids`: the server prefills both and decodes the latter as output), the
        client's sampling settings, and the limits less what is done."""
        body = {k: client_body[k] for k in RESUME_KEYS if k in client_body}
        remaining = self._remaining(route, client_body, len(ids))
        if remaining is not None:
            body["max_tokens"] = remaining
        min_tokens = client_body.get("min_tokens")
        if isinstance(min_tokens, int) and min_tokens > 0:
            body["min_tokens"] = max(0, min_tokens - len(ids))
        body.update(prompt=list(prompt_ids), resume_output_token_ids=list(ids), return_token_ids=True, stream=True)
        opts = client_body.get("stream_options")
        if isinstance(opts, dict) and opts:
            body["stream_options"] = opts
        return body

    async def _failover(self, route: str, client_body: dict, headers: dict, rid: str, stream: bool,
                        exclude: list[Server], ids: list[int], prompt_ids: Optional[list[int]]):
        """Send a request whose generation server failed to another server: with `ids` (the output
        the client has) a resumed completion (`_resume_body`), else the client's request as it came.
        Returns (server, response) once one answered (any status), or why none did (a string)."""
        if ids:
            path, body = "/v1/completions", self._resume_body(route, client_body, prompt_ids, ids)
        else:
            path, body = route, dict(client_body)
            if stream:
                body["return_token_ids"] = True
        payload = msgspec.json.encode(body)
        errors: list[str] = []
        while True:
            server = await self._failover_target(exclude, body)
            if server is None:
                return "no other server is available" + (f" ({'; '.join(errors)})" if errors else "")
            exclude.append(server)
            server.inflight += 1
            request = self.client.build_request("POST", server.url + path, content=payload, headers=headers)
            try:
                r = await self.client.send(request, stream=stream)
            except httpx.HTTPError as e:
                server.inflight -= 1
                self.metrics.failures.labels("failover").inc()
                errors.append(f"{server.address}: {describe(e)}")
                self._set_health(server, False, describe(e))
                self.metrics.retries.labels("failover").inc()
                continue
            except BaseException:
                server.inflight -= 1
                raise
            if r.status_code >= 500:
                with contextlib.suppress(httpx.HTTPError):
                    await r.aread()
                server.inflight -= 1
                await r.aclose()
                self.metrics.failures.labels("failover").inc()
                errors.append(f"{server.address}: answered {r.status_code}: {_one_line(r)}")
                self.metrics.retries.labels("failover").inc()
                continue
            self.metrics.failovers.inc()
            logger.warning("request %s: continued on %s server %s%s", rid, server.role, server.address,
                           f" from output token {len(ids)}" if ids else " from the start")
            return [server, r]

    def _finished_at_context(self, ctx: dict, body: dict, route: str) -> Response:
        """The context answer is the whole completion (it finished on its first token)."""
        ctx.pop("disaggregated_params", None)
        if not body.get("stream"):
            return JSONResponse(ctx)
        chat = route.endswith("chat/completions")
        opts = body.get("stream_options") or {}
        include_usage = bool(isinstance(opts, dict) and opts.get("include_usage"))
        head = {"id": ctx.get("id"), "object": "chat.completion.chunk" if chat else "text_completion",
                "created": ctx.get("created", int(time.time())), "model": ctx.get("model")}
        extra = {"usage": None} if include_usage else {}
        events = []
        for c in ctx.get("choices") or ():
            end = {"finish_reason": c.get("finish_reason"), "stop_reason": c.get("stop_reason"),
                   **({"token_ids": c["token_ids"]} if "token_ids" in c else {})}  # the client's return_token_ids
            if chat:
                text = (c.get("message") or {}).get("content") or ""
                events.append({**head, "choices": [{"index": c.get("index", 0), "delta": {"role": "assistant",
                               "content": ""}, "logprobs": None, "finish_reason": None}], **extra})
                delta = {"content": text} if text else {}
                events.append({**head, "choices": [{"index": c.get("index", 0), "delta": delta,
                               "logprobs": c.get("logprobs"), **end}], **extra})
            else:
                events.append({**head, "choices": [{"index": c.get("index", 0), "text": c.get("text", ""),
                               "logprobs": c.get("logprobs"), **end,
                               **({"prompt_token_ids": c["prompt_token_ids"]} if "prompt_token_ids" in c else {})}],
                               **extra})
        if include_usage and ctx.get("usage"):
            events.append({**head, "choices": [], "usage": ctx["usage"]})

        async def gen():
            for e in events:
                yield _sse(e)
            yield SSE_DONE

        return SSEResponse(gen(), media_type="text/event-stream")

    async def models(self, raw: Request) -> Response:
        """The union of the healthy servers' /v1/models (generation servers first)."""
        headers = {"Authorization": raw.headers["authorization"]} if "authorization" in raw.headers else {}
        servers = [s for s in self.generation + self.context if s.healthy]
        if not servers:
            raise APIError(503, "no server is available to list the models", "server_error", None,
                           "no_healthy_server")

        async def ask(s: Server):
            try:
                return await self.client.get(s.url + "/v1/models", headers=headers, timeout=10.0)
            except httpx.HTTPError as e:
                return e

        answers = await asyncio.gather(*(ask(s) for s in servers))
        data, seen, errors = [], set(), []
        for s, a in zip(servers, answers):
            if isinstance(a, httpx.Response) and a.status_code == 200:
                try:
                    listed = [m for m in a.json().get("data", []) if isinstance(m, dict)]
                except (ValueError, AttributeError):
                    errors.append(f"{s.address}: /v1/models answered something else than a list of models")
                    continue
                for m in listed:
                    if m.get("id") not in seen:
                        seen.add(m.get("id"))
                        data.append(m)
            elif isinstance(a, httpx.Response) and a.status_code < 500 and not data:
                return _passthrough(a)  # e.g. 401 without the servers' key
            else:
                errors.append(f"{s.address}: {describe(a) if isinstance(a, Exception) else a.status_code}")
        if not data:
            raise APIError(503, "no server listed its models (" + "; ".join(errors) + ")", "server_error", None,
                           "no_healthy_server")
        return JSONResponse({"object": "list", "data": data})




# ---- the app -----------------------------------------------------------------------------------------
def build_app(orch: Orchestrator) -> FastAPI:
    """The orchestrator's FastAPI app; its lifespan starts (HTTP client, health checks) and stops it."""

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
    async def _http_error(_: Request, err: StarletteHTTPException):
        return error_response(APIError(err.status_code, str(err.detail)))

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
        return await orch.models(raw)

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

    return app
