"""The OpenAI-compatible HTTP front: FastAPI routes over an AsyncEngine.

Per request: parse + validate the body (protocol.py), tokenize (chat template for chat), check it
against the engine's limits (a 400 before anything reaches the engine), submit, then either stream
SSE chunks from the request's deltas or answer once every sequence is done. A chat stream's
first chunk (role "assistant") goes out with the first output, not at submission, so a client's
TTFT is the first token's. A client that goes away aborts its sequences in the engine (their KV
blocks are freed).
Routes: POST /v1/completions, /v1/chat/completions, /v1/responses, /tokenize, /detokenize,
/reset_prefix_cache; GET /v1/models, /health, /version, /metrics. Error bodies: error_handlers.py.
"""
from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator, Optional

import msgspec
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

import meshserve
from meshserve.disagg import params as signed
from meshserve.engine import disagg
from meshserve.engine.async_engine import AsyncEngine, RequestRejectedError, RequestStream
from meshserve.engine.detokenizer import TokenStrings
from meshserve.engine.engine_core import check_priority
from meshserve.engine.messages import DisaggRequest
from meshserve.outputs import RequestOutput
from meshserve.sampling_params import SamplingParams
from meshserve.serve.reasoning import after_thinking, parser_for
from meshserve.serve.responses_api import ResponsesApi
from meshserve.serve.error_handlers import ClientDisconnected, install_error_handlers, stream_error
from meshserve.serve.server_config import ServerConfig
from meshserve.serve.sse import SSEResponse
from meshserve.serve.tools import ToolError, ToolPlan
from meshserve.serve import beam_search_api, responses, tokens_api
from meshserve.serve.metrics import CONTENT_TYPE, ServerMetrics
from meshserve.serve.middleware import AuthMiddleware, HeaderLimitMiddleware
from meshserve.serve.openapi import ROUTE_BODIES, with_request_bodies
from meshserve.serve.resume import resume_request
from meshserve.serve.protocol import (APIError, ChatCompletionRequest, CompletionRequest, bad_request,
                                      decode_json_body, from_validation_error, from_value_error, read_body)
from meshserve.tokenize import PromptEncoder
from meshserve.utils import all_ints

logger = logging.getLogger(__name__)

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
HEALTH_GENERATE_TIMEOUT_S = 30.0  # GET /health_generate: a token must come within this


_NOT_ID_CHARS = re.compile(r"[^A-Za-z0-9._:-]")


def request_id_for(raw: Request, prefix: str, req=None) -> str:
    """The engine's id of a request: with a body's `request_id` (vLLM's) or an `X-Request-Id` header (an
    orchestrator sends the client's to every server), that id made safe, plus a short unique suffix; its
    log lines carry it."""
    given = getattr(req, "request_id", None) or raw.headers.get("x-request-id")
    clean = _NOT_ID_CHARS.sub("", given)[:64] if given else ""
    return f"{prefix}-{clean}-{uuid.uuid4().hex[:8]}" if clean else f"{prefix}-{uuid.uuid4().hex}"


def sse(obj) -> bytes:
    return b"data: " + msgspec.json.encode(obj) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


class OpenAIServing:
    def __init__(self, engine: AsyncEngine, tokenizer, metrics: ServerMetrics, config: ServerConfig):
        self.engine = engine
        self.tokenizer = tokenizer
        self.encoder = PromptEncoder(tokenizer)  # long prompts tokenized on several cores, same ids
        self.metrics = metrics
        self.config = config
        self.tokens = TokenStrings(tokenizer)
        # one thread: prompts are tokenized in arrival order; PromptEncoder spreads a long one over cores
        self._tokenize_pool = ThreadPoolExecutor(1, thread_name_prefix="meshserve-tokenize")

    async def _off_loop(self, chars: int, fn, *args):
        """fn(*args) on the tokenizer thread when `chars` is at least tokenize_offload_chars, else inline."""
        if chars < self.config.tokenize_offload_chars:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self._tokenize_pool, fn, *args)

    # ---- shared steps --------------------------------------------------------------------------------
    async def parse(self, raw: Request, model_cls):
        return self.validate(await self.read_json(raw), model_cls)

    async def read_json(self, raw: Request) -> dict:
        data = decode_json_body(await read_body(raw, self.config.max_request_body_bytes,
                                                self.config.request_body_timeout_s))
        if not isinstance(data, dict):
            raise bad_request(f"the request body must be a JSON object, got {type(data).__name__}")
        return data

    @staticmethod
    def validate(data: dict, model_cls):
        try:
            return model_cls.model_validate(data)
        except ValidationError as e:
            raise from_validation_error(e) from None

    def check_chat_template(self, req) -> None:
        if req.chat_template is not None and not self.config.trust_request_chat_template:
            raise bad_request("chat_template: this server renders its own chat template only; leave chat_template "
                              "out (a server started with --trust_request_chat_template takes a request's)",
                              "chat_template")

    def check_model(self, model: Optional[str]) -> None:
        if model is not None and model != self.config.served_model_name and model not in self.config.model_aliases:
            raise APIError(404, f"The model `{model}` does not exist; this server serves "
                                f"`{self.config.served_model_name}`.", "invalid_request_error", "model",
                           "model_not_found")

    def submit(self, prompts: list[tuple[Optional[str], list[int]]], params, base: str,
               renames: Optional[dict] = None, prompt_param: str = "prompt",
               kv: Optional[DisaggRequest] = None, resume: Optional[list[int]] = None,
               client_params=None, cache_salt: Optional[str] = None, priority: int = 0) -> list[RequestStream]:
        """Validate every prompt first (a 400 leaves nothing behind), then add them all. `resume`:
        a resumed request's outputs so far (one prompt; resume_request). `client_params`: a
        context_only request's own params (its engine `params` run one token), checked against
        max_seq_len too, so a request the generation server would refuse pins no KV here."""
        try:
            check_priority(self.engine.limits, priority)
        except ValueError as e:
            raise from_value_error(e, None, "priority") from None
        for _, ids in prompts:
            try:
                if kv is not None and kv.kind == "context_only":
                    self.engine.validate(ids, client_params, kv_capacity=False)
                self.engine.validate(ids, params, resume or ())
            except ValueError as e:
                raise from_value_error(e, renames, prompt_param) from None
        self.engine.check_capacity()
        streams: list[RequestStream] = []
        try:
            for i, (text, ids) in enumerate(prompts):
                rid = base if len(prompts) == 1 else f"{base}-{i}"
                streams.append(self.engine.add_request(text, ids, params, rid, kv, resume, cache_salt, priority))
        except BaseException:
            for s in streams:
                s.abort()
            raise
        return streams

    async def collect(self, raw: Request, streams: list[RequestStream]) -> list[RequestOutput]:
        """Wait for every stream's final output; abort them all if the client disconnects."""
        async def results():
            return [await s.result() for s in streams]

        async def disconnected():
            while (await raw.receive())["type"] != "http.disconnect":
                pass

        task = asyncio.ensure_future(results())
        watcher = asyncio.ensure_future(disconnected())
        try:
            done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                return task.result()
            raise ClientDisconnected()
        finally:
            watcher.cancel()
            task.cancel()
            for s in streams:
                s.abort()  # no-op for finished ones

    @staticmethod
    async def merged(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, delta) from several streams, in arrival order."""
        if len(streams) == 1:
            async for out in streams[0].deltas():
                yield 0, out
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, stream: RequestStream) -> None:
            try:
                async for out in stream.deltas():
                    queue.put_nowait((i, out, None))
            except Exception as e:  # noqa: BLE001 - handed to the consumer
                queue.put_nowait((i, None, e))

        tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
        try:
            remaining = len(streams)
            while remaining:
                i, out, err = await queue.get()
                if err is not None:
                    raise err
                if out.finished:
                    remaining -= 1
                yield i, out
        finally:
            for t in tasks:
                t.cancel()

    # ---- disaggregated serving (docs/disaggregated.md) ----------------------------------------------
    def key_proof_headers(self, raw: Request) -> dict:
        """/health's answer to the orchestrator's key challenge: with cache_transceiver_config, an
        HMAC of the challenge under a key derived from the shared one (disagg/params.py key_proof), so
        the orchestrator learns whether this server holds its key without the key going anywhere."""
        challenge = raw.headers.get(signed.CHALLENGE_HEADER)
        if challenge is None or getattr(getattr(self.engine, "args", None), "cache_transceiver_config", None) is None:
            return {}
        try:
            proof = signed.key_proof(signed.secret_key(), challenge)
        except ValueError:  # an unusable key file: requests with disaggregated_params say why
            return {}
        return {signed.PROOF_HEADER: proof} if proof else {}

    def disagg_request(self, req, prompts: list[tuple[Optional[str], list[int]]], params,
                       request_id: str) -> tuple[Optional[DisaggRequest], object]:
        """The engine's DisaggRequest of a request with `disaggregated_params` (None without), and
        its sampling params (a context_only request samples one token); a 400 for what cannot be."""
        dp = req.disaggregated_params
        if dp is None:
            return None, params
        where = "disaggregated_params"
        if self.engine.args.cache_transceiver_config is None:
            raise bad_request(f"{where}: this server was started without cache_transceiver_config (set it in the "
                              f"--config YAML, e.g. `cache_transceiver_config: {{backend: DEFAULT}}`), so it "
                              f"serves no {dp.request_type} requests", where)
        if dp.draft_tokens:
            raise bad_request(f"{where}.draft_tokens={dp.draft_tokens[:8]}{'...' if len(dp.draft_tokens) > 8 else ''}: "
                              f"this server runs no speculative decoding; leave draft_tokens out", where)
        if len(prompts) != 1:
            raise bad_request(f"{where}: a {dp.request_type} request has one prompt, got {len(prompts)}", "prompt")
        if req.n != 1 or getattr(req, "best_of", None) not in (None, 1):
            raise bad_request(f"{where}: a {dp.request_type} request has one sequence; n={req.n}"
                              f"{', best_of=' + str(req.best_of) if getattr(req, 'best_of', None) else ''} is not "
                              f"supported", "n")
        if dp.request_type == "context_only":
            if req.stream:
                raise bad_request(f"{where}: a context_only request is answered whole; set stream to false", "stream")
            kv = DisaggRequest("context_only")
            params = disagg.context_only_params(params)
        else:
            try:
                kv = disagg.generation_request(dp.opaque_state, prompts[0][1], self.engine.ready.kv_layouts,
                                               dp.first_gen_tokens, dp.ctx_request_id, logprobs=params.logprobs,
                                               prompt_logprobs=params.prompt_logprobs)
            except ValueError as e:
                msg = str(e)
                param = next((f for f in ("prompt_logprobs", "logprobs") if msg.startswith(f + "=")), where)
                if param == "logprobs" and isinstance(req, ChatCompletionRequest):  # chat's k is top_logprobs
                    msg, param = msg.replace("logprobs=", "top_logprobs="), "top_logprobs"
                raise bad_request(msg, param) from None
        logger.info("request %s: %s, %d prompt tokens%s", request_id, dp.request_type, len(prompts[0][1]),
                    f", KV of {kv.ctx_request_id} from {kv.sources[0].endpoint}" if kv.sources else "")
        return kv, params

    def context_response(self, body: dict, out: RequestOutput, params: SamplingParams) -> dict:
        """A context_only response: the body plus the disaggregated_params a generation server needs;
        without them when the first token finished the request (EOS, a stop token or string: the
        engine keeps no KV for it then), so the orchestrator answers the client with this."""
        dp = disagg.context_answer(out, params, self.engine.ready.kv_layouts)
        if dp is None:
            logger.info("request %s: finished (%s) with its first token; no disaggregated_params", out.request_id,
                        out.outputs[0].finish_reason if out.outputs else None)
            return body
        body["disaggregated_params"] = dp
        return body

    @staticmethod
    async def wait_for_kv(stream: RequestStream) -> None:
        """A streaming generation_only request answers 200 only once its KV is here: a failed
        transfer is then still a 503 (KvTransferError)."""
        try:
            await stream.wait_started()
        except BaseException:
            stream.abort()
            raise

    # ---- /v1/completions ---------------------------------------------------------------------------
    def configure(self, ctx, req) -> None:
        """The server's answer settings a response context takes (a request's own field first)."""
        ctx.report_cached = self.config.enable_prompt_tokens_details
        if req.return_tokens_as_token_ids is None:
            ctx.tokens_as_ids = self.config.return_tokens_as_token_ids

    async def completion_prompts(self, prompt, add_special_tokens: bool = True
                                 ) -> list[tuple[Optional[str], list[int]]]:
        if isinstance(prompt, str):
            prompt = [prompt]
        if not prompt:
            raise bad_request("prompt is empty: pass a string, a list of strings, or token ids", "prompt")
        if all_ints(prompt):
            prompt = [prompt]
        if any(not isinstance(p, str) and not p for p in prompt):
            raise bad_request("prompt contains an empty list of token ids", "prompt")
        texts = [p for p in prompt if isinstance(p, str)]
        # one hop for the whole batch: many short prompts add up like one long one
        ids = iter(await self._off_loop(sum(map(len, texts)), lambda: [self.encoder.encode(t, add_special_tokens)
                                                                             for t in texts]))
        return [(p, next(ids)) if isinstance(p, str) else (None, list(p)) for p in prompt]

    async def create_completion(self, raw: Request) -> Response:
        req: CompletionRequest = await self.parse(raw, CompletionRequest)
        self.check_model(req.model)
        if req.suffix:
            raise bad_request("suffix is not supported by this server", "suffix")
        max_n = self.engine.limits.max_n
        if req.best_of is not None and max_n is not None and req.best_of > max_n:
            raise bad_request(f"best_of={req.best_of} is invalid: expected an integer in [1, {max_n}] (the "
                              f"engine's max_n, which defaults to max_batch_size)", "best_of")
        if req.best_of is not None and req.best_of != req.n:
            raise bad_request(f"best_of={req.best_of} is not supported; leave it unset or equal to n", "best_of")
        prompts = req.truncated(await self.completion_prompts(req.prompt, req.add_special_tokens is not False),
                                self.engine.limits.max_seq_len)
        max_tokens = req.requested_max_tokens
        renames = {"max_tokens": "max_completion_tokens"} if req.max_completion_tokens is not None else None
        prompt_logprobs = req.prompt_logprobs
        if req.echo and req.logprobs is not None and prompt_logprobs is None:
            prompt_logprobs = req.logprobs
        try:
            params = req.sampling_params(max_tokens if max_tokens is not None else COMPLETIONS_DEFAULT_MAX_TOKENS,
                                         req.logprobs, prompt_logprobs, self.config.sampling_defaults
                                         ).with_bad_words_tokenized(self.tokenizer)
        except ValueError as e:
            raise from_value_error(e, renames) from None
        if req.use_beam_search:
            return JSONResponse(await beam_search_api.answer(
                self, raw, req, prompts, max_tokens if max_tokens is not None else COMPLETIONS_DEFAULT_MAX_TOKENS,
                request_id_for(raw, "cmpl", req)))
        await self.check_structured(req, params)
        resume = None
        if req.resume_output_token_ids is not None:
            resume, params = resume_request(self.engine.limits, req, prompts, params, max_tokens)
        request_id = request_id_for(raw, "cmpl", req)
        client_params = params
        kv, params = self.disagg_request(req, prompts, params, request_id)
        streams = self.submit(prompts, params, request_id, renames, kv=kv, resume=resume, cache_salt=req.cache_salt,
                              priority=req.priority,
                              client_params=client_params)
        ctx = responses.CompletionContext(request_id, self.config.served_model_name, req, self.tokens, streams)
        self.configure(ctx, req)
        if req.stream:
            if kv is not None:
                await self.wait_for_kv(streams[0])
            return SSEResponse(self.completion_stream(ctx, streams), media_type="text/event-stream")
        outs = await self.collect(raw, streams)
        body = ctx.full_response(outs)
        if kv is not None and kv.kind == "context_only":
            body = self.context_response(body, outs[0], params)
        return JSONResponse(body)

    async def completion_stream(self, ctx: "responses.CompletionContext",
                                streams: list[RequestStream]) -> AsyncIterator[bytes]:
        try:
            async for i, out in self.merged(streams):
                for chunk in ctx.chunks(i, out):
                    yield sse(chunk)
            if ctx.include_usage:
                yield sse(ctx.usage_chunk())
        except (RuntimeError, RequestRejectedError) as e:  # the engine failed or refused mid-stream
            yield sse(stream_error(e))
        finally:
            for s in streams:
                s.abort()
        yield SSE_DONE

    # ---- /v1/chat/completions ----------------------------------------------------------------------
    async def chat_prompt(self, req: ChatCompletionRequest) -> tuple[str, list[int]]:
        messages = req.template_messages()
        chars = sum(len(m["content"]) for m in messages if isinstance(m.get("content"), str))
        return await self._off_loop(chars, self._render_chat, req, messages)

    def _render_chat(self, req: ChatCompletionRequest, messages: list[dict]) -> tuple[str, list[int]]:
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=req.add_generation_prompt,
                continue_final_message=req.continue_final_message, tools=getattr(req, "tools", None),
                chat_template=req.chat_template or self.config.chat_template, **(req.chat_template_kwargs or {}))
        except APIError:
            raise
        except Exception as e:  # noqa: BLE001 - jinja and template errors are the request's fault
            raise bad_request(f"cannot apply the chat template to these messages: {e}", "messages") from None
        # The template already holds the special tokens: no BOS added again unless asked (vLLM's default)
        return text, self.encoder.encode(text, add_special_tokens=bool(req.add_special_tokens))

    async def create_chat_completion(self, raw: Request) -> Response:
        req: ChatCompletionRequest = await self.parse(raw, ChatCompletionRequest)
        if req.use_beam_search:
            return JSONResponse(await beam_search_api.chat(self, raw, req, request_id_for(raw, "chatcmpl", req)))
        ctx, streams, kv, params = await self.start_chat(raw, req)
        if req.stream:
            if kv is not None:
                await self.wait_for_kv(streams[0])
            return SSEResponse(self.chat_stream(ctx, streams[0]), media_type="text/event-stream")
        outs = await self.collect(raw, streams)
        body = ctx.full_response(outs[0])
        if kv is not None and kv.kind == "context_only":
            body = self.context_response(body, outs[0], params)
        return JSONResponse(body)

    async def start_chat(self, raw: Request, req: ChatCompletionRequest):
        """Check, template, tokenize and submit a chat request: (its ChatContext, its streams, its
        disaggregated part or None, its engine params). The Responses API (serve/responses_api.py) runs
        its requests through here too."""
        self.check_model(req.model)
        try:
            plan = ToolPlan.of(req.tools, req.tool_choice, self.config.tool_call_parser, req.parallel_tool_calls)
        except ToolError as e:
            raise bad_request(str(e), e.param) from None
        if req.top_logprobs is not None and not req.logprobs:
            raise bad_request("top_logprobs needs logprobs=true", "top_logprobs")
        self.check_chat_template(req)
        [(text, ids)] = req.truncated([await self.chat_prompt(req)], self.engine.limits.max_seq_len)
        max_tokens = req.requested_max_tokens
        if max_tokens is None:  # as vLLM: up to the context, and what the KV cache can hold
            lim = self.engine.limits
            max_tokens = max(1, min(lim.max_seq_len, lim.kv_capacity_tokens) - len(ids))
            max_tokens = min(max_tokens, self.config.sampling_defaults.get("max_tokens", max_tokens))
        renames = {"logprobs": "top_logprobs"}
        if req.max_completion_tokens is not None:
            renames["max_tokens"] = "max_completion_tokens"
        try:
            params = req.sampling_params(max_tokens, (req.top_logprobs or 0) if req.logprobs else None,
                                         req.prompt_logprobs, self.config.sampling_defaults
                                         ).with_bad_words_tokenized(self.tokenizer)
        except ValueError as e:
            raise from_value_error(e, renames) from None
        await self.check_structured(req, params)
        try:
            params = plan.apply(params)
        except ToolError as e:
            raise bad_request(str(e), e.param) from None
        reasoning = parser_for(self.config.reasoning_parser, req.chat_template_kwargs)
        if reasoning is not None:
            params = after_thinking(params, self.tokenizer)
        request_id = request_id_for(raw, "chatcmpl", req)
        client_params = params
        kv, params = self.disagg_request(req, [(text, ids)], params, request_id)
        streams = self.submit([(text, ids)], params, request_id, renames, "messages", kv=kv, cache_salt=req.cache_salt,
                              priority=req.priority,
                              client_params=client_params)
        ctx = responses.ChatContext(request_id, self.config.served_model_name, req, self.tokens, streams, plan)
        self.configure(ctx, req)
        ctx.reasoning_parser = reasoning
        ctx.echo = req.echo_text(req.template_messages()) if req.echo else ""
        return ctx, streams, kv, params

    async def check_structured(self, req, params: SamplingParams) -> None:
        """The request's own schema / regex / grammar parsed (a 400 naming its field), off the event loop
        when it is long: a deeply nested schema takes seconds."""
        spec = params.structured_outputs
        if spec is not None:
            await self._off_loop(req.structured_chars(spec), req.check_structured, spec)

    async def chat_stream(self, ctx: "responses.ChatContext", stream: RequestStream) -> AsyncIterator[bytes]:
        try:
            role_sent = False
            async for out in stream.deltas():
                if not role_sent:  # as vLLM: with the first output, so a client times TTFT to a token
                    role_sent = True
                    for chunk in ctx.role_chunks(stream.state.params.n):
                        yield sse(chunk)
                for chunk in ctx.chunks(out):
                    yield sse(chunk)
            if ctx.include_usage:
                yield sse(ctx.usage_chunk())
        except (RuntimeError, RequestRejectedError) as e:  # the engine failed or refused mid-stream
            yield sse(stream_error(e))
        finally:
            stream.abort()
        yield SSE_DONE

    # ---- small routes ------------------------------------------------------------------------------
    async def health_generate(self, raw: Request) -> JSONResponse:
        """TensorRT-LLM's GET /health_generate: one greedy token of a fixed prompt through the engine (an
        engine process that is alive but no longer steps passes /health, not this): 200, else a 503 naming
        why (the engine's own errors are answered by the error handlers: 503 engine_unavailable...)."""
        ids = self.encoder.encode("Hello", True)
        params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
        streams = self.submit([(None, ids)], params, request_id_for(raw, "health"))
        try:
            await asyncio.wait_for(self.collect(raw, streams), HEALTH_GENERATE_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise APIError(503, f"the engine generated no token within {HEALTH_GENERATE_TIMEOUT_S:g} s", "server_error",
                           None, "engine_unavailable") from None
        return JSONResponse({"status": "ok"})

    def models(self) -> dict:
        lim = self.engine.limits
        return {"object": "list", "data": [{
            "id": self.config.served_model_name, "object": "model", "created": int(time.time()),
            "owned_by": "meshserve", "root": self.config.model_path,
            "max_model_len": lim.max_seq_len if lim else None}]}


def openapi_document() -> dict:
    """The server's OpenAPI document (routes, request bodies: serve/openapi.py) without an engine."""
    stub = type("NoEngine", (), {"metrics": None, "config": ServerConfig(served_model_name="", model_path="")})()
    return build_app(stub).openapi()  # type: ignore[arg-type]


def build_app(serving: OpenAIServing, lifespan=None) -> FastAPI:
    """`lifespan`: an async context manager factory run around serving (the CLI stops the engine
    in it, after uvicorn has drained the in-flight requests)."""
    app = FastAPI(title="meshserve", version=meshserve.__version__, docs_url=None, redoc_url=None,
                  openapi_url=None, lifespan=lifespan)
    metrics = serving.metrics
    install_error_handlers(app, metrics)

    @app.post("/v1/completions", openapi_extra=ROUTE_BODIES["/v1/completions"])
    async def completions(raw: Request):
        return await serving.create_completion(raw)

    @app.post("/v1/chat/completions", openapi_extra=ROUTE_BODIES["/v1/chat/completions"])
    async def chat_completions(raw: Request):
        return await serving.create_chat_completion(raw)

    responses_api = ResponsesApi(serving)

    @app.post("/v1/responses", openapi_extra=ROUTE_BODIES["/v1/responses"])
    async def create_response(raw: Request):  # OpenAI's Responses API (serve/responses_api.py)
        return await responses_api.create(raw)

    @app.get("/v1/responses/{response_id}")
    async def retrieve_response(response_id: str):
        return responses_api.retrieve(response_id)

    @app.post("/tokenize", openapi_extra=ROUTE_BODIES["/tokenize"])
    async def tokenize(raw: Request):
        return await tokens_api.tokenize(serving, raw)

    @app.post("/detokenize", openapi_extra=ROUTE_BODIES["/detokenize"])
    async def detokenize(raw: Request):
        return await tokens_api.detokenize(serving, raw)

    @app.get("/v1/models")
    async def models():
        return serving.models()

    @app.get("/v1/models/{model:path}")
    async def model_card(model: str):  # OpenAI's models.retrieve
        serving.check_model(model)
        return serving.models()["data"][0]

    @app.get("/health")
    async def health(raw: Request):
        headers = serving.key_proof_headers(raw)
        if serving.engine.healthy:
            return JSONResponse({"status": "ok"}, headers=headers)
        return JSONResponse({"status": "unhealthy", "error": serving.engine.error or "the engine is not running"},
                            status_code=503, headers=headers)

    @app.get("/health_generate")
    async def health_generate(raw: Request):  # TensorRT-LLM's: the engine generates a token
        return await serving.health_generate(raw)

    @app.get("/version")
    async def version():
        ready = serving.engine.ready  # the kernel settings the engine's rank 0 resolved for its GPU
        return {"version": meshserve.__version__, "kernel_config": ready.kernel_config if ready else None}

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache():  # vLLM's (SGLang's /flush_cache): later prompts computed from scratch
        if await serving.engine.reset_prefix_cache():
            return {"success": True}
        raise APIError(409, "the prefix cache was not reset: requests hold KV blocks (running, pinned for a "
                       "KV transfer or pulling one); retry when they have finished", "conflict_error")

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(serving.engine.healthy), media_type=CONTENT_TYPE)

    with_request_bodies(app)
    if serving.config.api_key:
        app.add_middleware(AuthMiddleware, api_key=serving.config.api_key, metrics=metrics)
    app.add_middleware(HeaderLimitMiddleware, limit=serving.config.max_request_header_bytes,
                       on_error=metrics.on_error if metrics is not None else None)
    if serving.config.cors:  # outermost: a preflight is answered before the key is asked for, errors carry it
        app.add_middleware(CORSMiddleware, **serving.config.cors)
    return app
