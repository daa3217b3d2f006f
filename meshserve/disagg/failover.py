"""The generation hop of the orchestrator, and failover (the third step in orchestrator.py's
docstring): a generation server gets the request with the context answer's disaggregated_params;
its stream is relayed to the client (relay.StreamRelay), and when that server dies, stalls past
stall_timeout or sends a 5xx error event, the output so far goes to another server as a resumed
/v1/completions request (`resume_output_token_ids`) and the client's stream goes on from there."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import AsyncIterator, Optional

import httpx
import msgspec
from fastapi.responses import JSONResponse, Response

from meshserve.disagg.relay import (SSE_DONE, SSEResponse, StreamMeter, StreamRelay, UpstreamFailed, _one_line,
                                    _passthrough, _sse, describe)
from meshserve.disagg.router import Server
from meshserve.serve.protocol import APIError, error_body

logger = logging.getLogger("meshserve.disagg")


# What a resumed request keeps of the client's body: the sampling settings (its prompt is token ids;
# max_tokens, min_tokens and the stream settings are set anew; chat-only fields have done their work).
RESUME_KEYS = ("model", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids", "presence_penalty",
               "frequency_penalty", "repetition_penalty", "logit_bias", "ignore_eos", "include_stop_str_in_output",
               "skip_special_tokens", "spaces_between_special_tokens", "user", "priority", "cache_salt")
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # the servers' (OpenAI's) default for /v1/completions


def _wants_logprobs(body: dict) -> bool:
    """Whether a client's request asks for logprobs (completions: an int; chat: true)."""
    lp = body.get("logprobs")
    return (lp is not None and lp is not False) or body.get("prompt_logprobs") is not None


async def _within(seconds: float, awaitable):
    if hasattr(asyncio, "timeout"):  # 3.11: no task per call
        async with asyncio.timeout(seconds):
            return await awaitable
    return await asyncio.wait_for(awaitable, seconds)


class GenerationHop:
    """The Orchestrator's generation hop, streaming and failover (a base class of Orchestrator, whose
    config, client, metrics, generation servers, _pick, _failover_target, _down and _set_health
    these methods use)."""

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
                    elif relay.ids and _wants_logprobs(client_body):
                        why_not = "a stream with logprobs is not resumed"  # a resumed run would send none
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
