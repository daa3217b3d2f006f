"""What the orchestrator passes from a server to the client: a server's answer as it came
(`_passthrough`) or its failure in a few words (`describe`, `_one_line`), and a streamed answer's
events: SSEResponse (always closes its upstream), StreamMeter (TTFT/TPOT as the bytes pass) and
StreamRelay (one client's stream across the servers that generate it, failovers included: no text
twice, none lost, the same id/created/model, usage as one run). The failover itself is failover.py's."""
from __future__ import annotations

from typing import Optional

import httpx
import msgspec
from fastapi.responses import Response, StreamingResponse

SSE_DONE = b"data: [DONE]\n\n"


# ---- a server's answer -------------------------------------------------------------------------------
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


# ---- streams -----------------------------------------------------------------------------------------
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


class UpstreamFailed(Exception):
    """A generation server failed mid-answer (the reason in a few words)."""


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
