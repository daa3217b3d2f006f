"""Fake context and generation servers speaking the disaggregated contract (docs/disaggregated.md),
for the orchestrator's tests: small FastAPI apps on uvicorn threads at 127.0.0.1, each recording
what it received (path, headers, JSON body).

The context fake answers a context-only request with the canned first token FIRST_TEXT and
`disaggregated_params` whose opaque_state names the server; the generation fake checks that a
generation-only request carries them and answers FIRST_TEXT + CONTINUATION, streamed (one chunk
per token, OpenAI's chunk shapes) or whole. Knobs: `healthy` (False: /health answers 503),
`fail_status` (every request answered with it), `delay` (seconds before answering), `chunk_delay` (seconds before each streamed chunk).

Both fakes also answer as an aggregated server: a request without `disaggregated_params`, or a
resumed completion (`resume_output_token_ids`: a prefix of TOKEN_IDS; the answer's text is the
whole output's, its token ids and usage the new tokens'). `return_token_ids` adds `token_ids` and
`prompt_token_ids` (PROMPT_IDS + the resumed ids) as meshserve's servers do. Failure knobs of a
stream, counted in chunks sent: `die_after` (the connection drops), `stall_after` (nothing more is
sent, the connection stays open), `error_after` (a 503 error event and [DONE], as a server whose
engine died).
"""
from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from typing import Optional

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from helpers import free_port  # noqa: F401 (the disaggregated tests import it from here)

MODEL = "fake-model"
FIRST_ID = 42
FIRST_TEXT = "Hello"
CONTINUATION = [" from", " the", " generation", " server", "."]
FULL_TEXT = FIRST_TEXT + "".join(CONTINUATION)
TOKENS = [FIRST_TEXT, *CONTINUATION]
TOKEN_IDS = [FIRST_ID + i for i in range(len(TOKENS))]
PROMPT_IDS = [1, 2, 3, 4, 5]




def opaque_state(name: str) -> str:
    return base64.b64encode(json.dumps({"server": name}).encode()).decode()


class FakeServer:
    role = ""

    def __init__(self, name: str, port: Optional[int] = None):
        self.name = name
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.received: list[dict] = []
        self.sent: list[bytearray] = []  # the bytes of each streamed answer, as sent
        self.healthy = True
        self.fail_status: Optional[int] = None
        self.delay = 0.0
        self.chunk_delay = 0.005  # seconds before each streamed chunk
        self.stream_closed: list[bool] = []  # per stream: True when its client went away before the end
        self.die_after: Optional[int] = None  # chunks of a stream sent before the connection drops
        self.stall_after: Optional[int] = None  # ... before it sends nothing more (the connection stays open)
        self.error_after: Optional[int] = None  # ... before a 503 error event and [DONE]
        self.inflight = 0
        self.max_inflight = 0
        self._server: Optional[uvicorn.Server] = None
        self._thread: Optional[threading.Thread] = None
        self.app = self._build()

    def _build(self) -> FastAPI:
        app = FastAPI()

        @app.get("/health")
        async def health():
            if self.healthy:
                return {"status": "ok"}
            return JSONResponse({"status": "unhealthy", "error": "fake"}, status_code=503)

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "fake"}]}

        async def route(raw: Request):
            body = await raw.json()
            self.received.append({"path": raw.url.path, "headers": dict(raw.headers), "body": body})
            self.inflight += 1
            self.max_inflight = max(self.max_inflight, self.inflight)
            try:
                if self.delay:
                    await asyncio.sleep(self.delay)
                if self.fail_status is not None:
                    return JSONResponse({"error": {"message": f"{self.name} fails on purpose", "type": "server_error",
                                                   "param": None, "code": self.fail_status}},
                                        status_code=self.fail_status)
                return await self.answer(raw.url.path, body)
            finally:
                self.inflight -= 1

        app.post("/v1/completions")(route)
        app.post("/v1/chat/completions")(route)
        return app

    async def answer(self, path: str, body: dict):
        raise NotImplementedError

    async def generate(self, path: str, body: dict):
        """The canned completion TOKENS, from where `resume_output_token_ids` leaves it."""
        given = body.get("resume_output_token_ids") or []
        if given != TOKEN_IDS[:len(given)] or (given and path != "/v1/completions"):
            return JSONResponse({"error": {"message": f"cannot resume from {given} on {path}", "type": "x",
                                           "param": None, "code": None}}, status_code=400)
        chat = path.endswith("chat/completions")
        want_ids = body.get("return_token_ids") is True
        k = len(given)
        rid, created = f"gen-{self.name}", int(time.time())
        tokens, ids = TOKENS[k:], TOKEN_IDS[k:]
        primed = "".join(TOKENS[:k])  # a resumed output's text is the whole output's
        prompt_ids = PROMPT_IDS + given
        usage = _usage(5 + k, len(tokens))
        if not body.get("stream"):
            choice = ({"index": 0, "message": {"role": "assistant", "content": FULL_TEXT}, "logprobs": None,
                       "finish_reason": "length"} if chat else
                      {"index": 0, "text": FULL_TEXT, "logprobs": None, "finish_reason": "length"})
            out = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                   "model": MODEL, "choices": [choice], "usage": usage}
            if want_ids:
                choice["token_ids"] = ids
                if chat:
                    out["prompt_token_ids"] = prompt_ids
                else:
                    choice["prompt_token_ids"] = prompt_ids
            return out
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        head = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
                "model": MODEL}

        def chunk(i: int, role: bool = False) -> bytes:
            last = i == len(tokens) - 1
            text = (primed if i == 0 else "") + tokens[i] if not role else ""
            finish = "length" if last and not role else None
            if chat:
                delta = {"role": "assistant", "content": ""} if role else {"content": text}
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            obj = {**head, "choices": [choice]}
            if want_ids and not role:
                choice["token_ids"] = [ids[i]]
                if i == 0 and not chat:
                    choice["prompt_token_ids"] = prompt_ids
            if want_ids and role:
                obj["prompt_token_ids"] = prompt_ids
            if include_usage:
                obj["usage"] = None
            return b"data: " + json.dumps(obj).encode() + b"\n\n"

        sent = bytearray()
        self.sent.append(sent)

        async def stream():
            parts = [chunk(0, role=True)] if chat else []
            parts += [chunk(i) for i in range(len(tokens))]
            if include_usage:
                parts.append(b"data: " + json.dumps({**head, "choices": [], "usage": usage}).encode() + b"\n\n")
            parts.append(b"data: [DONE]\n\n")
            closed = len(self.stream_closed)
            self.stream_closed.append(True)
            for n, part in enumerate(parts):
                if n == self.die_after:
                    raise RuntimeError(f"fake server {self.name} dies on purpose")
                if n == self.stall_after:
                    await asyncio.sleep(3600)
                if n == self.error_after:
                    error = {"error": {"message": "the engine is not running", "type": "server_error",
                                       "param": None, "code": 503}}
                    for end in (b"data: " + json.dumps(error).encode() + b"\n\n", b"data: [DONE]\n\n"):
                        sent.extend(end)
                        yield end
                    self.stream_closed[closed] = False
                    return
                await asyncio.sleep(self.chunk_delay)
                sent.extend(part)
                yield part
            self.stream_closed[closed] = False

        return StreamingResponse(stream(), media_type="text/event-stream")

    @property
    def bodies(self) -> list[dict]:
        return [r["body"] for r in self.received]

    def start(self) -> "FakeServer":
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True, name=f"fake-{self.name}")
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"fake server {self.name} did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            self._thread.join(10)
            self._server = None


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class FakeContextServer(FakeServer):
    role = "context"

    def __init__(self, name: str, port: Optional[int] = None):
        super().__init__(name, port)
        self.finish_at_context = False  # answer as if the first token were EOS: finished, no params
        self.count = 0

    async def answer(self, path: str, body: dict):
        if body.get("disaggregated_params") is None:
            return await self.generate(path, body)  # as an aggregated server
        params = body.get("disaggregated_params") or {}
        if params.get("request_type") != "context_only" or body.get("stream"):
            return JSONResponse({"error": {"message": f"not a context-only request: {params}", "type": "x",
                                           "param": None, "code": None}}, status_code=400)
        self.count += 1
        chat = path.endswith("chat/completions")
        finish = "stop" if self.finish_at_context else "length"
        choice = ({"index": 0, "message": {"role": "assistant", "content": FIRST_TEXT}, "logprobs": None,
                   "finish_reason": finish} if chat else
                  {"index": 0, "text": FIRST_TEXT, "logprobs": None, "finish_reason": finish})
        out = {"id": f"ctx-{self.name}-{self.count}", "object": "chat.completion" if chat else "text_completion",
               "created": int(time.time()), "model": MODEL, "choices": [choice], "usage": _usage(5, 1)}
        if body.get("return_token_ids") is True:
            choice["token_ids"] = [FIRST_ID]
            if chat:
                out["prompt_token_ids"] = PROMPT_IDS
            else:
                choice["prompt_token_ids"] = PROMPT_IDS
        if not self.finish_at_context:
            out["disaggregated_params"] = {"request_type": "context_only", "first_gen_tokens": [FIRST_ID],
                                           "ctx_request_id": f"{self.name}-{self.count}",
                                           "opaque_state": opaque_state(self.name)}
        return out


class FakeGenerationServer(FakeServer):
    role = "generation"

    async def answer(self, path: str, body: dict):
        params = body.get("disaggregated_params")
        if params is not None and (params.get("request_type") != "generation_only"
                                   or params.get("first_gen_tokens") != [FIRST_ID] or not params.get("opaque_state")):
            return JSONResponse({"error": {"message": f"not a generation-only request: {params}", "type": "x",
                                           "param": None, "code": None}}, status_code=400)
        return await self.generate(path, body)
