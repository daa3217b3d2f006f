"""OpenAI response bodies built from RequestOutputs: whole responses, SSE chunks, usage, logprobs.

One context object per HTTP request keeps what a stream needs across chunks (which choices have
sent their finish_reason, echo, token counts for usage, text offsets).
"""
from __future__ import annotations

import time
from typing import Optional

from meshserve.engine.detokenizer import TokenStrings
from meshserve.outputs import CompletionOutput, RequestOutput
from meshserve.serve.reasoning import ReasoningStream, split
from meshserve.serve.tools import ToolStream


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: Optional[int] = None) -> dict:
    """OpenAI's usage; `cached_tokens` (serve --enable_prompt_tokens_details) adds
    prompt_tokens_details: the prompt tokens whose KV came from the prefix cache."""
    body = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
    if cached_tokens is not None:
        body["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return body


def _ranked(entry: dict) -> list[tuple[int, float]]:
    """A position's (token id, logprob) pairs, likeliest first, as plain floats (msgspec writes no
    subclass of float: the entries' values are outputs.Logprob)."""
    return sorted(((t, float(v)) for t, v in entry.items()), key=lambda kv: kv[1], reverse=True)


def _value(entry: dict, token_id: int) -> Optional[float]:
    v = entry.get(token_id)
    return None if v is None else float(v)


class _Context:
    object_name = ""

    def __init__(self, request_id: str, model: str, req, tokens: TokenStrings, prompt_lens: list[int]):
        self.id = request_id
        self.model = model
        self.req = req
        self.tokens = tokens
        self.created = int(time.time())
        self.n = req.n
        opts = req.stream_options
        self.include_usage = bool(opts and opts.include_usage)
        self.continuous_usage = bool(opts and opts.continuous_usage_stats)
        self.prompt_tokens = sum(prompt_lens)
        self.completion_tokens = 0
        self.return_ids = bool(getattr(req, "return_token_ids", False))  # token_ids in choices (vLLM's)
        self.tokens_as_ids = bool(getattr(req, "return_tokens_as_token_ids", None))  # the server's default: set after
        self.finished: set = set()  # choice indexes whose finish_reason has been sent
        self.report_cached = False  # usage.prompt_tokens_details (serve --enable_prompt_tokens_details)
        self.cached: dict[int, int] = {}  # prompt index -> its tokens found in the prefix cache

    def label(self, token_id: int) -> str:
        """A token as logprobs name it: its text, or "token_id:<id>" (vLLM's return_tokens_as_token_ids)."""
        return f"token_id:{token_id}" if self.tokens_as_ids else self.tokens(token_id)

    def note(self, pi: int, out: RequestOutput) -> None:
        if out.num_cached_tokens:
            self.cached[pi] = out.num_cached_tokens

    def usage(self) -> dict:
        return usage(self.prompt_tokens, self.completion_tokens,
                     sum(self.cached.values()) if self.report_cached else None)

    def chunk(self, choice: dict) -> dict:
        out = {"id": self.id, "object": self.object_name, "created": self.created, "model": self.model,
               "choices": [choice]}
        if self.include_usage:
            out["usage"] = self.usage() if self.continuous_usage else None
        return out

    def _prompt_logprobs(self, out: RequestOutput) -> list:
        """vLLM's `prompt_logprobs`: per prompt token None (the first) or {token id: {logprob, rank,
        decoded_token}} for the token itself and the top ones (rank 1 = the likeliest; the prompt's own
        token's rank is its place in the vocabulary, as vLLM's, wherever it falls)."""
        entries = out.prompt_logprobs or [None] * len(out.prompt_token_ids)
        result = []
        for tid, entry in zip(out.prompt_token_ids, entries):
            if entry is None:
                result.append(None)
                continue
            result.append({str(t): {"logprob": float(v), "rank": getattr(v, "rank", None),
                                    "decoded_token": self.tokens(t)} for t, v in entry.items()})
        return result

    def usage_chunk(self) -> dict:
        return {"id": self.id, "object": self.object_name, "created": self.created, "model": self.model,
                "choices": [], "usage": self.usage()}


class CompletionContext(_Context):
    object_name = "text_completion"

    def __init__(self, request_id: str, model: str, req, tokens: TokenStrings, streams):
        super().__init__(request_id, model, req, tokens, [len(s.state.prompt_token_ids) for s in streams])
        self.logprobs = req.logprobs
        self.offsets: dict[int, int] = {}  # choice index -> text offset of its next token

    def _prompt_text(self, out: RequestOutput) -> str:
        return out.prompt if out.prompt is not None else self.tokens.text(out.prompt_token_ids)

    def _logprobs(self, token_ids: list[int], entries: list, offset: int) -> tuple[dict, int]:
        lp = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for tid, entry in zip(token_ids, entries):
            tok = self.tokens(tid)
            lp["tokens"].append(self.label(tid))
            lp["text_offset"].append(offset)  # into the text, whatever the tokens are named
            offset += len(tok)
            if entry is None:  # the first prompt token has no logprob
                lp["token_logprobs"].append(None)
                lp["top_logprobs"].append(None)
                continue
            lp["token_logprobs"].append(_value(entry, tid))
            lp["top_logprobs"].append({self.label(t): v for t, v in _ranked(entry)})
        return lp, offset

    def _choice(self, pi: int, out: RequestOutput, c: CompletionOutput, first: bool) -> Optional[dict]:
        index = pi * self.n + c.index
        text, lp = c.text, None
        offset = self.offsets.get(index, 0)
        if self.logprobs is not None:
            lp = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        if first and self.req.echo:
            text = self._prompt_text(out) + text
            if lp is not None:
                entries = out.prompt_logprobs or [None] * len(out.prompt_token_ids)
                part, offset = self._logprobs(out.prompt_token_ids, entries, offset)
                for k in lp:
                    lp[k].extend(part[k])
        if lp is not None and c.logprobs:
            part, offset = self._logprobs(c.token_ids, c.logprobs, offset)
            for k in lp:
                lp[k].extend(part[k])
        self.offsets[index] = offset
        choice = {"index": index, "text": text, "logprobs": lp, "finish_reason": c.finish_reason,
                  "stop_reason": c.stop_reason}
        if self.return_ids:
            choice["token_ids"] = list(c.token_ids)
            if first:
                choice["prompt_token_ids"] = list(out.prompt_token_ids)
        if first and getattr(self.req, "prompt_logprobs", None) is not None:
            choice["prompt_logprobs"] = self._prompt_logprobs(out)
        return choice

    def full_response(self, outs: list[RequestOutput]) -> dict:
        choices = []
        for pi, out in enumerate(outs):
            self.note(pi, out)
            for c in out.outputs:
                self.completion_tokens += len(c.token_ids)
                choices.append(self._choice(pi, out, c, first=True))
        return {"id": self.id, "object": self.object_name, "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage()}

    def chunks(self, pi: int, out: RequestOutput) -> list[dict]:
        """SSE chunks for one delta of prompt `pi`: one per choice that has something to say."""
        self.note(pi, out)
        result = []
        for c in out.outputs:
            index = pi * self.n + c.index
            if index in self.finished:
                continue
            self.completion_tokens += len(c.token_ids)
            first = index not in self.offsets
            ids_wanted = self.logprobs is not None or self.return_ids
            has_news = c.text or c.finish_reason or (ids_wanted and c.token_ids) or (first and self.req.echo)
            if not has_news:
                continue
            if c.finish_reason is not None:
                self.finished.add(index)
            result.append(self.chunk(self._choice(pi, out, c, first)))
        return result


class ChatContext(_Context):
    object_name = "chat.completion.chunk"

    def __init__(self, request_id: str, model: str, req, tokens: TokenStrings, streams, tools=None):
        super().__init__(request_id, model, req, tokens, [len(s.state.prompt_token_ids) for s in streams])
        self.top_logprobs = (req.top_logprobs or 0) if req.logprobs else None
        self.prompt_token_ids = list(streams[0].state.prompt_token_ids) if self.return_ids else None
        # tool calls (serve/tools.py ToolPlan): None or mode "none" for plain text answers
        self.tools = tools if tools is not None and tools.mode != "none" else None
        self.tool_streams: dict = {}  # choice index -> ToolStream
        self.reasoning_parser: Optional[str] = None  # serve --reasoning_parser (serve/reasoning.py)
        self.reasoning_streams: dict = {}  # choice index -> ReasoningStream
        self.echo = ""  # vLLM's echo: the last (assistant) message's text, before each answer's content

    def _logprobs(self, c: CompletionOutput) -> Optional[dict]:
        if self.top_logprobs is None:
            return None
        content = []
        for tid, entry in zip(c.token_ids, c.logprobs or []):
            top = [{"token": self.label(t), "logprob": v, "bytes": list(self.tokens(t).encode())}
                   for t, v in _ranked(entry)[:self.top_logprobs]]
            content.append({"token": self.label(tid), "logprob": _value(entry, tid),
                            "bytes": list(self.tokens(tid).encode()), "top_logprobs": top})
        return {"content": content}

    def role_chunks(self, n: int) -> list[dict]:
        chunks = [self.chunk({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}) for i in range(n)]
        if self.return_ids and chunks:
            chunks[0]["prompt_token_ids"] = self.prompt_token_ids
        if self.echo:  # as vLLM: the echoed text in a chunk of its own after the role's
            chunks += [self.chunk({"index": i, "delta": {"content": self.echo}, "logprobs": None,
                                   "finish_reason": None}) for i in range(n)]
        return chunks

    def chunks(self, out: RequestOutput) -> list[dict]:
        self.note(0, out)
        result = []
        for c in out.outputs:
            if c.index in self.finished:
                continue
            self.completion_tokens += len(c.token_ids)
            ids_wanted = self.top_logprobs is not None or self.return_ids
            if not (c.text or c.finish_reason or (ids_wanted and c.token_ids)):
                continue
            if c.finish_reason is not None:
                self.finished.add(c.index)
            text, thinking = c.text, ""
            if self.reasoning_parser is not None:
                rs = self.reasoning_streams.setdefault(c.index, ReasoningStream(self.reasoning_parser))
                thinking, text = rs.feed(c.text, c.finish_reason is not None)
            delta = {"content": text} if text else {}
            reason = c.finish_reason
            if self.tools is not None:
                ts = self.tool_streams.setdefault(c.index, ToolStream(self.tools))
                delta, reason = ts.delta(text, c.finish_reason)
            if thinking:
                delta = {"reasoning_content": thinking, **delta}
            if (self.tools is not None or self.reasoning_parser is not None) and not delta and reason is None \
                    and not (ids_wanted and c.token_ids):
                continue
            choice = {"index": c.index, "delta": delta, "logprobs": self._logprobs(c),
                      "finish_reason": reason, "stop_reason": c.stop_reason}
            if self.return_ids:
                choice["token_ids"] = list(c.token_ids)
            result.append(self.chunk(choice))
        return result

    def full_response(self, out: RequestOutput) -> dict:
        self.note(0, out)
        choices = []
        for c in out.outputs:
            self.completion_tokens += len(c.token_ids)
            text, thinking = c.text, None
            if self.reasoning_parser is not None:
                thinking, text = split(self.reasoning_parser, c.text)
            # no tool calls before the thinking ends (text None: it did not, within max_tokens)
            message, reason = ({"role": "assistant", "content": text}, c.finish_reason) \
                if self.tools is None or text is None else self.tools.message(text, c.finish_reason)
            if self.reasoning_parser is not None:
                message["reasoning_content"] = thinking
            if self.echo:
                message["content"] = self.echo + (message.get("content") or "")
            choices.append({"index": c.index, "message": message, "logprobs": self._logprobs(c),
                            "finish_reason": reason, "stop_reason": c.stop_reason})
            if self.return_ids:
                choices[-1]["token_ids"] = list(c.token_ids)
        body = {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage()}
        if self.return_ids:
            body["prompt_token_ids"] = self.prompt_token_ids
        if self.req.prompt_logprobs is not None:
            body["prompt_logprobs"] = self._prompt_logprobs(out)
        return body
