"""Tool calling on /v1/chat/completions through the official openai client, as vLLM answers it:
a named tool_choice and "required" hold the answer to the tools' schemas (structured outputs), and
"auto" with `--enable_auto_tool_choice --tool_call_parser hermes` splits the model's text into content
and calls. Arguments are checked with `jsonschema` against the tool's own schema, streamed answers
must carry the same calls as whole ones, and what the server cannot take is a 400 naming the field."""
from __future__ import annotations

import argparse
import json

import jsonschema
import openai
import pytest

from serve_util import start_server

WEATHER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}, "days": {"type": "integer",
                                                                                           "minimum": 1, "maximum": 9}},
           "required": ["city", "days"], "additionalProperties": False}
CLOCK = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
         "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": CLOCK}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": CLOCK}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    cfg = tmp_path_factory.mktemp("tools") / "extra.yml"
    cfg.write_text("structured_outputs_config:\n  disable_any_whitespace: true\n")  # a random model's JSON ends
    srv = start_server(tiny_model, "--max_seq_len", "512", "--max_batch_size", "8", "--config", str(cfg),
                       "--enable_auto_tool_choice", "--tool_call_parser", "hermes")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=server.api_key, max_retries=0, timeout=60)


def ask(client, stream=False, **kw):
    args = dict(model="tiny-chat", messages=MESSAGES, tools=TOOLS, max_tokens=60, temperature=0) | kw
    if not stream:
        return client.chat.completions.create(**args).choices[0]
    return list(client.chat.completions.create(stream=True, **args))


def streamed_calls(chunks) -> tuple[list[dict], str, str]:
    """(calls as {name, arguments}, content, finish_reason) put together from a stream's deltas."""
    calls: dict[int, dict] = {}
    content, reason = "", None
    for ch in chunks:
        if not ch.choices:
            continue
        c = ch.choices[0]
        content += c.delta.content or ""
        for tc in c.delta.tool_calls or []:
            call = calls.setdefault(tc.index, {"name": "", "arguments": "", "id": None})
            if tc.id:
                call["id"] = tc.id
            if tc.function and tc.function.name:
                call["name"] = tc.function.name
            if tc.function and tc.function.arguments:
                call["arguments"] += tc.function.arguments
        reason = c.finish_reason or reason
    return [calls[i] for i in sorted(calls)], content, reason


def test_a_named_tool_choice_answers_that_call(client):
    choice = ask(client, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)
    assert choice.finish_reason == "stop" and not choice.message.content
    [scall], content, reason = streamed_calls(ask(client, True, tool_choice={"type": "function",
                                                                             "function": {"name": "get_weather"}}))
    assert scall["name"] == "get_weather" and scall["arguments"] == call.function.arguments and scall["id"]
    assert reason == "stop" and content == ""


def test_required_answers_calls_of_the_given_tools(client):
    """parallel_tool_calls=false: one call (a random model would add calls until max_tokens)."""
    choice = ask(client, tool_choice="required", parallel_tool_calls=False)
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    for call in choice.message.tool_calls:
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    calls, _, reason = streamed_calls(ask(client, True, tool_choice="required", parallel_tool_calls=False))
    assert reason == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [
        (c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls]


def test_auto_parses_hermes_calls_out_of_the_text(client):
    """The model's text is forced (a regex) to a hermes call after some words: content is those words."""
    regex = (r'Let me check\. <tool_call>\{"name": "get_weather", "arguments": \{"city": "(Paris|Rome)", '
             r'"days": [1-3]\}\}</tool_call>')
    choice = ask(client, tool_choice="auto", max_tokens=200, extra_body={"guided_regex": regex})
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check. "
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)
    calls, content, reason = streamed_calls(ask(client, True, max_tokens=200,  # auto: the default
                                                extra_body={"guided_regex": regex}))
    assert content == "Let me check. " and reason == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("get_weather",
                                                                          json.loads(call.function.arguments))]


def test_auto_without_a_call_is_plain_text(client):
    choice = ask(client, extra_body={"guided_regex": "[a-z]{3} [a-z]{2}"})
    assert choice.message.tool_calls is None and choice.finish_reason == "stop"
    _, content, reason = streamed_calls(ask(client, True, extra_body={"guided_regex": "[a-z]{3} [a-z]{2}"}))
    assert content == choice.message.content and reason == "stop"


@pytest.mark.parametrize("kw,param,words", [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "not among tools"),
    ({"tool_choice": "sometimes"}, "tool_choice", "expected 'none', 'auto', 'required'"),
    ({"tools": [{"type": "function", "function": {"parameters": {}}}]}, "tools", "tools[0].function.name"),
    ({"tools": [{"type": "retrieval"}]}, "tools", "tools[0]="),
    ({"tool_choice": "required", "extra_body": {"guided_regex": "a"}}, "tool_choice", "leave out response_format"),
])
def test_bad_tools_are_400s_naming_the_field(client, kw, param, words):
    with pytest.raises(openai.BadRequestError) as exc:
        ask(client, **kw)
    err = exc.value.body
    assert err["param"] == param and words in err["message"], err
    assert ask(client, tool_choice="none").message.content is not None  # the server goes on


def test_the_tool_flags_go_together():
    from meshserve.commands.serve import tool_call_parser_of
    assert tool_call_parser_of(argparse.Namespace(enable_auto_tool_choice=True, tool_call_parser="hermes")) == "hermes"
    assert tool_call_parser_of(argparse.Namespace(enable_auto_tool_choice=False, tool_call_parser=None)) is None
    with pytest.raises(ValueError, match="go together"):
        tool_call_parser_of(argparse.Namespace(enable_auto_tool_choice=True, tool_call_parser=None))
    assert tool_call_parser_of(argparse.Namespace(enable_auto_tool_choice=True, tool_call_parser="mistral")) == "mistral"
    with pytest.raises(ValueError, match="--tool_call_parser granite: not available; accepted: hermes, qwen3_coder"):
        tool_call_parser_of(argparse.Namespace(enable_auto_tool_choice=True, tool_call_parser="granite"))


@pytest.fixture(scope="module")
def pythonic_client(tiny_model):
    srv = start_server(tiny_model, "--max_seq_len", "512", "--max_batch_size", "4",
                       "--enable_auto_tool_choice", "--tool_call_parser", "pythonic")
    yield openai.OpenAI(base_url=srv.base_url + "/v1", api_key=srv.api_key, max_retries=0, timeout=60)
    srv.stop()


def test_auto_parses_pythonic_calls(pythonic_client):
    """Llama 3.2 / 4's format (serve/tool_parsers.py; the unit tests cover every parser): the answer is
    forced to a list of two calls; the server reads them with ast, never running them."""
    regex = r'\[get_weather\(city="(Paris|Rome)", days=[1-3]\), get_time\(zone="UTC"\)\]'
    choice = ask(pythonic_client, max_tokens=200, extra_body={"guided_regex": regex})
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls]
    assert [n for n, _ in calls] == ["get_weather", "get_time"] and calls[1][1] == {"zone": "UTC"}
    jsonschema.validate(calls[0][1], WEATHER)
    s_calls, content, reason = streamed_calls(ask(pythonic_client, True, max_tokens=200,
                                                  extra_body={"guided_regex": regex}))
    assert content == "" and reason == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in s_calls] == calls
    plain = ask(pythonic_client, extra_body={"guided_regex": "[a-z]{3} [a-z]{2}"})
    assert plain.message.tool_calls is None and plain.finish_reason == "stop"
