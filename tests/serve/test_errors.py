"""Error statuses and their OpenAI shape over raw HTTP; after each bad request a good one succeeds."""
from __future__ import annotations

import time

import httpx
import pytest

from serve_util import API_KEY, start_server

MODEL = "tiny-chat"
MAX_SEQ_LEN = 256


@pytest.fixture(scope="module")
def server(tiny_model):
    srv = start_server(tiny_model, "--max_seq_len", str(MAX_SEQ_LEN), "--max_batch_size", "1",
                       "--max_waiting_requests", "1")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, headers=server.headers, timeout=30) as c:
        yield c


def assert_error(r: httpx.Response, status: int, param=None, contains=()) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if param is not None:
        assert err["param"] == param, err
    for text in contains:
        assert text in err["message"], err["message"]
    return err


def assert_good(http: httpx.Client) -> None:
    r = http.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 3,
                                                "messages": [{"role": "user", "content": "Hi"}]})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1


CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
COMPLETION = {"model": MODEL, "prompt": "Hello", "max_tokens": 4}

BAD_REQUESTS = [
    ("chat", {**CHAT, "temperature": -1}, "temperature", ()),
    ("chat", {**CHAT, "top_p": 1.5}, "top_p", ()),
    ("chat", {**CHAT, "max_tokens": "many"}, "max_tokens", ()),
    ("chat", {**CHAT, "max_tokens": 0}, "max_tokens", ()),
    ("chat", {**CHAT, "n": 0}, "n", ()),
    ("chat", {**CHAT, "top_logprobs": 50, "logprobs": True}, "top_logprobs", ()),
    ("chat", {**CHAT, "top_logprobs": 2}, "top_logprobs", ()),
    ("chat", {**CHAT, "logit_bias": {"999999": 5}}, "logit_bias", ("999999",)),
    ("chat", {**CHAT, "presence_penalty": 3}, "presence_penalty", ()),
    ("chat", {"model": MODEL, "messages": []}, "messages", ()),
    ("chat", {"model": MODEL}, "messages", ()),
    ("chat", {**CHAT, "stream_options": {"include_usage": True}}, None, ("stream",)),
    ("chat", {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, None, ("image_url",)),
    ("completion", {**COMPLETION, "prompt": []}, "prompt", ()),
    ("completion", {**COMPLETION, "prompt": [1, 2, 99999]}, "prompt", ("99999",)),
    ("completion", {**COMPLETION, "logprobs": 21}, "logprobs", ()),
    ("completion", {**COMPLETION, "stop": [""]}, "stop", ()),
    ("completion", {**COMPLETION, "min_tokens": 9}, "min_tokens", ()),
]


@pytest.mark.parametrize("kind,body,param,contains", BAD_REQUESTS,
                         ids=[f"{k}-{p or c[0]}-{i}" for i, (k, _, p, c) in enumerate(BAD_REQUESTS)])
def test_invalid_field_is_400_then_good_request_works(http, kind, body, param, contains):
    path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
    assert_error(http.post(path, json=body), 400, param, contains)
    assert_good(http)


@pytest.mark.parametrize("stream", [False, True])
def test_malformed_json_is_400(http, stream):
    r = http.post("/v1/chat/completions", content=b'{"model": "tiny-chat", "messages": [',
                  headers={"Content-Type": "application/json"})
    assert_error(r, 400, contains=("JSON",))
    assert_error(http.post("/v1/completions", content=b"[1, 2]"), 400)
    assert_good(http)


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {**COMPLETION, "prompt": "Hello", "max_tokens": 1000}, "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 1000}, "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "max_completion_tokens": 1000}, "max_completion_tokens"),
])
def test_prompt_plus_max_tokens_beyond_context_is_400_naming_both_numbers(http, tiny_tokenizer, path, body, param):
    err = assert_error(http.post(path, json=body), 400, param)
    assert "1000" in err["message"] and str(MAX_SEQ_LEN) in err["message"]
    assert_good(http)


def test_prompt_longer_than_the_context_is_400(http):
    err = assert_error(http.post("/v1/completions", json={**COMPLETION, "prompt": "Hello world " * 200}), 400)
    assert str(MAX_SEQ_LEN) in err["message"]
    assert_good(http)


def test_missing_or_wrong_key_is_401_and_health_needs_none(server, http):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("GET", "/metrics"),
                             ("GET", "/version")):
            r = httpx.request(method, server.base_url + path, headers=headers, json=CHAT, timeout=10)
            assert_error(r, 401)
    assert httpx.get(server.base_url + "/health", timeout=10).status_code == 200
    assert_good(http)


def test_unknown_model_is_404(http):
    err = assert_error(http.post("/v1/chat/completions", json={**CHAT, "model": "gpt-17"}), 404, "model")
    assert "gpt-17" in err["message"]
    assert_error(http.post("/v1/completions", json={**COMPLETION, "model": "gpt-17"}), 404, "model")
    assert_error(http.get("/v1/nowhere"), 404)
    assert_good(http)


def test_version_and_models(http):
    version = http.get("/version").json()
    assert version["version"]
    assert version["kernel_config"]["device"] == "cpu" and version["kernel_config"]["attn_prefill_rows"] == 256
    assert http.get("/v1/models").json()["data"][0]["id"] == MODEL


def _long_stream(server, max_tokens=200):
    body = {**COMPLETION, "max_tokens": max_tokens, "stream": True, "ignore_eos": True}
    return httpx.stream("POST", server.base_url + "/v1/completions", json=body, headers=server.headers, timeout=30)


@pytest.fixture(scope="module")
def busy_server(tiny_model):
    """One running sequence at a time and one waiting; a context long enough (2048, the model's limit) that the first
    stream is still running when the third request comes (200 tokens of the tiny model took ~0.2 s:
    the first could finish before the second was even queued, which made this test flaky)."""
    srv = start_server(tiny_model, "--max_seq_len", "2048", "--max_batch_size", "1", "--max_waiting_requests", "1")
    yield srv
    srv.stop()


def test_full_waiting_queue_is_503_with_retry_after(busy_server):
    server = busy_server
    # max_batch_size=1: the first stream runs, the second waits; the waiting queue (limit 1) is full.
    with httpx.Client(base_url=server.base_url, headers=server.headers, timeout=30) as http, \
            _long_stream(server, 1900) as first:
        assert first.status_code == 200
        lines = first.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))  # running: it has a token
        with _long_stream(server, 1900) as second:
            assert second.status_code == 200
            r = http.post("/v1/chat/completions", json=CHAT)
            assert_error(r, 503)
            assert int(r.headers["Retry-After"]) >= 1
        deadline = time.monotonic() + 20  # both streams were dropped: they are aborted, the queue empties
        while time.monotonic() < deadline:
            r = http.post("/v1/chat/completions", json=CHAT)
            if r.status_code == 200:
                break
            time.sleep(0.2)
        assert r.status_code == 200, r.text
    assert server.metrics()["meshserve_request_errors_total[503]"] >= 1


def test_bad_requests_are_counted_as_400(server):
    assert server.metrics()["meshserve_request_errors_total[400]"] >= len(BAD_REQUESTS)


def test_engine_death_turns_health_to_503(server, http):
    """Last in this module: it kills the engine process."""
    import psutil

    engine = [p for p in psutil.Process(server.proc.pid).children()
              if "resource_tracker" not in " ".join(p.cmdline())]
    assert len(engine) == 1
    # TensorRT-LLM's /health_generate: a token through the engine (with the key: it costs a step)
    assert http.get("/health_generate").json() == {"status": "ok"}
    assert httpx.get(server.base_url + "/health_generate", timeout=10).status_code == 401
    engine[0].kill()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and httpx.get(server.base_url + "/health").status_code == 200:
        time.sleep(0.1)
    r = httpx.get(server.base_url + "/health")
    assert r.status_code == 503
    assert_error(http.post("/v1/chat/completions", json=CHAT), 503)
    assert "engine is not running" in assert_error(http.get("/health_generate"), 503)["message"]
    assert server.metrics()["meshserve_engine_healthy"] == 0
