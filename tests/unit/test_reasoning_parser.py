"""serve/reasoning.py: a chat answer's thinking and content, whole (expected values written out here,
as vLLM's deepseek_r1 and qwen3 parsers answer) and streamed in any pieces (hypothesis: the pieces
put together equal the whole answer's split)."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshserve.serve.reasoning import ReasoningStream, split

CASES = [  # parser, answer, (reasoning, content)
    ("deepseek_r1", "<think>plan it</think>The answer", ("plan it", "The answer")),
    ("deepseek_r1", "plan it</think>The answer", ("plan it", "The answer")),  # <think> was in the prompt
    ("deepseek_r1", "still thinking", ("still thinking", None)),
    ("deepseek_r1", "<think>a</think>", ("a", None)),
    ("qwen3", "<think>\nplan\n</think>\n\nHello", ("\nplan\n", "\n\nHello")),
    ("qwen3", "Hello without thinking", (None, "Hello without thinking")),
    ("qwen3", "plan</think>Hello", (None, "plan</think>Hello")),  # qwen3 needs both tags
]


@pytest.mark.parametrize("parser,text,want", CASES)
def test_whole_answers(parser, text, want):
    assert split(parser, text) == want


def _stream(parser: str, pieces: list[str]) -> tuple[str, str]:
    rs = ReasoningStream(parser)
    reasoning = content = ""
    for i, p in enumerate(pieces):
        r, c = rs.feed(p, i == len(pieces) - 1)
        reasoning, content = reasoning + r, content + c
    return reasoning, content


def _cuts(text: str):
    return st.lists(st.integers(0, len(text)), max_size=6).map(
        lambda cuts: [text[a:b] for a, b in zip([0] + sorted(cuts), sorted(cuts) + [len(text)])])


@pytest.mark.parametrize("parser,text,want", [c for c in CASES if c[0] == "deepseek_r1" or c[2][0] is not None
                                              or "</think>" not in c[1]])
@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(data=st.data())
def test_streamed_pieces_add_up_to_the_whole_split(parser, text, want, data):
    pieces = data.draw(_cuts(text))
    reasoning, content = _stream(parser, pieces)
    assert (reasoning or None, content or None) == want
