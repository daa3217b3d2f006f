"""OpenAI's Responses API (`POST /v1/responses`, `GET /v1/responses/{id}`), as vLLM serves it.

A request becomes a chat request (`to_chat`): `instructions` a system message, `input` (a string or
message / function_call / function_call_output items) the messages, `text.format` the
response_format, flat function `tools` chat's, `max_output_tokens` max_tokens. It runs through the
chat path (`OpenAIServing.start_chat`), so templates, structured outputs, tool calls and
--reasoning_parser behave as there. The answer comes back as Responses output items: `reasoning`,
`message` (output_text), `function_call`. Streamed, as the Responses API's typed events:
response.created, response.in_progress, then per item output_item.added, its deltas
(response.reasoning_text.delta, response.output_text.delta) and .done events, and
response.completed (or response.incomplete).

`store` (OpenAI's default: true) keeps the last `STORE_LIMIT` responses in this server's memory, so
`GET /v1/responses/{id}` and `previous_response_id` (the conversation so far, then the new input)
work until it is restarted or the response is evicted: an unknown id is a 404 / 400 naming it.
"""
from __future__ import annotations

import json
import time
import uuid
from collections import OrderedDict
from typing import Any, AsyncIterator, Optional, Union

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import Field, ValidationError

from meshserve.sampling_params import short_repr
from meshserve.serve.protocol import (APIError, ChatCompletionRequest, OpenAIModel, bad_request,
                                      from_validation_error)
from meshserve.serve.sse import SSEResponse

STORE_LIMIT = 1000


class ResponsesRequest(OpenAIModel):
    model: Optional[str] = None
    input: Union[str, list[dict[str, Any]]]
    instructions: Optional[str] = None
    max_output_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    seed: Optional[int] = None  # vLLM's extra
    stream: bool = False
    text: Optional[dict[str, Any]] = None
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Optional[Union[str, dict[str, Any]]] = None
    parallel_tool_calls: Optional[bool] = None
    store: bool = True
    previous_response_id: Optional[str] = None
    metadata: Optional[dict[str, Any]] = None
    user: Optional[str] = None
    truncation: Optional[str] = None
    include: Optional[list[str]] = None
    reasoning: Optional[dict[str, Any]] = None
    service_tier: Optional[str] = None


def _text(content: Any, where: str) -> str:
    """A message's content as text: a string, or input_text / output_text parts."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"{where}.content={short_repr(content)} is invalid: expected a string or a list of "
                          f"input_text parts", "input")
    out = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("input_text", "output_text", "text") or not isinstance(part.get("text"), str):
            raise bad_request(f"{where}.content[{j}].type={short_repr(kind)} is not supported: this server takes "
                              f"text (input_text, output_text)", "input")
        out.append(part["text"])
    return "".join(out)


def input_messages(items: Union[str, list]) -> list[dict]:
    """The chat messages of a Responses `input`."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    messages: list[dict] = []
    for i, item in enumerate(items):
        where = f"input[{i}]"
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise bad_request(f"{where}.role={short_repr(role)} is invalid: expected user, system, developer or "
                                  f"assistant", "input")
            messages.append({"role": role, "content": _text(item.get("content"), where)})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments", "")}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                             "content": output if isinstance(output, str) else json.dumps(output)})
        elif kind == "reasoning":
            continue  # a model's earlier thinking: templates drop it from the conversation
        else:
            raise bad_request(f"{where}.type={short_repr(kind)} is not supported: expected message, function_call, "
                              f"function_call_output or reasoning", "input")
    return messages


def _tools(tools: Optional[list]) -> Optional[list]:
    if tools is None:
        return None
    out = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or t.get("type") != "function":
            raise bad_request(f"tools[{i}].type={short_repr(t.get('type') if isinstance(t, dict) else t)} is not "
                              f"supported: this server takes function tools", "tools")
        out.append({"type": "function", "function": {k: t[k] for k in ("name", "description", "parameters", "strict")
                                                     if k in t}})
    return out


def _tool_choice(choice: Any) -> Any:
    if isinstance(choice, dict) and choice.get("type") == "function" and "name" in choice:
        return {"type": "function", "function": {"name": choice["name"]}}
    return choice


def _response_format(text: Optional[dict]) -> Optional[dict]:
    fmt = (text or {}).get("format")
    if fmt is None or not isinstance(fmt, dict):
        return None if fmt is None else {"type": fmt}
    if fmt.get("type") == "json_schema":
        return {"type": "json_schema", "json_schema": {k: fmt[k] for k in ("name", "schema", "strict") if k in fmt}}
    return {"type": fmt.get("type")}


def to_chat(req: ResponsesRequest, history: list[dict]) -> dict:
    """The chat request body a Responses request runs as (`history`: previous_response_id's messages)."""
    for name, ok in (("truncation", (None, "disabled")), ("include", (None, [])), ("reasoning", (None, {})),
                     ("service_tier", (None, "auto", "default"))):
        if getattr(req, name) not in ok:
            raise bad_request(f"{name}={short_repr(getattr(req, name))} is not supported by this server", name)
    messages = ([{"role": "system", "content": req.instructions}] if req.instructions is not None else []) \
        + history + input_messages(req.input)
    body: dict = {"model": req.model, "messages": messages, "max_tokens": req.max_output_tokens,
                  "temperature": req.temperature, "top_p": req.top_p, "seed": req.seed,
                  "tools": _tools(req.tools), "tool_choice": _tool_choice(req.tool_choice),
                  "parallel_tool_calls": req.parallel_tool_calls, "response_format": _response_format(req.text),
                  "user": req.user}
    return {k: v for k, v in body.items() if v is not None}


def _output_items(message: dict) -> list[dict]:
    items = []
    if message.get("reasoning_content"):
        items.append({"type": "reasoning", "id": f"rs_{uuid.uuid4().hex}", "summary": [], "status": "completed",
                      "content": [{"type": "reasoning_text", "text": message["reasoning_content"]}]})
    if message.get("content"):
        items.append(_message_item(message["content"], f"msg_{uuid.uuid4().hex}"))
    for call in message.get("tool_calls") or []:
        items.append({"type": "function_call", "id": f"fc_{uuid.uuid4().hex}", "call_id": call["id"],
                      "name": call["function"]["name"], "arguments": call["function"]["arguments"],
                      "status": "completed"})
    return items


def _message_item(text: str, item_id: str, status: str = "completed") -> dict:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


class ResponsesApi:
    """The routes' logic over an OpenAIServing; `store` holds the stored responses (LRU)."""

    def __init__(self, serving):
        self.serving = serving
        self.store: "OrderedDict[str, tuple[dict, list[dict]]]" = OrderedDict()

    def _shell(self, rid: str, req: ResponsesRequest, created: int) -> dict:
        return {"id": rid, "object": "response", "created_at": created, "status": "in_progress",
                "model": self.serving.config.served_model_name, "output": [], "error": None,
                "incomplete_details": None, "instructions": req.instructions, "metadata": req.metadata or {},
                "max_output_tokens": req.max_output_tokens, "temperature": req.temperature, "top_p": req.top_p,
                "parallel_tool_calls": req.parallel_tool_calls is not False, "tool_choice": req.tool_choice or "auto",
                "tools": req.tools or [], "text": req.text or {"format": {"type": "text"}},
                "previous_response_id": req.previous_response_id, "store": req.store, "usage": None}

    @staticmethod
    def _finish(body: dict, finish_reason: Optional[str], usage: dict) -> dict:
        body["status"] = "incomplete" if finish_reason not in ("stop", "tool_calls") else "completed"
        if finish_reason == "length":
            body["incomplete_details"] = {"reason": "max_output_tokens"}
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        body["usage"] = {"input_tokens": usage["prompt_tokens"], "input_tokens_details": {"cached_tokens": cached},
                         "output_tokens": usage["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
                         "total_tokens": usage["total_tokens"]}
        return body

    def _keep(self, body: dict, messages: list[dict], req: ResponsesRequest) -> None:
        if not req.store:
            return
        convo = list(messages)
        for item in body["output"]:
            if item["type"] == "message":
                convo.append({"role": "assistant", "content": item["content"][0]["text"]})
            elif item["type"] == "function_call":
                convo.append({"role": "assistant", "content": None, "tool_calls": [{
                    "id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}]})
        self.store[body["id"]] = (body, convo)
        while len(self.store) > STORE_LIMIT:
            self.store.popitem(last=False)

    async def create(self, raw: Request) -> Response:
        serving = self.serving
        req: ResponsesRequest = await serving.parse(raw, ResponsesRequest)
        history: list[dict] = []
        if req.previous_response_id is not None:
            kept = self.store.get(req.previous_response_id)
            if kept is None:
                raise bad_request(f"previous_response_id={short_repr(req.previous_response_id)}: no stored response "
                                  f"has this id (responses are kept in this server's memory, the last {STORE_LIMIT} "
                                  f"with store true)", "previous_response_id")
            history = [m for m in kept[1] if m["role"] != "system"]
        chat_body = to_chat(req, history)
        try:
            chat = ChatCompletionRequest.model_validate(chat_body)
        except ValidationError as e:
            raise from_validation_error(e) from None
        ctx, streams, kv, _ = await serving.start_chat(raw, chat)
        rid, created = f"resp_{uuid.uuid4().hex}", int(time.time())
        shell = self._shell(rid, req, created)
        if req.stream:
            return SSEResponse(self._events(ctx, streams[0], shell, req, chat_body["messages"]),
                               media_type="text/event-stream")
        outs = await serving.collect(raw, streams)
        chat_answer = ctx.full_response(outs[0])
        choice = chat_answer["choices"][0]
        shell["output"] = _output_items(choice["message"])
        body = self._finish(shell, choice["finish_reason"], chat_answer["usage"])
        self._keep(body, chat_body["messages"], req)
        return JSONResponse(body)

    def retrieve(self, response_id: str) -> dict:
        kept = self.store.get(response_id)
        if kept is None:
            raise APIError(404, f"no stored response has id {short_repr(response_id)} (responses are kept in this "
                                f"server's memory, the last {STORE_LIMIT} with store true)", "invalid_request_error",
                           "response_id", "not_found")
        return kept[0]

    async def _events(self, ctx, stream, shell: dict, req: ResponsesRequest, messages: list[dict]
                      ) -> AsyncIterator[bytes]:
        seq = 0

        def event(kind: str, **fields) -> bytes:
            nonlocal seq
            seq += 1
            data = {"type": kind, "sequence_number": seq - 1, **fields}
            return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()

        yield event("response.created", response=dict(shell))
        yield event("response.in_progress", response=dict(shell))
        output: list[dict] = []
        open_item: Optional[dict] = None  # the reasoning or message item taking deltas
        texts: dict[str, str] = {}
        finish, calls = None, []

        def close(item: dict) -> list[bytes]:
            text = texts[item["id"]]
            if item["type"] == "reasoning":
                item.update(status="completed", content=[{"type": "reasoning_text", "text": text}])
                return [event("response.reasoning_text.done", item_id=item["id"], output_index=output.index(item),
                              content_index=0, text=text),
                        event("response.output_item.done", output_index=output.index(item), item=item)]
            item.update(_message_item(text, item["id"]))
            part = item["content"][0]
            i = output.index(item)
            return [event("response.output_text.done", item_id=item["id"], output_index=i, content_index=0,
                          text=text, logprobs=[]),
                    event("response.content_part.done", item_id=item["id"], output_index=i, content_index=0,
                          part=part),
                    event("response.output_item.done", output_index=i, item=item)]

        try:
            async for out in stream.deltas():
                for chunk in ctx.chunks(out):
                    choice = chunk["choices"][0]
                    delta = choice.get("delta") or {}
                    for kind, key in (("reasoning", "reasoning_content"), ("message", "content")):
                        piece = delta.get(key)
                        if not piece:
                            continue
                        if open_item is None or open_item["type"] != kind:
                            if open_item is not None:
                                for b in close(open_item):
                                    yield b
                            prefix = "rs" if kind == "reasoning" else "msg"
                            open_item = ({"type": "reasoning", "id": f"{prefix}_{uuid.uuid4().hex}", "summary": [],
                                          "status": "in_progress", "content": []} if kind == "reasoning"
                                         else {"type": "message", "id": f"{prefix}_{uuid.uuid4().hex}",
                                               "status": "in_progress", "role": "assistant", "content": []})
                            output.append(open_item)
                            texts[open_item["id"]] = ""
                            yield event("response.output_item.added", output_index=len(output) - 1, item=open_item)
                            if kind == "message":
                                yield event("response.content_part.added", item_id=open_item["id"],
                                            output_index=len(output) - 1, content_index=0,
                                            part={"type": "output_text", "text": "", "annotations": []})
                        texts[open_item["id"]] += piece
                        name = "response.reasoning_text.delta" if kind == "reasoning" else "response.output_text.delta"
                        extra = {} if kind == "reasoning" else {"logprobs": []}
                        yield event(name, item_id=open_item["id"], output_index=len(output) - 1, content_index=0,
                                    delta=piece, **extra)
                    calls += delta.get("tool_calls") or []
                    finish = choice.get("finish_reason") or finish
        except (RuntimeError, ValueError) as e:  # the engine failed or refused mid-stream
            shell.update(status="failed", error={"code": "server_error", "message": str(e)})
            yield event("response.failed", response=shell)
            return
        finally:
            stream.abort()
        if open_item is not None:
            for b in close(open_item):
                yield b
        for call in _merge_calls(calls):
            item = {"type": "function_call", "id": f"fc_{uuid.uuid4().hex}", "call_id": call["id"],
                    "name": call["name"], "arguments": call["arguments"], "status": "completed"}
            output.append(item)
            i = len(output) - 1
            yield event("response.output_item.added", output_index=i, item=dict(item, status="in_progress"))
            yield event("response.function_call_arguments.done", item_id=item["id"], output_index=i,
                        arguments=item["arguments"])
            yield event("response.output_item.done", output_index=i, item=item)
        shell["output"] = output
        body = self._finish(shell, finish, ctx.usage())
        self._keep(body, messages, req)
        yield event("response.completed" if body["status"] == "completed" else "response.incomplete", response=body)


def _merge_calls(deltas: list[dict]) -> list[dict]:
    """Chat's streamed tool-call deltas put together: {id, name, arguments} per call index."""
    calls: dict[int, dict] = {}
    for d in deltas:
        c = calls.setdefault(d.get("index", 0), {"id": None, "name": "", "arguments": ""})
        c["id"] = d.get("id") or c["id"]
        fn = d.get("function") or {}
        c["name"] = fn.get("name") or c["name"]
        c["arguments"] += fn.get("arguments") or ""
    return [calls[i] for i in sorted(calls)]
