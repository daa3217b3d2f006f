"""Reasoning models' thinking, split from the answer: vLLM's `--reasoning_parser`.

A chat answer's `<think>...</think>` part goes to `message.reasoning_content` (streamed as
`delta.reasoning_content`), the rest to `content`, as vLLM answers for these parsers:
- `deepseek_r1`: the thinking ends at `</think>`; the opening `<think>` may be in the prompt (the
  chat template writes it) or at the start of the answer. No `</think>` yet: all of it is reasoning.
- `qwen3`: the thinking is `<think>...</think>` in the answer; without both tags the answer is all
  content (Qwen3 with `chat_template_kwargs: {"enable_thinking": false}` writes none).
- `deepseek_v3` (DeepSeek-V3.1's hybrid thinking, as vLLM's): `deepseek_r1` for a request that turns
  thinking on (`chat_template_kwargs: {"thinking": true}`), else none: the answer is all content.
Tool calls (serve/tools.py) are parsed out of the content, after the thinking.
"""
from __future__ import annotations

import dataclasses

from typing import Optional

REASONING_PARSERS = ("deepseek_r1", "deepseek_v3", "qwen3")
START, END = "<think>", "</think>"


def split(parser: str, text: str) -> tuple[Optional[str], Optional[str]]:
    """(reasoning, content) of a whole answer."""
    if parser == "qwen3" and (START not in text or END not in text):
        return None, text
    if END not in text:
        body = text[len(START):] if text.startswith(START) else text
        return body, None
    before, after = text.split(END, 1)
    if before.startswith(START):
        before = before[len(START):]
    elif START in before and parser == "qwen3":
        before = before.split(START, 1)[1]
    return before, (after or None)


def partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


def parser_for(parser: Optional[str], chat_template_kwargs: Optional[dict]) -> Optional[str]:
    """The parser one request's answer takes under the server's `parser` (deepseek_v3 resolves per
    request; None: no split, the answer is content)."""
    if parser == "deepseek_v3":
        return "deepseek_r1" if (chat_template_kwargs or {}).get("thinking") else None
    return parser


def after_thinking(params, tokenizer):
    """`params` (SamplingParams) whose structured outputs hold only what follows the thinking, as vLLM's:
    the grammar starts after `</think>`'s tokens (or at once when the prompt holds them: thinking off)."""
    if params.structured_outputs is None:
        return params
    end = tokenizer.encode(END, add_special_tokens=False)
    return params.clone(structured_outputs=dataclasses.replace(params.structured_outputs,
                                                               reasoning_end_token_ids=end))


class ReasoningStream:
    """One streamed choice: each piece of new text becomes (reasoning delta, content delta). Text that
    may be the start of a tag is held back until the next piece (or the end) shows what it is.
    qwen3 streams as deepseek_r1 once a `<think>` opened the answer; an answer that does not start with
    one is content (its template wrote no thinking)."""

    def __init__(self, parser: str):
        self.parser = parser
        self.text = ""
        self.sent = 0  # characters of `text` accounted for
        self.in_reasoning: Optional[bool] = None if parser == "qwen3" else True
        self.started = parser != "qwen3"

    def feed(self, new_text: str, final: bool) -> tuple[str, str]:
        self.text += new_text
        reasoning, content = "", ""
        while True:
            rest = self.text[self.sent:]
            if self.in_reasoning is None:  # qwen3: does the answer open with <think>?
                stripped = rest.lstrip()
                if stripped.startswith(START):
                    self.sent += len(rest) - len(stripped) + len(START)
                    self.in_reasoning = True
                    continue
                if not final and START.startswith(stripped):
                    return reasoning, content  # still undecided
                self.in_reasoning = False
                continue
            if not self.in_reasoning:
                content += rest
                self.sent = len(self.text)
                return reasoning, content
            if rest.startswith(START) and self.sent == 0:  # deepseek_r1 with the tag in the answer
                self.sent += len(START)
                continue
            end = rest.find(END)
            if end >= 0:
                reasoning += rest[:end]
                self.sent += end + len(END)
                self.in_reasoning = False
                continue
            hold = 0 if final else max(partial_suffix(rest, END), partial_suffix(rest, START) if self.sent == 0 else 0)
            reasoning += rest[:len(rest) - hold]
            self.sent += len(rest) - hold
            return reasoning, content
