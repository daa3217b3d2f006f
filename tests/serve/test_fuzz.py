"""Fuzzing a real `meshserve serve` (docs/fuzzing.md): every bad input gets a one-line OpenAI error and
costs nothing else.

One server over the tiny random checkpoint (max_seq_len 256, so no generated max_tokens takes long).
- schemathesis, from the app's own OpenAPI document (openai_server.openapi_document(): the routes
  and the request bodies' JSON schema from protocol.py's models): every operation, POST
  /v1/completions and /v1/chat/completions and the GET routes, its coverage phase (boundary values,
  wrong types, missing fields, other methods) then fuzzing with schema-valid and schema-invalid
  ("negative") bodies;
- hypothesis, near-valid bodies: a good request with up to three fields set to odd values, which
  reach the checks past pydantic (SamplingParams, the engine's limits, the chat template);
- the bugs the fuzzing found, one focused test each.
Every answer: no 5xx, no hang (30 s), a 4xx is {"error": {message, type, param, code}} with a
one-line message and no traceback, a stream has no error event. After it all the server is healthy
and answers a greedy request as it did before.
"""
from __future__ import annotations

import json

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshserve.serve.openai_server import openapi_document
from serve_util import start_server

MODEL = "tiny-chat"
TIMEOUT_S = 30.0  # a request taking longer is a hang
GREEDY = {"model": MODEL, "prompt": "The quick brown fox", "max_tokens": 12, "temperature": 0}


@pytest.fixture(scope="module")
def server(tiny_model):
    srv = start_server(tiny_model, "--max_seq_len", "256", "--max_batch_size", "8", "--max_n", "4")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, headers=server.headers, timeout=TIMEOUT_S) as c:
        yield c


@pytest.fixture(scope="module")
def greedy_before(http):
    r = http.post("/v1/completions", json=GREEDY)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def check_answer(status: int, text: str, headers, what) -> None:
    """The rule: no 5xx; a 4xx is OpenAI's error shape, one line; a stream carries no error event."""
    assert status < 500, f"{status} for {what}: {text[:800]}"
    if status >= 400:
        if status == 499:
            return
        body = json.loads(text)
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
        message = body["error"]["message"]
        assert isinstance(message, str) and message, body
        assert len(message.splitlines()) == 1 and "Traceback" not in message, f"for {what}: {message!r}"
        assert isinstance(body["error"]["param"], (str, type(None))), body
    elif "text/event-stream" in headers.get("content-type", ""):
        for event in text.split("\n\n"):
            assert '"error"' not in event[:40], f"error event for {what}: {event[:800]}"


# ---- schemathesis -----------------------------------------------------------------------------------
schema = schemathesis.openapi.from_dict(openapi_document())


@schema.parametrize()
@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_schemathesis(case, server, greedy_before):
    response = case.call(base_url=server.base_url, headers=server.headers, timeout=TIMEOUT_S)
    check_answer(response.status_code, response.text, response.headers,
                 f"{case.method} {case.path} {case.body!r:.600}")


# ---- hypothesis: near-valid bodies -------------------------------------------------------------------
ints = st.sampled_from([-2**63 - 1, -2**63, -1, 0, 1, 2, 4, 5, 20, 21, 255, 256, 319, 320, 2**63 - 1, 2**64, 10**30])
floats = st.sampled_from([-1e308, -101.0, -2.0, -1.0, -0.0, 0.0, 5e-324, 1e-9, 0.5, 1.0, 1.5, 2.0, 100.0, 1e308])
texts = st.sampled_from(["", "a", "\n", " ", "tiny-chat", "<|im_end|>", "<|im_start|>", "\u2028", "é漢🙂", "x" * 300])
token = st.one_of(ints, st.integers(0, 319))
odd = st.recursive(st.one_of(ints, floats, texts, st.booleans(), st.none()),
                   lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(texts, c, max_size=2)), max_leaves=4)
SAMPLING = {
    "model": st.one_of(texts, odd), "max_tokens": st.one_of(st.integers(1, 8), ints, odd),
    "max_completion_tokens": st.one_of(st.integers(1, 8), ints), "n": st.one_of(st.integers(1, 5), ints),
    "temperature": floats, "top_p": floats, "top_k": ints, "min_p": floats, "seed": ints,
    "stop": st.one_of(texts, st.lists(texts, max_size=3)), "stop_token_ids": st.lists(token, max_size=3),
    "presence_penalty": floats, "frequency_penalty": floats, "repetition_penalty": floats,
    "logit_bias": st.dictionaries(st.one_of(texts, token.map(str)), st.one_of(floats, ints), max_size=3),
    "ignore_eos": st.booleans(), "min_tokens": st.one_of(st.integers(0, 8), ints),
    "include_stop_str_in_output": st.booleans(), "skip_special_tokens": st.booleans(),
    "spaces_between_special_tokens": st.booleans(), "stream": st.booleans(), "return_token_ids": st.booleans(),
    "stream_options": st.one_of(st.fixed_dictionaries({}, optional={"include_usage": st.booleans(),
                                                                     "continuous_usage_stats": st.booleans()}), odd),
    "disaggregated_params": st.one_of(odd, st.fixed_dictionaries(
        {"request_type": st.sampled_from(["context_only", "generation_only"])},
        optional={"opaque_state": texts, "first_gen_tokens": st.lists(token, max_size=2)})),
    "user": texts, "metadata": odd, "store": st.booleans(), "service_tier": texts, "\nunknown": odd,
}
COMPLETION = {
    **SAMPLING, "prompt": st.one_of(texts, st.lists(texts, max_size=3), st.lists(token, max_size=4),
                                    st.lists(st.lists(token, max_size=3), max_size=3)),
    "echo": st.booleans(), "logprobs": st.one_of(st.integers(0, 20), ints),
    "prompt_logprobs": st.one_of(st.integers(0, 20), ints), "best_of": st.one_of(st.integers(1, 5), ints),
    "suffix": texts, "resume_output_token_ids": st.lists(token, max_size=4),
}
part = st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", ""])}, optional={"text": odd})
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "developer", "user", "assistant", "tool", "function", "bogus"])},
    optional={"content": st.one_of(texts, st.none(), st.lists(part, max_size=2), odd), "name": texts,
              "tool_calls": odd})
CHAT = {
    **SAMPLING, "messages": st.lists(message, max_size=3), "logprobs": st.booleans(),
    "top_logprobs": st.one_of(st.integers(0, 20), ints), "tools": odd, "tool_choice": odd,
    "response_format": odd, "add_generation_prompt": st.booleans(), "continue_final_message": st.booleans(),
    "chat_template_kwargs": st.dictionaries(texts, odd, max_size=2), "chat_template": texts,
}
NEAR = settings(max_examples=80, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


def near_valid(data, base: dict, fields: dict) -> dict:
    body = dict(base)
    for name in data.draw(st.lists(st.sampled_from(sorted(fields)), max_size=3, unique=True)):
        body[name] = data.draw(fields[name], label=name)
    return body


def post(http, path: str, body) -> None:
    r = http.post(path, json=body)
    check_answer(r.status_code, r.text, r.headers, f"POST {path} {body!r:.600}")


@NEAR
@given(st.data())
def test_near_valid_completions(http, greedy_before, data):
    post(http, "/v1/completions", near_valid(data, {"model": MODEL, "prompt": "Hello", "max_tokens": 4}, COMPLETION))


@NEAR
@given(st.data())
def test_near_valid_chat(http, greedy_before, data):
    base = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    post(http, "/v1/chat/completions", near_valid(data, base, CHAT))


# where a client's text may land in an error message or a log line: each gets text with line breaks
BREAKS = st.builds(lambda a, brk, b: a + brk + b, st.text(max_size=6),
                   st.sampled_from(["\n", "\r\n", "\r", "\u2028", "\x85", "\x0b"]), st.text(max_size=6))
INJECT = {
    "model": lambda t: {"prompt": "Hi", "max_tokens": 2, "model": t},
    "logit_bias key": lambda t: {"prompt": "Hi", "max_tokens": 2, "logit_bias": {t: "x"}},
    "stop_token_ids": lambda t: {"prompt": "Hi", "max_tokens": 2, "stop_token_ids": [t]},
    "user": lambda t: {"prompt": "Hi", "max_tokens": 2, "user": [t]},
    "suffix": lambda t: {"prompt": "Hi", "max_tokens": 2, "suffix": t},
    "role": lambda t: {"messages": [{"role": t, "content": "Hi"}], "max_tokens": 2},
    "part type": lambda t: {"messages": [{"role": "user", "content": [{"type": t}]}], "max_tokens": 2},
    "response_format": lambda t: {"messages": [{"role": "user", "content": "Hi"}], "response_format": {"type": t}},
    "disaggregated_params": lambda t: {"prompt": "Hi", "disaggregated_params": {"request_type": t}},
}


@settings(NEAR, max_examples=40)
@given(st.sampled_from(sorted(INJECT)), BREAKS)
def test_line_breaks_in_what_the_client_sent_stay_escaped(http, greedy_before, where, text):
    body = INJECT[where](text)
    post(http, "/v1/chat/completions" if "messages" in body else "/v1/completions", body)


# ---- what the fuzzing found ----------------------------------------------------------------------------
def error_of(r: httpx.Response, status: int = 400) -> dict:
    check_answer(r.status_code, r.text, r.headers, r.request.content[:200])
    assert r.status_code == status, r.text
    return r.json()["error"]


def test_deeply_nested_body_is_a_400(http):
    """Was a 500: the JSON decoder's RecursionError on 5000 nested arrays."""
    for body in (b"[" * 5000 + b"]" * 5000, b'{"prompt": "Hi", "metadata": {"a": ' + b"[" * 5000 + b"]" * 5000 + b"}}"):
        err = error_of(http.post("/v1/completions", content=body))
        assert "nested too deeply" in err["message"], err


@pytest.mark.parametrize("body,param", [
    ({"prompt": "Hi", "max_tokens": 2, "model": "tiny-chat\n"}, "model"),
    ({"prompt": "Hi", "max_tokens": 2, "logit_bias": {"a\nb": "x"}}, "logit_bias.a\\nb"),
])
def test_what_the_client_sent_is_quoted_on_one_line(http, body, param):
    """Was a message of two lines: the model name or a field name holding a newline, copied as is."""
    err = error_of(http.post("/v1/completions", json=body), 404 if param == "model" else 400)
    assert err["param"] == param and "\\n" in err["message"], err


def test_a_requests_chat_template_is_refused(http, server):
    """Was the server's death: a request's template rendering a 200 MB string had it OOM-killed
    (a Jinja template is a program: loops or string products are unbounded). As vLLM, a request's
    template is only rendered by a server started with --trust_request_chat_template."""
    body = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}],
            "chat_template": "{{ messages[0].content * 100000000 }}"}
    err = error_of(http.post("/v1/chat/completions", json=body))
    assert err["param"] == "chat_template" and "--trust_request_chat_template" in err["message"], err
    assert server.proc.poll() is None


def test_a_text_part_without_text_names_it(http):
    """Was "part type 'text' is not supported" for a text part whose text is missing."""
    body = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": [{"type": "text"}]}]}
    err = error_of(http.post("/v1/chat/completions", json=body))
    assert err["param"] == "messages.0.content.0.text" and "text is null or missing" in err["message"], err


def test_logit_bias_keys_must_be_token_ids(http):
    """Were accepted as int() reads them: " 5 " as 5, "5_0" as token 50."""
    for key in (" 5 ", "5_0"):
        err = error_of(http.post("/v1/completions", json={**GREEDY, "logit_bias": {key: 1}}))
        assert err["param"] == "logit_bias" and "token ids" in err["message"], err


def test_unknown_field_names_are_logged_on_one_line(http, server):
    """Was a forged log line: an unknown field named "x\\nWARNING ..." was logged as is."""
    r = http.post("/v1/completions", json={**GREEDY, "max_tokens": 1, "zz\nFORGED log line": 1})
    assert r.status_code == 200, r.text
    log = server.log_tail(200)
    assert "zz\\nFORGED log line" in log and not any(line.startswith("FORGED") for line in log.splitlines())


# ---- afterwards ------------------------------------------------------------------------------------------
def test_the_server_serves_on_unchanged(http, server, greedy_before):
    assert server.proc.poll() is None, server.log_tail()
    assert http.get("/health").json() == {"status": "ok"}
    r = http.post("/v1/completions", json=GREEDY)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == greedy_before
    metrics = server.metrics()
    assert metrics.get("meshserve_num_requests_running", 0) == 0, metrics
