"""`--reasoning_parser` on a real server: the answer's thinking reaches message.reasoning_content and
delta.reasoning_content (tests/unit/test_reasoning_parser.py checks the split itself). A random model
writes no tags, so under deepseek_r1 (whose <think> a template may have written into the prompt) its
whole greedy answer, the LLM API's for the same checkpoint, is reasoning. Structured outputs would
constrain the thinking too: a 400 naming the field."""
from __future__ import annotations

import openai
import pytest

from serve_util import start_server


@pytest.fixture(scope="module")
def client(tiny_model):
    srv = start_server(tiny_model, "--max_seq_len", "512", "--reasoning_parser", "deepseek_r1")
    yield openai.OpenAI(base_url=srv.base_url + "/v1", api_key=srv.api_key, max_retries=0, timeout=60)
    srv.stop()


MESSAGES = [{"role": "user", "content": "Think about it"}]


def test_the_answer_is_reasoning_until_think_ends(client, tiny_model):
    from meshserve import LLM, SamplingParams
    llm = LLM(model=tiny_model, max_seq_len=512, max_batch_size=2)
    try:
        want = llm.chat(MESSAGES, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)).outputs[0].text
    finally:
        llm.shutdown()
    assert want and "</think>" not in want
    msg = client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=12, temperature=0,
                                         extra_body={"ignore_eos": True}).choices[0].message
    assert msg.reasoning_content == want and msg.content is None
    chunks = list(client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=12,
                                                 temperature=0, stream=True, extra_body={"ignore_eos": True}))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == want
    assert "".join(d.content or "" for d in deltas) == ""


@pytest.mark.parametrize("kw,param", [
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"extra_body": {"guided_regex": "[a-z]+"}}, "structured_outputs"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
      "tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice"),
])
def test_structured_outputs_with_a_reasoning_parser_are_refused(client, kw, param):
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=4, **kw)
    assert exc.value.body["param"] == param and "--reasoning_parser deepseek_r1" in exc.value.body["message"]
