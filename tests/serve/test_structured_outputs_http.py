"""Structured outputs over HTTP, as OpenAI and vLLM clients ask for them: OpenAI's `response_format`
(json_object, json_schema), vLLM's `structured_outputs` and its older `guided_json` / `guided_regex` /
`guided_choice` / `guided_grammar`, streamed or not, through the official `openai` client. Each
answer is checked by Python's own `re`, `json` and `jsonschema`, and greedy answers equal the LLM
API's for the same checkpoint (tests/engine/test_structured_outputs.py holds that one to transformers).
A grammar that does not parse, two constraints at once, or another backend are 400s naming the field,
and the server goes on serving."""
from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest

from serve_util import start_server

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "pick": {"enum": ["x", "yy"]}},
          "required": ["ok", "pick"], "additionalProperties": False}


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    # a random model writes JSON's free whitespace forever: vLLM's structured_outputs_config turns it off
    cfg = tmp_path_factory.mktemp("so") / "extra.yml"
    cfg.write_text("structured_outputs_config:\n  disable_any_whitespace: true\n")
    srv = start_server(tiny_model, "--max_seq_len", "512", "--max_batch_size", "8", "--config", str(cfg))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=server.api_key, max_retries=0, timeout=60)


def chat(client, stream=False, **kw):
    args = dict(model="tiny-chat", messages=[{"role": "user", "content": "Give me an answer"}], max_tokens=48,
                temperature=0, **kw)
    if not stream:
        return client.chat.completions.create(**args).choices[0]
    chunks = list(client.chat.completions.create(stream=True, **args))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason][-1]


def test_response_format_json_schema_and_json_object(client):
    rf = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}}
    choice = chat(client, response_format=rf)
    assert choice.finish_reason == "stop"
    jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    text, reason = chat(client, stream=True, response_format=rf)
    assert reason == "stop" and text == choice.message.content  # streamed: the same greedy answer
    obj = chat(client, response_format={"type": "json_object"}, extra_body={"structured_outputs": None})
    assert obj.finish_reason == "stop" and isinstance(json.loads(obj.message.content), dict)


@pytest.mark.parametrize("field,value,check", [
    ("guided_regex", r"[0-9]{2}-[a-z]{3}", lambda t: re.fullmatch(r"[0-9]{2}-[a-z]{3}", t)),
    ("guided_choice", ["alpha", "beta gamma"], lambda t: t in ("alpha", "beta gamma")),
    ("guided_grammar", 'root ::= "<" [a-c]{1,3} ">"', lambda t: re.fullmatch(r"<[a-c]{1,3}>", t)),
    ("guided_json", SCHEMA, lambda t: jsonschema.validate(json.loads(t), SCHEMA) is None),
])
def test_vllm_guided_fields_on_both_endpoints(client, field, value, check):
    body = {field: value}
    c = chat(client, extra_body=body)
    assert c.finish_reason == "stop" and check(c.message.content), c.message.content
    comp = client.completions.create(model="tiny-chat", prompt="An answer:", max_tokens=48, temperature=0,
                                     extra_body=body).choices[0]
    assert comp.finish_reason == "stop" and check(comp.text), comp.text


def test_a_structural_tag_response_format(client):
    """vLLM's response_format {"type": "structural_tag"} in xgrammar's format (the whole answer one tag
    here), and its older top-level `structural_tag` field (JSON text) on completions."""
    tag = {"type": "structural_tag", "format": {"type": "tag", "begin": "<n>", "end": "</n>",
                                                "content": {"type": "regex", "pattern": "[0-9]{2,4}"}}}
    choice = chat(client, response_format=tag)
    assert choice.finish_reason == "stop" and re.fullmatch(r"<n>[0-9]{2,4}</n>", choice.message.content)
    comp = client.completions.create(model="tiny-chat", prompt="An answer:", max_tokens=48, temperature=0,
                                     extra_body={"structural_tag": json.dumps(tag)}).choices[0]
    assert comp.finish_reason == "stop" and re.fullmatch(r"<n>[0-9]{2,4}</n>", comp.text), comp.text


def test_greedy_answers_equal_the_llm_api(tiny_model, client):
    from meshserve import LLM, SamplingParams
    from meshserve.sampling_params import StructuredOutputsParams
    regex = r"[a-z]{4} [0-9]{1,3}"
    got = client.completions.create(model="tiny-chat", prompt="Say it:", max_tokens=20, temperature=0,
                                    extra_body={"guided_regex": regex}).choices[0].text
    got_json = client.completions.create(model="tiny-chat", prompt="Say it:", max_tokens=40, temperature=0,
                                         extra_body={"guided_json": SCHEMA}).choices[0].text
    llm = LLM(model=tiny_model, max_seq_len=512, max_batch_size=2,
              structured_outputs_config={"disable_any_whitespace": True})
    try:
        want, want_json = [o.outputs[0].text for o in llm.generate(["Say it:"] * 2, [
            SamplingParams(max_tokens=20, temperature=0, structured_outputs=StructuredOutputsParams(regex=regex)),
            SamplingParams(max_tokens=40, temperature=0, structured_outputs=StructuredOutputsParams(json=SCHEMA))])]
    finally:
        llm.shutdown()
    assert got == want and re.fullmatch(regex, got)
    assert got_json == want_json and jsonschema.validate(json.loads(got_json), SCHEMA) is None


@pytest.mark.parametrize("body,param,words", [
    ({"guided_regex": "([0-9"}, "guided_regex", "guided_regex='([0-9' is invalid: Regex parsing error"),
    ({"structured_outputs": {"json": "{nope"}}, "structured_outputs", "structured_outputs.json='{nope' is invalid"),
    ({"guided_grammar": "root ::= missing"}, "guided_grammar", 'Rule "missing" is not defined'),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}}},
     "response_format", "response_format.json_schema.schema={'type': 'nonsense'} is invalid"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_regex", "set only one of them"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "response_format", "set only one"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format",
     "json_schema.schema is missing"),
    ({"response_format": {"type": "yaml"}}, "response_format",
     "expected 'text', 'json_object', 'json_schema' or 'structural_tag'"),
    ({"response_format": {"type": "structural_tag", "structures": [{"begin": "<a>"}], "triggers": ["<a"]}},
     "response_format", "response_format={'type': 'structural_tag', 'structures'"),
    ({"structural_tag": '{"type": "structural_tag", "format": {"type": "nope"}}'}, "structural_tag",
     "Format type not recognized: nope"),
    ({"guided_choice": []}, "guided_choice", "non-empty list"),
    ({"guided_decoding_backend": "outlines", "guided_regex": "a"}, "guided_decoding_backend", "xgrammar"),
    ({"structured_outputs": {"regexp": "a"}}, "structured_outputs", "unknown field 'regexp'"),
])
@pytest.mark.parametrize("stream", [False, True])
def test_bad_constraints_are_400s_naming_the_field(server, body, param, words, stream):
    with httpx.Client(base_url=server.base_url, headers=server.headers, timeout=30) as http:
        r = http.post("/v1/chat/completions", json={"model": "tiny-chat", "max_tokens": 4, "stream": stream,
                                                    "messages": [{"role": "user", "content": "Hi"}], **body})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == param and words in err["message"] and "\n" not in err["message"], err
        ok = http.post("/v1/completions", json={"model": "tiny-chat", "prompt": "Hi", "max_tokens": 2})
        assert ok.status_code == 200


def test_tool_choice_auto_needs_the_server_flags(client):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "Hi"}], tools=tools)
    assert exc.value.body["param"] == "tool_choice" and "--enable_auto_tool_choice" in exc.value.body["message"]


def test_no_prompt_tokens_details_without_the_flag(client):
    usage = client.completions.create(model="tiny-chat", prompt="Hi", max_tokens=1).usage
    assert usage.prompt_tokens_details is None  # serve --enable_prompt_tokens_details adds them
