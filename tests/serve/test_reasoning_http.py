"""`--reasoning_parser` on a real server: the answer's thinking reaches message.reasoning_content and
delta.reasoning_content (tests/unit/test_reasoning_parser.py checks the split itself). A random model
writes no tags, so under deepseek_r1 (whose <think> a template may have written into the prompt) its
whole greedy answer, the LLM API's for the same checkpoint, is reasoning. Structured outputs hold only
what follows the thinking (tests/engine/test_structured_outputs.py checks the switch against transformers)."""
from __future__ import annotations

import re

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


def test_structured_outputs_hold_after_the_thinking(client, tiny_model):
    """The grammar starts after `</think>` (as vLLM's): this model never writes it, so its answer is all
    thinking, free, as the LLM API's with the same end tokens; a named tool call has no arguments yet."""
    from meshserve import LLM, SamplingParams, StructuredOutputsParams
    from transformers import AutoTokenizer
    end = AutoTokenizer.from_pretrained(tiny_model).encode("</think>", add_special_tokens=False)
    spec = StructuredOutputsParams(regex="[a-z]{3}", reasoning_end_token_ids=end)
    llm = LLM(model=tiny_model, max_seq_len=512, max_batch_size=2)
    try:
        want = llm.chat(MESSAGES, SamplingParams(max_tokens=12, temperature=0, structured_outputs=spec)).outputs[0]
    finally:
        llm.shutdown()
    assert not re.fullmatch("[a-z]{3}", want.text)  # not held to the grammar: still thinking
    msg = client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=12, temperature=0,
                                         extra_body={"guided_regex": "[a-z]{3}"}).choices[0].message
    assert msg.reasoning_content == want.text and msg.content is None
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    choice = client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=12, temperature=0,
                                            tools=tools, tool_choice={"type": "function", "function": {"name": "f"}}
                                            ).choices[0]
    assert choice.message.reasoning_content == want.text and not choice.message.tool_calls


def test_the_responses_api_answers_the_thinking_as_a_reasoning_item(client):
    chat = client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=12,
                                          temperature=0).choices[0].message
    resp = client.responses.create(model="tiny-chat", input=MESSAGES, max_output_tokens=12, temperature=0)
    assert [o.type for o in resp.output] == ["reasoning"]
    assert resp.output[0].content[0].text == chat.reasoning_content
    events = list(client.responses.create(model="tiny-chat", input=MESSAGES, max_output_tokens=12, temperature=0,
                                          stream=True))
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == chat.reasoning_content
    assert [o.type for o in events[-1].response.output] == ["reasoning"]


def test_deepseek_v3_splits_only_when_the_request_turns_thinking_on(tiny_model):
    """vLLM's deepseek_v3 parser (DeepSeek-V3.1's hybrid thinking): with chat_template_kwargs {"thinking":
    true} the answer is deepseek_r1's split (this model writes no </think>: all of it reasoning); without,
    all of it is content."""
    srv = start_server(tiny_model, "--max_seq_len", "512", "--reasoning_parser", "deepseek_v3")
    try:
        c = openai.OpenAI(base_url=srv.base_url + "/v1", api_key=srv.api_key, max_retries=0, timeout=60)
        kw = dict(model="tiny-chat", messages=MESSAGES, max_tokens=8, temperature=0)
        plain = c.chat.completions.create(**kw, extra_body={"ignore_eos": True}).choices[0].message
        on = c.chat.completions.create(**kw, extra_body={"ignore_eos": True, "chat_template_kwargs": {"thinking": True}})
        assert plain.content and getattr(plain, "reasoning_content", None) is None
        assert on.choices[0].message.reasoning_content == plain.content and on.choices[0].message.content is None
    finally:
        srv.stop()
