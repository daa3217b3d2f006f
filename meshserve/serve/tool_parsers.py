"""Tool-call formats in a model's text, for `tool_choice: "auto"` (`--tool_call_parser NAME`, vLLM's names).

Each parser says where in the text a call may begin (`held`: a stream sends content only up to there)
and splits a finished answer into content and calls (`parse`: None when the text holds no well-formed
call, so the answer stays text). Arguments come back as JSON text, as OpenAI's `function.arguments`.

| name | the model writes | models |
| --- | --- | --- |
| `hermes` | `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` after any text | Qwen2.5 / Qwen3, Hermes |
| `qwen3_coder` | `<tool_call><function=NAME><parameter=P>value</parameter>...</function></tool_call>` | Qwen3-Coder |
| `llama3_json` (`llama4_json`) | `{"name": ..., "parameters": {...}}` (`;`-separated), from the start | Llama 3.1-3.3 |
| `pythonic` (`llama4_pythonic`) | `[get_weather(city="Paris"), ...]`, from the start | Llama 3.2 / 4 |
| `mistral` | `[TOOL_CALLS][{"name": ..., "arguments": {...}}]` or `[TOOL_CALLS]NAME[ARGS]{...}` | Mistral |
| `deepseek_v3` | `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME` + a json block | DeepSeek-V3 / R1 |
| `deepseek_v31` | `<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{...}<｜tool▁call▁end｜>` | DeepSeek-V3.1 |

`mistral` and the DeepSeek formats write their markers as special tokens: with those parsers an auto
request decodes special tokens (skip_special_tokens off), as vLLM's parsers ask.

Pythonic calls are read with `ast.parse` and `ast.literal_eval` (no code runs): keyword arguments of
literal values only.
"""
from __future__ import annotations

import ast
import json
import re
from typing import Optional

from meshserve.serve.reasoning import partial_suffix

Calls = list[tuple[str, str]]  # (function name, arguments as JSON text)
Parsed = Optional[tuple[Optional[str], Calls]]  # (content before the calls or None, calls); None: plain text


def _args_json(args) -> Optional[str]:
    if isinstance(args, str):
        return args
    if isinstance(args, dict):
        return json.dumps(args, ensure_ascii=False)
    return None


class ToolParser:
    name = ""
    keeps_special_tokens = False  # its markers are special tokens: decode them

    def held(self, text: str) -> int:
        """The index in `text` from which it may be (the start of) a call."""
        raise NotImplementedError

    def parse(self, text: str, functions: list[dict]) -> Parsed:
        raise NotImplementedError


class _Marked(ToolParser):
    """Calls after a marker; the text before it is content."""
    marker = ""

    def held(self, text: str) -> int:
        start = text.find(self.marker)
        return start if start >= 0 else len(text) - partial_suffix(text, self.marker)

    def parse(self, text: str, functions: list[dict]) -> Parsed:
        start = text.find(self.marker)
        if start < 0:
            return None
        calls = self.calls(text[start:], functions)
        if not calls:
            return None
        content = text[:start]
        return (content if content.strip() else None), calls

    def calls(self, tail: str, functions: list[dict]) -> Optional[Calls]:
        raise NotImplementedError


class Hermes(_Marked):
    name, marker = "hermes", "<tool_call>"
    _call = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)

    def calls(self, tail, functions):
        out = []
        for m in self._call.finditer(tail):  # a call cut short (max_tokens) has no closing tag: left out
            try:
                obj = json.loads(m.group(1))
                name, args = obj["name"], _args_json(obj.get("arguments", {}))
            except (ValueError, KeyError, TypeError):
                return None  # not a well-formed call: the text as it is
            if not isinstance(name, str) or args is None:
                return None
            out.append((name, args))
        return out


class Qwen3Coder(_Marked):
    """Parameter values are text; each becomes the type its tool's schema gives it (as vLLM's parser)."""
    name, marker = "qwen3_coder", "<tool_call>"
    _call = re.compile(r"<tool_call>\s*<function=([^>\n]+)>(.*?)</function>\s*</tool_call>", re.DOTALL)
    _param = re.compile(r"<parameter=([^>\n]+)>\n?(.*?)\n?</parameter>", re.DOTALL)

    def calls(self, tail, functions):
        schemas = {f["name"]: (f.get("parameters") or {}).get("properties", {}) for f in functions}
        out = []
        for m in self._call.finditer(tail):
            name, props = m.group(1).strip(), schemas.get(m.group(1).strip(), {})
            args = {p.strip(): self._value(v, props.get(p.strip(), {})) for p, v in self._param.findall(m.group(2))}
            out.append((name, json.dumps(args, ensure_ascii=False)))
        return out

    @staticmethod
    def _value(text: str, schema) -> object:
        kind = schema.get("type") if isinstance(schema, dict) else None
        if kind in ("integer", "number", "boolean", "object", "array", "null"):
            try:
                value = json.loads(text)
            except ValueError:
                return text
            if kind == "integer" and isinstance(value, float) and value.is_integer():
                return int(value)
            return value
        return text


class Mistral(_Marked):
    name, marker, keeps_special_tokens = "mistral", "[TOOL_CALLS]", True
    _decoder = json.JSONDecoder()

    def calls(self, tail, functions):
        out = []
        for part in tail.split(self.marker)[1:]:
            part = part.strip()
            try:
                if part.startswith("["):  # [{"name": ..., "arguments": {...}}, ...]
                    items, _ = self._decoder.raw_decode(part)
                    for item in items:
                        args = _args_json(item.get("arguments", {}))
                        if not isinstance(item["name"], str) or args is None:
                            return None
                        out.append((item["name"], args))
                else:  # NAME[ARGS]{...}
                    name, sep, rest = part.partition("[ARGS]")
                    if not sep:
                        return None
                    args, _ = self._decoder.raw_decode(rest.strip())
                    if _args_json(args) is None:
                        return None
                    out.append((name.strip(), _args_json(args)))
            except (ValueError, KeyError, TypeError, AttributeError):
                return None
        return out


class DeepSeekV3(_Marked):
    name, marker, keeps_special_tokens = "deepseek_v3", "<｜tool▁calls▁begin｜>", True
    _call = re.compile(r"<｜tool▁call▁begin｜>(?:function)?<｜tool▁sep｜>(.*?)\n```(?:json)?\n(.*?)\n```"
                       r"\s*<｜tool▁call▁end｜>", re.DOTALL)

    def calls(self, tail, functions):
        out = []
        for name, args in self._call.findall(tail):
            try:
                json.loads(args)
            except ValueError:
                return None
            out.append((name.strip(), args.strip()))
        return out


class DeepSeekV31(DeepSeekV3):
    name = "deepseek_v31"
    _call = re.compile(r"<｜tool▁call▁begin｜>(.*?)<｜tool▁sep｜>(.*?)<｜tool▁call▁end｜>", re.DOTALL)


class _FromStart(ToolParser):
    """Calls that are the whole answer: a text that starts otherwise is content."""
    starts: tuple[str, ...] = ()  # what a call's text may begin with (after whitespace)

    def held(self, text: str) -> int:
        s = text.lstrip()
        if not s or any(s.startswith(p) or p.startswith(s) for p in self.starts):
            return 0
        return len(text)


class Llama3Json(_FromStart):
    name, starts = "llama3_json", ("{", "<|python_tag|>")
    _decoder = json.JSONDecoder()

    def parse(self, text, functions):
        s = text.strip()
        s = s[len("<|python_tag|>"):].lstrip() if s.startswith("<|python_tag|>") else s
        if not s.startswith("{"):
            return None
        out, i = [], 0
        try:
            while i < len(s):
                obj, i = self._decoder.raw_decode(s, i)
                args = _args_json(obj.get("arguments", obj.get("parameters", {})))
                if not isinstance(obj["name"], str) or args is None:
                    return None
                out.append((obj["name"], args))
                while i < len(s) and (s[i].isspace() or s[i] == ";"):
                    i += 1
        except (ValueError, KeyError, TypeError, AttributeError):
            return None
        return None, out


class Pythonic(_FromStart):
    name, starts = "pythonic", ("[", "<|python_start|>")

    def parse(self, text, functions):
        s = text.strip()
        if s.startswith("<|python_start|>"):
            s = s[len("<|python_start|>"):].removesuffix("<|python_end|>").strip()
        if not (s.startswith("[") and s.endswith("]")):
            return None
        try:
            tree = ast.parse(s, mode="eval").body
            if not isinstance(tree, ast.List) or not tree.elts:
                return None
            out = []
            for call in tree.elts:
                if not isinstance(call, ast.Call) or call.args or any(k.arg is None for k in call.keywords):
                    return None  # keyword arguments only, as the format's prompts ask
                name = ast.unparse(call.func)
                if not re.fullmatch(r"[A-Za-z_][\w.\-]*", name):
                    return None
                args = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
                out.append((name, json.dumps(args, ensure_ascii=False)))
        except (SyntaxError, ValueError, TypeError, RecursionError, MemoryError):
            return None
        return None, out


PARSERS: dict[str, ToolParser] = {}
for _cls in (Hermes, Qwen3Coder, Llama3Json, Pythonic, Mistral, DeepSeekV3, DeepSeekV31):
    PARSERS[_cls.name] = _cls()
PARSERS["llama4_json"] = PARSERS["llama3_json"]
PARSERS["llama4_pythonic"] = PARSERS["pythonic"]
