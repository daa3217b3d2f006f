"""Chat messages as a chat template wants them, for LLM.chat and the server's chat routes alike:
OpenAI's text parts joined into one string, a null assistant content (a turn of only tool_calls)
as "" (as vLLM renders it), every other null content and non-text part refused naming the message.
"""
from __future__ import annotations

from typing import Any, Optional


class MessageError(ValueError):
    """A message the template cannot take; `param` is its path (messages.3.content)."""

    def __init__(self, message: str, param: Optional[str] = None):
        super().__init__(message)
        self.param = param


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def template_messages(messages: list) -> list[dict[str, Any]]:
    """`messages` (dicts with role and content) as the template's messages; MessageError on a bad one."""
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise MessageError(f"messages[{i}] must be a dict with role and content, got {type(m).__name__}",
                               f"messages.{i}")
        role, content = m.get("role"), m.get("content")
        if content is None and role != "assistant":  # an assistant turn may carry only tool_calls
            raise MessageError(f"messages[{i}].content is null or missing; a {role} message needs content (a string "
                               f"or a list of text parts); only an assistant message may leave it null",
                               f"messages.{i}.content")
        d = {k: v for k, v in m.items() if v is not None}
        d["content"] = "" if content is None else content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text":
                    raise MessageError(f"messages[{i}].content: part type {_short(kind)} is not supported; only text "
                                       f"parts are", f"messages.{i}.content")
                if not isinstance(part.get("text"), str):
                    raise MessageError(f"messages[{i}].content[{j}].text is null or missing; a text part needs its "
                                       f"text (a string)", f"messages.{i}.content.{j}.text")
                texts.append(part["text"])
            d["content"] = "".join(texts)
        elif not isinstance(d["content"], str):
            raise MessageError(f"messages[{i}].content must be a string or a list of text parts, got "
                               f"{type(content).__name__}", f"messages.{i}.content")
        out.append(d)
    return out
