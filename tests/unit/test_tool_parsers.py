"""Each --tool_call_parser on text in its model family's format (as the models' chat templates and
vLLM's parsers document them): the calls (name, arguments as JSON) and the content before them, the
text kept whole when a call is malformed or cut short, and a stream (fed a few characters at a time)
that carries the same content and calls as the whole answer."""
from __future__ import annotations

import json

import pytest

from meshserve.sampling_params import SamplingParams
from meshserve.serve.tools import TOOL_CALL_PARSERS, ToolPlan, ToolStream

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                                            "metric": {"type": "boolean"}, "where": {"type": "object"}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
PARIS = {"city": "Paris", "days": 3}
TIME = {"zone": "UTC"}

# parser: [(model text, expected content, expected [(name, arguments)])]
CASES = {
    "hermes": [
        ('Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>'
         '<tool_call>{"name": "get_time", "arguments": {"zone": "UTC"}}</tool_call>',
         "Let me check. ", [("get_weather", PARIS), ("get_time", TIME)]),
    ],
    "qwen3_coder": [
        ("I'll look.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3\n"
         "</parameter>\n<parameter=metric>\ntrue\n</parameter>\n<parameter=where>\n{\"lat\": 48.8}\n</parameter>\n"
         "</function>\n</tool_call>",
         "I'll look.\n", [("get_weather", {"city": "Paris", "days": 3, "metric": True, "where": {"lat": 48.8}})]),
    ],
    "llama3_json": [
        ('{"name": "get_weather", "parameters": {"city": "Paris", "days": 3}}', None, [("get_weather", PARIS)]),
        ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "days": 3}}; '
         '{"name": "get_time", "arguments": {"zone": "UTC"}}', None, [("get_weather", PARIS), ("get_time", TIME)]),
    ],
    "pythonic": [
        ('[get_weather(city="Paris", days=3), get_time(zone=\'UTC\')]', None,
         [("get_weather", PARIS), ("get_time", TIME)]),
        ("<|python_start|>[get_weather(city='Paris', days=3, metric=True, where={'lat': [1, None]})]<|python_end|>",
         None, [("get_weather", {"city": "Paris", "days": 3, "metric": True, "where": {"lat": [1, None]}})]),
    ],
    "mistral": [
        ('Sure.[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}, '
         '{"name": "get_time", "arguments": {"zone": "UTC"}}]', "Sure.", [("get_weather", PARIS), ("get_time", TIME)]),
        ('[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "days": 3}[TOOL_CALLS]get_time[ARGS]{"zone": "UTC"}', None,
         [("get_weather", PARIS), ("get_time", TIME)]),
    ],
    "deepseek_v3": [
        ('Checking.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n'
         '{"city": "Paris", "days": 3}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_time\n'
         '```json\n{"zone": "UTC"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>',
         "Checking.", [("get_weather", PARIS), ("get_time", TIME)]),
    ],
    "deepseek_v31": [
        ('<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"city": "Paris", "days": 3}'
         '<｜tool▁call▁end｜><｜tool▁calls▁end｜>', None, [("get_weather", PARIS)]),
    ],
}
# text that is no call in that format (plain answers, calls cut short or malformed): stays content
PLAIN = {
    "hermes": ['The weather is fine.', 'Wait <tool_call>{"name": "get_weather", "arguments": {"city": "Pa',
               '<tool_call>{"name": get_weather}</tool_call>'],
    "qwen3_coder": ["Fine.", "<tool_call>\n<function=get_weather>\n<parameter=city>\nPar"],
    "llama3_json": ["It is sunny in {Paris}.", '{"name": "get_weather", "parameters": {"city": "Par',
                    '{"city": "Paris"}', "Sure: {\"name\": \"get_time\", \"parameters\": {}}"],
    "pythonic": ["[citation needed]", "[get_weather(city=open('/etc/passwd').read())]", "[get_weather('Paris')]",
                 "[__import__('os').system('true')]", "[get_weather(city='Pa"],
    "mistral": ["No tools needed.", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Pa'],
    "deepseek_v3": ["Plain.", "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{"],
    "deepseek_v31": ["Plain."],
}


def plan(parser):
    return ToolPlan.of(TOOLS, "auto", parser)


def parsed(calls):
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


def stream(p, text, step=3):
    s, content, calls, reason = ToolStream(p), "", [], None
    pieces = [text[i:i + step] for i in range(0, len(text), step)] + [""]
    for i, piece in enumerate(pieces):
        delta, r = s.delta(piece, "stop" if i == len(pieces) - 1 else None)
        content += delta.get("content", "")
        calls += delta.get("tool_calls", [])
        reason = r or reason
    return content, calls, reason


def test_every_parser_has_cases():
    assert set(CASES) | {"llama4_json", "llama4_pythonic"} == set(TOOL_CALL_PARSERS) == set(PLAIN) | {
        "llama4_json", "llama4_pythonic"}


@pytest.mark.parametrize("parser,text,content,calls", [(p, *c) for p, cs in CASES.items() for c in cs])
def test_calls_and_content(parser, text, content, calls):
    msg, reason = plan(parser).message(text, "stop")
    assert reason == "tool_calls" and msg["content"] == content
    assert parsed(msg["tool_calls"]) == calls
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in msg["tool_calls"])
    for step in (1, 3, 7):
        s_content, s_calls, s_reason = stream(plan(parser), text, step)
        assert s_reason == "tool_calls" and s_content == (content or "") and parsed(s_calls) == calls, step


@pytest.mark.parametrize("parser,text", [(p, t) for p, ts in PLAIN.items() for t in ts])
def test_text_without_a_well_formed_call_stays_content(parser, text):
    msg, reason = plan(parser).message(text, "stop")
    assert reason == "stop" and msg == {"role": "assistant", "content": text}
    for step in (1, 4):
        assert stream(plan(parser), text, step) == (text, [], "stop")


def test_a_stream_sends_content_before_it_could_be_a_call():
    """Content streams as it comes, up to where a call may begin; a cut-off call stays text (length)."""
    s = ToolStream(plan("hermes"))
    assert s.delta("Hello there <tool", None) == ({"content": "Hello there "}, None)
    assert s.delta("_call>{", None) == ({}, None)
    assert s.delta("", "length") == ({"content": "<tool_call>{"}, "length")
    s = ToolStream(plan("llama3_json"))
    assert s.delta("  ", None) == ({}, None)  # blank so far: could still open a call
    assert s.delta("Sunny", None) == ({"content": "  Sunny"}, None)
    s = ToolStream(plan("pythonic"))
    assert s.delta("[get_weather(", None) == ({}, None)


@pytest.mark.parametrize("parser,skips", [("mistral", False), ("deepseek_v3", False), ("deepseek_v31", False),
                                          ("hermes", True), ("pythonic", True)])
def test_special_token_markers_are_decoded(parser, skips):
    """mistral's [TOOL_CALLS] and DeepSeek's markers are special tokens: an auto request keeps them."""
    assert plan(parser).apply(SamplingParams(max_tokens=8)).skip_special_tokens is skips
    named = ToolPlan.of(TOOLS, {"type": "function", "function": {"name": "get_time"}}, parser)
    assert named.apply(SamplingParams(max_tokens=8)).skip_special_tokens is True
