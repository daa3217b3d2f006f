"""Request limits through a real server: every number of a completion or chat request is range-checked
into a 400 that names the field, its value and what is accepted (never a 500, never a stall); `n` is
capped by max_n (--max_n; default max_batch_size, also in LLM.generate); unknown fields are ignored
with a logged warning, as vLLM does (the ones it refuses: test_request_fields.py); unknown roles and null content (but an assistant's) are 400s; a
body over --max_request_body_mb is a 413 whether it declares its length or streams in chunks. After
each bad request a good one still succeeds."""
from __future__ import annotations

import typing

import httpx
import openai
import pytest

from meshserve import SamplingParams
from meshserve.serve.protocol import ChatCompletionRequest, CompletionRequest
from serve_util import start_server
from test_errors import assert_error, assert_good

MODEL = "tiny-chat"
MAX_N = 3  # the server's --max_n; its max_batch_size is 4, so the flag is what limits n
HUGE = 99999999999999999999  # past uint64: msgpack cannot carry it to the engine
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
COMPLETION = {"model": MODEL, "prompt": "Hello", "max_tokens": 4}


@pytest.fixture(scope="module")
def server(tiny_model):
    srv = start_server(tiny_model, "--max_seq_len", "256", "--max_batch_size", "4", "--max_n", str(MAX_N),
                       "--max_request_body_mb", "1")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, headers=server.headers, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=server.api_key, max_retries=0, timeout=30)


def post(http: httpx.Client, kind: str, extra: dict) -> httpx.Response:
    body = {**(CHAT if kind == "chat" else COMPLETION), **extra}
    return http.post("/v1/chat/completions" if kind == "chat" else "/v1/completions", json=body)


OUT_OF_RANGE = [  # (endpoint, fields, param the 400 names, text of the accepted range)
    ("chat", {"seed": HUGE}, "seed", "2**63"),
    ("chat", {"seed": -HUGE}, "seed", "2**63"),
    ("chat", {"seed": 2**63}, "seed", "2**63"),
    ("completion", {"seed": HUGE}, "seed", "2**63"),
    ("completion", {"seed": 2**63 - 1, "n": 2}, "seed", "with n=2, at most 2**63-2"),
    ("chat", {"top_k": HUGE}, "top_k", "2**63-1"),
    ("completion", {"top_k": 10**20}, "top_k", "2**63-1"),
    ("chat", {"top_k": -2}, "top_k", "-1 or 0"),
    ("chat", {"n": HUGE}, "n", f"[1, {MAX_N}]"),
    ("chat", {"n": 1000000}, "n", f"[1, {MAX_N}]"),
    ("completion", {"n": MAX_N + 1}, "n", f"[1, {MAX_N}]"),
    ("completion", {"n": MAX_N + 1, "best_of": MAX_N + 1}, "best_of", f"[1, {MAX_N}]"),
    ("completion", {"best_of": HUGE}, "best_of", f"[1, {MAX_N}]"),
    ("chat", {"max_tokens": HUGE}, "max_tokens", "at most"),
    ("chat", {"max_completion_tokens": HUGE}, "max_completion_tokens", "at most"),
    ("completion", {"max_tokens": 10**12}, "max_tokens", "at most"),
    ("chat", {"min_tokens": HUGE}, "min_tokens", "2**63-1"),
    ("chat", {"stop_token_ids": [HUGE]}, "stop_token_ids", "2**63-1"),
    ("chat", {"stop_token_ids": [10**9]}, "stop_token_ids", "vocabulary"),
    ("chat", {"logit_bias": {str(HUGE): 1}}, "logit_bias", "token ids"),
    ("chat", {"logit_bias": {"5": HUGE}}, "logit_bias", "[-100, 100]"),
    ("chat", {"logprobs": True, "top_logprobs": HUGE}, "top_logprobs", "20"),
    ("completion", {"logprobs": HUGE}, "logprobs", "20"),
    ("completion", {"prompt_logprobs": HUGE}, "prompt_logprobs", "20"),
    ("chat", {"temperature": 10**400}, "temperature", "number"),
    ("chat", {"temperature": -HUGE}, "temperature", ">= 0"),
    ("chat", {"top_p": HUGE}, "top_p", "(0, 1]"),
    ("chat", {"min_p": HUGE}, "min_p", "[0, 1]"),
    ("chat", {"presence_penalty": HUGE}, "presence_penalty", "[-2, 2]"),
    ("chat", {"frequency_penalty": -HUGE}, "frequency_penalty", "[-2, 2]"),
    ("chat", {"repetition_penalty": 10**400}, "repetition_penalty", "number"),
    ("completion", {"prompt": [1, HUGE]}, "prompt", "vocabulary"),
    ("completion", {"prompt": [[1, 2], [HUGE]]}, "prompt", "vocabulary"),
]


@pytest.mark.parametrize("kind,extra,param,accepted", OUT_OF_RANGE,
                         ids=[f"{k}-{p}-{i}" for i, (k, _, p, _) in enumerate(OUT_OF_RANGE)])
def test_out_of_range_number_is_a_one_line_400_naming_field_value_and_range(http, kind, extra, param, accepted):
    value = extra.get(param, next(iter(extra.values())))
    err = assert_error(post(http, kind, extra), 400, param, (accepted,))
    assert "\n" not in err["message"]
    if isinstance(value, int):  # float fields show it as a float
        assert str(value)[:15] in err["message"] or repr(float(value)) in err["message"], err["message"]
    assert_good(http)


@pytest.mark.parametrize("kind,extra", [
    ("chat", {"seed": 2**63 - 1}), ("chat", {"seed": -(2**63)}), ("completion", {"seed": -1}),
    ("chat", {"top_k": -1}), ("chat", {"top_k": 2**40}), ("chat", {"logit_bias": {"5": -100}}),
    ("completion", {"n": MAX_N, "best_of": MAX_N, "seed": 2**63 - MAX_N, "temperature": 1.0}),
])
def test_numbers_at_the_edges_of_their_range_are_served(http, kind, extra):
    r = post(http, kind, extra)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == extra.get("n", 1)


def _numeric_fields(model) -> list[tuple[str, object]]:
    """(field, annotation) of every field of `model` that holds numbers (ints or floats, bare,
    in a list, or as a dict's values)."""
    def numeric(tp) -> bool:
        return tp in (int, float) or any(numeric(a) for a in typing.get_args(tp))
    return [(name, f.annotation) for name, f in model.model_fields.items()
            if numeric(f.annotation) and f.annotation is not bool]


def _shaped(annotation, value):
    """`value` in the shape the field takes: bare, in a list, or as the value of a dict entry."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    for a in args:
        if a in (int, float):
            return value
    for a in args:
        origin = typing.get_origin(a)
        if origin is list:
            return [value]
        if origin is dict:
            return {"5": value}
    raise AssertionError(f"no shape for {annotation}")


SWEEP = [("chat", n, a) for n, a in _numeric_fields(ChatCompletionRequest)] + \
        [("completion", n, a) for n, a in _numeric_fields(CompletionRequest)]


@pytest.mark.parametrize("kind,name,annotation", SWEEP, ids=[f"{k}-{n}" for k, n, _ in SWEEP])
def test_every_numeric_field_with_a_huge_value_is_served_or_a_400_naming_it(http, kind, name, annotation):
    """Covers fields added later too: none may turn a huge number into a 500."""
    assert len(SWEEP) >= 20
    for value in (HUGE, -HUGE, 10**400):
        extra = {name: _shaped(annotation, value)}
        if name == "top_logprobs":
            extra["logprobs"] = True
        r = post(http, kind, extra)
        assert r.status_code in (200, 400), (value, r.text)
        if r.status_code == 400:
            assert r.json()["error"]["param"].split(".")[0] == name, r.text
    assert_good(http)


def test_n_over_the_limit_through_the_openai_client_then_n_at_the_limit(client):
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=MODEL, messages=CHAT["messages"], max_tokens=2, n=1000000)
    assert exc.value.body["param"] == "n" and "1000000" in exc.value.body["message"]
    assert f"[1, {MAX_N}]" in exc.value.body["message"]
    out = client.chat.completions.create(model=MODEL, messages=CHAT["messages"], max_tokens=2, n=MAX_N)
    assert len(out.choices) == MAX_N


def test_a_huge_seed_through_the_openai_client_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model=MODEL, prompt="Hello", max_tokens=2, seed=HUGE)
    assert exc.value.status_code == 400 and exc.value.body["param"] == "seed"


def test_unknown_fields_are_ignored_with_a_warning_in_the_log(server, http, client):
    out = client.chat.completions.create(model=MODEL, messages=CHAT["messages"], max_tokens=2,
                                         reasoning_effort="low", extra_body={"frobnicate_v2": {"x": 1}})
    assert out.choices[0].message.role == "assistant"
    r = post(http, "completion", {"brand_new_field": 1, "stream": True,
                                  "stream_options": {"include_usage": True, "future_option": True}})
    assert r.status_code == 200 and "data: [DONE]" in r.text
    log = server.log_tail(400)
    for field in ("reasoning_effort", "frobnicate_v2", "brand_new_field", "future_option"):
        assert any("ignoring request field" in line and field in line for line in log.splitlines()), field


def test_a_known_field_with_a_value_of_the_wrong_type_is_still_a_400(http):
    assert_error(post(http, "chat", {"temperature": "hot"}), 400, "temperature", ("hot",))
    assert_error(post(http, "completion", {"stream": "yes please"}), 400, "stream")
    assert_good(http)


@pytest.mark.parametrize("messages,param,contains", [
    ([{"role": "wizard", "content": "Hi"}], "messages.0.role", ("wizard", "'user'", "'assistant'")),
    ([{"role": "user", "content": None}], "messages.0.content", ("null", "user")),
    ([{"role": "user"}], "messages.0.content", ("missing",)),
    ([{"role": "system", "content": "Be brief."}, {"role": "tool", "content": None}], "messages.1.content",
     ("tool",)),
])
def test_unknown_role_and_null_content_are_400(http, messages, param, contains):
    err = assert_error(post(http, "chat", {"messages": messages}), 400, param, contains)
    assert "\n" not in err["message"]
    assert_good(http)


def test_an_assistant_message_may_have_null_content(http):
    messages = [{"role": "user", "content": "Hi"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "42"},
                {"role": "user", "content": "And?"}]
    r = post(http, "chat", {"messages": messages})
    assert r.status_code == 200, r.text


def test_llm_generate_caps_n_at_max_batch_size_unless_max_n_says_otherwise(tiny_model):
    from meshserve import LLM

    kw = dict(max_batch_size=2, max_seq_len=64, show_progress=False,
              kv_cache_config={"tokens_per_block": 4, "max_tokens": 1024})
    with LLM(tiny_model, **kw) as llm:
        with pytest.raises(ValueError, match=r"SamplingParams.n=3 is invalid: expected an integer in \[1, 2\]"):
            llm.generate("Hello", SamplingParams(n=3, max_tokens=2), use_tqdm=False)
        assert len(llm.generate("Hello", SamplingParams(n=2, max_tokens=2), use_tqdm=False).outputs) == 2
    with LLM(tiny_model, max_n=3, **kw) as llm:
        assert len(llm.generate("Hello", SamplingParams(n=3, max_tokens=2), use_tqdm=False).outputs) == 3
        with pytest.raises(ValueError, match=r"\[1, 3\]"):
            llm.generate("Hello", SamplingParams(n=4, max_tokens=2), use_tqdm=False)


@pytest.mark.parametrize("kw,field", [
    (dict(seed=2**64), "seed"), (dict(seed=-(2**63) - 1), "seed"), (dict(top_k=2**63), "top_k"),
    (dict(top_k=-7), "top_k"), (dict(min_tokens=2**64, max_tokens=None), "min_tokens"),
    (dict(stop_token_ids=[2**64]), "stop_token_ids"), (dict(logit_bias={2**64: 1.0}), "logit_bias"),
    (dict(logit_bias={5: 10**400}), "logit_bias"), (dict(temperature=float("inf")), "temperature"),
    (dict(repetition_penalty=float("nan")), "repetition_penalty"), (dict(end_id=2**64), "end_id"),
])
def test_sampling_params_refuse_numbers_out_of_range(kw, field):
    with pytest.raises(ValueError, match=rf"^SamplingParams\.{field}=.* is invalid: expected"):
        SamplingParams(**kw)


def test_n_beyond_max_n_is_refused_by_validate_for_model():
    SamplingParams(n=4).validate_for_model(vocab_size=10, max_n=4)
    with pytest.raises(ValueError, match=r"^SamplingParams\.n=99999999999999999999 is invalid: .*\[1, 4\]"):
        SamplingParams(n=HUGE).validate_for_model(vocab_size=10, max_n=4)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_body_over_max_request_body_mb_is_a_413(http, chunked):
    body = ('{"model": "%s", "max_tokens": 4, "prompt": "%s"}' % (MODEL, "a " * 600_000)).encode()  # 1.2 MB

    def pieces():
        for i in range(0, len(body), 65536):
            yield body[i:i + 65536]

    r = http.post("/v1/completions", content=pieces() if chunked else body,
                  headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text
    err = r.json()["error"]
    assert err["code"] == "request_too_large" and "1048576 bytes" in err["message"] and "\n" not in err["message"]
    assert_good(http)
