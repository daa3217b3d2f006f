"""Tool calling on /v1/chat/completions, as vLLM's server does it.

- `tool_choice` naming a function (`{"type": "function", "function": {"name": ...}}`): the answer is
  that function's arguments, held to its `parameters` schema by structured outputs
  (engine/structured_output.py), and comes back as the message's one tool call.
- `tool_choice: "required"`: the answer is a JSON array of `{"name", "parameters"}` objects, each
  held to one tool's schema, and comes back as that many tool calls (finish_reason `tool_calls`);
  one call only with `parallel_tool_calls: false`.
- `tool_choice: "auto"` (the default when tools are given): the model decides; the server needs
  `--enable_auto_tool_choice` and a `--tool_call_parser` for the model's format (serve/tool_parsers.py:
  hermes, qwen3_coder, llama3_json, pythonic, mistral, deepseek_v3, deepseek_v31), which splits the
  text into content and tool calls.
- `tool_choice: "none"`: the tools reach the chat template, the answer is text.

A stream carries a named call's arguments as they are generated; "required" and parsed calls come
whole, with the finish_reason (text before a parsed call streams as content as it comes).
"""
from __future__ import annotations

import json
import uuid
from typing import Any, Optional

from meshserve.engine.structured_output import check_syntax
from meshserve.sampling_params import StructuredOutputsParams, short_repr
from meshserve.serve.tool_parsers import PARSERS

TOOL_CALL_PARSERS = tuple(PARSERS)


class ToolError(ValueError):
    """A request's tools or tool_choice the server cannot take: `param` names the field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def _function(tool: Any, i: int) -> dict:
    if not (isinstance(tool, dict) and tool.get("type", "function") == "function"
            and isinstance(tool.get("function"), dict)):
        raise ToolError(f"tools[{i}]={short_repr(tool)} is invalid: expected {{'type': 'function', 'function': "
                        f"{{'name': ..., 'parameters': {{...}}}}}}", "tools")
    fn = tool["function"]
    if not (isinstance(fn.get("name"), str) and fn["name"]):
        raise ToolError(f"tools[{i}].function.name={short_repr(fn.get('name'))} is invalid: expected a non-empty "
                        f"string", "tools")
    params = fn.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise ToolError(f"tools[{i}].function.parameters={short_repr(params)} is invalid: expected a JSON schema "
                        f"object", "tools")
    return fn


def _schema(fn: dict) -> dict:
    return fn.get("parameters") or {"type": "object"}


class ToolPlan:
    """What one chat request does with its tools: `mode` is none / named / required / auto."""

    def __init__(self, mode: str, functions: list[dict], name: Optional[str] = None, parser: Optional[str] = None,
                 parallel: bool = True):
        self.mode = mode
        self.functions = functions
        self.name = name
        self.parser = PARSERS[parser] if parser is not None else None
        self.parallel = parallel  # OpenAI's parallel_tool_calls: False allows one call (required: one item)

    @classmethod
    def of(cls, tools: Optional[list], tool_choice: Any, parser: Optional[str],
           parallel_tool_calls: Optional[bool] = None) -> "ToolPlan":
        """`parser`: the server's --tool_call_parser when --enable_auto_tool_choice is on, else None."""
        functions = [_function(t, i) for i, t in enumerate(tools or [])]
        choice = tool_choice if tool_choice is not None else ("auto" if functions else "none")
        if choice == "none":
            return cls("none", functions)
        if isinstance(choice, dict):
            fn = choice.get("function") if choice.get("type", "function") == "function" else None
            name = fn.get("name") if isinstance(fn, dict) else None
            if not isinstance(name, str):
                raise ToolError(f"tool_choice={short_repr(choice)} is invalid: expected 'none', 'auto', 'required' "
                                f"or {{'type': 'function', 'function': {{'name': ...}}}}", "tool_choice")
            if name not in [f["name"] for f in functions]:
                raise ToolError(f"tool_choice names function {name!r}, which is not among tools "
                                f"({', '.join(f['name'] for f in functions) or 'none given'})", "tool_choice")
            return cls("named", functions, name)
        if choice not in ("auto", "required"):
            raise ToolError(f"tool_choice={short_repr(choice)} is invalid: expected 'none', 'auto', 'required' or "
                            f"{{'type': 'function', 'function': {{'name': ...}}}}", "tool_choice")
        if not functions:
            raise ToolError(f"tool_choice={choice!r} needs tools", "tool_choice")
        if choice == "required":
            return cls("required", functions, parallel=parallel_tool_calls is not False)
        if parser is None:
            raise ToolError("tool_choice 'auto' (the default when tools are given) needs a server started with "
                            "--enable_auto_tool_choice and --tool_call_parser NAME; or set tool_choice to "
                            "'none', 'required' or a function", "tool_choice")
        return cls("auto", functions, parser=parser)

    def constraint(self) -> Optional[StructuredOutputsParams]:
        """The structured output that makes the answer a call (named, required), else None."""
        if self.mode == "named":
            fn = next(f for f in self.functions if f["name"] == self.name)
            return StructuredOutputsParams(json=_schema(fn))
        if self.mode == "required":
            items = [{"type": "object", "properties": {"name": {"type": "string", "enum": [f["name"]]},
                                                       "parameters": _schema(f)},
                      "required": ["name", "parameters"]} for f in self.functions]
            schema = {"type": "array", "minItems": 1, "items": {"anyOf": items}}
            if not self.parallel:
                schema["maxItems"] = 1
            return StructuredOutputsParams(json=schema)
        return None

    def apply(self, params):
        """`params` (SamplingParams) with a named or required tool_choice's constraint; ToolError when the
        request constrains the answer already or a tool's parameters do not parse."""
        constraint = self.constraint()
        if constraint is None:
            if self.mode == "auto" and self.parser.keeps_special_tokens and params.skip_special_tokens:
                params = params.clone(skip_special_tokens=False)  # the format's markers are special tokens
            return params
        if params.structured_outputs is not None:
            raise ToolError(f"tool_choice={self.mode!r} holds the answer to the tools' schemas: leave out "
                            f"response_format and structured outputs, or set tool_choice to 'none' or 'auto'",
                            "tool_choice")
        try:
            check_syntax(constraint)
        except ValueError as e:
            raise ToolError(f"a tool's parameters are not a JSON schema the server can take: {e}", "tools") from None
        return params.clone(structured_outputs=constraint)

    # ---- answers -------------------------------------------------------------------------------
    def message(self, text: str, finish_reason: Optional[str]) -> tuple[dict, Optional[str]]:
        """The whole answer's message and finish_reason."""
        content, calls = self.split(text, finish_reason)
        if not calls:
            return {"role": "assistant", "content": text}, finish_reason
        msg = {"role": "assistant", "content": content, "tool_calls": calls}
        return msg, ("tool_calls" if self.mode in ("required", "auto") and finish_reason == "stop" else finish_reason)

    def split(self, text: str, finish_reason: Optional[str]) -> tuple[Optional[str], list[dict]]:
        """(content, tool calls) of an answer's text; a call cut short (max_tokens) stays text."""
        if self.mode == "named":
            return None, [_call(self.name, text)]
        if self.mode == "required":
            try:
                items = json.loads(text)
            except ValueError:
                return text, []
            return None, [_call(i["name"], json.dumps(i["parameters"], ensure_ascii=False)) for i in items]
        if self.mode == "auto":
            parsed = self.parser.parse(text, self.functions)
            if parsed is None:  # no well-formed call: the text as it is
                return text, []
            content, calls = parsed  # content: the text before the first call (None when blank)
            return content, [_call(name, args) for name, args in calls]
        return text, []


def _call(name: str, arguments: str) -> dict:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": arguments}}


class ToolStream:
    """One streamed choice's deltas under a ToolPlan."""

    def __init__(self, plan: ToolPlan):
        self.plan = plan
        self.text = ""
        self.sent = 0  # characters of `text` sent as content (auto) or arguments (named)
        self.named_started = False
        self.call_id = f"call_{uuid.uuid4().hex[:24]}"

    def delta(self, new_text: str, finish_reason: Optional[str]) -> tuple[dict, Optional[str]]:
        """The delta for `new_text` (and the finish_reason to send with it)."""
        self.text += new_text
        mode = self.plan.mode
        if mode == "named":
            if not new_text and self.named_started:
                return {}, finish_reason
            call = {"index": 0, "function": {"arguments": new_text}}
            if not self.named_started:
                self.named_started = True
                call = {"index": 0, "id": self.call_id, "type": "function",
                        "function": {"name": self.plan.name, "arguments": new_text}}
            return {"tool_calls": [call]}, finish_reason
        if mode == "required":
            if finish_reason is None:
                return {}, None
            return self._final(finish_reason)
        # auto: content up to where a call may begin, then the calls at the end
        if finish_reason is not None:
            return self._final(finish_reason)
        safe = self.plan.parser.held(self.text)
        out = self.text[self.sent:safe] if safe > self.sent else ""
        self.sent = max(self.sent, safe)
        return ({"content": out} if out else {}), None

    def _final(self, finish_reason: str) -> tuple[dict, str]:
        content, calls = self.plan.split(self.text, finish_reason)
        delta: dict = {}
        if calls:
            rest = (content or "")[self.sent:] if self.plan.mode == "auto" else ""  # before the first call
            if rest.strip():
                delta["content"] = rest
            delta["tool_calls"] = [dict(c, index=i) for i, c in enumerate(calls)]
            reason = "tool_calls" if finish_reason == "stop" else finish_reason
        else:
            tail = self.text[self.sent:]
            if tail:
                delta["content"] = tail
            reason = finish_reason
        self.sent = len(self.text)
        return delta, reason
