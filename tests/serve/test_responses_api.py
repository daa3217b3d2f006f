"""OpenAI's Responses API through the official openai client (`client.responses`): a text answer
equals the chat route's for the same conversation (instructions as the system message), streamed
events add up to the whole answer, structured outputs (text.format) and function tools answer as
the Responses API shapes them, stored responses are retrieved and continued with
previous_response_id, and what the server cannot take is a 400 naming the field."""
from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from serve_util import start_server

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "pick": {"enum": ["x", "yy"]}},
          "required": ["ok", "pick"], "additionalProperties": False}


@pytest.fixture(scope="module")
def client(tiny_model, tmp_path_factory):
    cfg = tmp_path_factory.mktemp("resp") / "extra.yml"
    cfg.write_text("structured_outputs_config:\n  disable_any_whitespace: true\n")
    srv = start_server(tiny_model, "--max_seq_len", "512", "--config", str(cfg))
    yield openai.OpenAI(base_url=srv.base_url + "/v1", api_key=srv.api_key, max_retries=0, timeout=60)
    srv.stop()


def test_a_text_answer_equals_the_chat_routes(client):
    resp = client.responses.create(model="tiny-chat", instructions="Be brief.", input="Tell me a story",
                                   max_output_tokens=12, temperature=0)
    chat = client.chat.completions.create(model="tiny-chat", max_tokens=12, temperature=0, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story"}])
    assert resp.object == "response" and resp.id.startswith("resp_")
    assert resp.output_text == chat.choices[0].message.content
    assert resp.output[0].type == "message" and resp.output[0].role == "assistant"
    assert resp.usage.input_tokens == chat.usage.prompt_tokens
    assert resp.usage.output_tokens == chat.usage.completion_tokens
    want_status = "completed" if chat.choices[0].finish_reason == "stop" else "incomplete"
    assert resp.status == want_status
    if want_status == "incomplete":
        assert resp.incomplete_details.reason == "max_output_tokens"


def test_streamed_events_add_up_to_the_answer(client):
    kw = dict(model="tiny-chat", input=[{"role": "user", "content": [{"type": "input_text", "text": "Hello"}]}],
              max_output_tokens=10, temperature=0)
    whole = client.responses.create(**kw)
    events = list(client.responses.create(stream=True, **kw))
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[-1] in ("response.completed", "response.incomplete")
    assert "response.output_item.added" in types and "response.output_text.done" in types
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == whole.output_text == events[-1].response.output_text
    assert events[-1].response.usage.output_tokens == whole.usage.output_tokens


def test_text_format_json_schema(client):
    resp = client.responses.create(model="tiny-chat", input="Answer in JSON", max_output_tokens=40, temperature=0,
                                   text={"format": {"type": "json_schema", "name": "answer", "schema": SCHEMA,
                                                    "strict": True}})
    assert resp.status == "completed"
    jsonschema.validate(json.loads(resp.output_text), SCHEMA)


def test_a_named_function_tool_is_a_function_call_item(client):
    tools = [{"type": "function", "name": "get_weather", "description": "Weather",
              "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}},
                             "required": ["city"], "additionalProperties": False}}]
    resp = client.responses.create(model="tiny-chat", input="Weather in Paris?", tools=tools, max_output_tokens=40,
                                   temperature=0, tool_choice={"type": "function", "name": "get_weather"})
    [call] = [o for o in resp.output if o.type == "function_call"]
    assert call.name == "get_weather" and json.loads(call.arguments)["city"] in ("Paris", "Rome")
    events = list(client.responses.create(model="tiny-chat", input="Weather in Paris?", tools=tools, stream=True,
                                          max_output_tokens=40, temperature=0,
                                          tool_choice={"type": "function", "name": "get_weather"}))
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert [e.arguments for e in done] == [call.arguments]
    # the call's output goes back as input items: a conversation the chat template renders
    follow = client.responses.create(model="tiny-chat", max_output_tokens=5, temperature=0, tools=tools, input=[
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}], tool_choice="none")
    assert follow.output_text is not None


def test_stored_responses_are_retrieved_and_continued(client):
    first = client.responses.create(model="tiny-chat", input="My name is Ada.", max_output_tokens=6, temperature=0)
    assert client.responses.retrieve(first.id).output_text == first.output_text
    second = client.responses.create(model="tiny-chat", input="What is my name?", max_output_tokens=6,
                                     temperature=0, previous_response_id=first.id)
    chat = client.chat.completions.create(model="tiny-chat", max_tokens=6, temperature=0, messages=[
        {"role": "user", "content": "My name is Ada."}, {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "What is my name?"}])
    assert second.output_text == chat.choices[0].message.content  # the conversation so far, then the new input
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_missing")
    unstored = client.responses.create(model="tiny-chat", input="x", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


@pytest.mark.parametrize("kw,param", [
    ({"previous_response_id": "resp_nope"}, "previous_response_id"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]}, "input"),
    ({"tools": [{"type": "web_search"}]}, "tools"),
    ({"reasoning": {"effort": "high"}}, "reasoning"),
    ({"truncation": "auto"}, "truncation"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
])
def test_what_the_server_cannot_take_is_a_400_naming_it(client, kw, param):
    args = dict(model="tiny-chat", input="Hi", max_output_tokens=4) | kw
    with pytest.raises(openai.BadRequestError) as exc:
        client.responses.create(**args)
    assert exc.value.body["param"] == param, exc.value.body
