"""Disaggregated serving end to end on CPU: two context servers and one generation server (real
`meshserve serve` processes over a tiny random Llama, `cache_transceiver_config: {backend: DEFAULT}`)
behind `meshserve disaggregated`, against one aggregated server of the same checkpoint: the same
greedy text for completions and chat, streamed and not, and usage alike."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "serve"))
from serve_util import REPO, ServerProcess, free_port  # noqa: E402

from helpers import assert_logprobs_close, build_checkpoint  # noqa: E402

pytestmark = pytest.mark.timeout(300)

SERVER_FLAGS = ("--max_batch_size", "8", "--max_seq_len", "512")
AGG_YAML = "kv_cache_config:\n  max_tokens: 4096\n"
DISAGG_YAML = "cache_transceiver_config:\n  backend: DEFAULT\n" + AGG_YAML


class Orchestrator:
    def __init__(self, config_path: str, log_path: str):
        self.log = open(log_path, "w")
        self.log_path = log_path
        cmd = [sys.executable, "-m", "meshserve", "disaggregated", "-c", config_path, "-t", "120",
               "--allowed_origins", "https://app.example"]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO,
                                     start_new_session=True)

    def wait_healthy(self, url: str, timeout_s: float = 30.0) -> "Orchestrator":
        """Until `url`/health answers 200; fails with the orchestrator's log if it exits or times out."""
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.proc.poll() is None, open(self.log_path).read()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, open(self.log_path).read()
            time.sleep(0.2)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(10)
        finally:
            self.log.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("disagg")
    model = str(tmp / "tiny")
    build_checkpoint(model, "llama", max_position_embeddings=2048)
    yaml_path, agg_yaml = tmp / "server.yml", tmp / "aggregated.yml"
    yaml_path.write_text(DISAGG_YAML)
    agg_yaml.write_text(AGG_YAML)
    old = os.environ.get("MESHSERVE_SECRET")
    os.environ["MESHSERVE_SECRET"] = "meshserve-e2e-test-secret"  # the servers must share it
    servers = []
    try:
        agg = ServerProcess(model, *SERVER_FLAGS, "--config", str(agg_yaml), log_dir=str(tmp))
        servers.append(agg)
        ctx = [ServerProcess(model, *SERVER_FLAGS, "--config", str(yaml_path), log_dir=str(tmp)) for _ in range(2)]
        gen = ServerProcess(model, *SERVER_FLAGS, "--config", str(yaml_path), log_dir=str(tmp))
        servers += [*ctx, gen]
        for s in servers:
            s.wait_ready(240)
        port = free_port()
        config = tmp / "disagg-config.yml"
        config.write_text(
            f"hostname: 127.0.0.1\nport: {port}\nbackend: pytorch\ncontext_servers:\n  num_instances: 2\n  urls:\n"
            + "".join(f"    - \"127.0.0.1:{s.port}\"\n" for s in ctx)
            + f"generation_servers:\n  num_instances: 1\n  urls:\n    - \"127.0.0.1:{gen.port}\"\n")
        url = f"http://127.0.0.1:{port}"
        orch = Orchestrator(str(config), str(tmp / "orchestrator.log")).wait_healthy(url)
        yield {"agg": agg, "ctx": ctx, "gen": gen, "url": url, "orch": orch}
        assert orch.stop() == 0
    finally:
        for s in servers:
            s.stop()
        if old is None:
            os.environ.pop("MESHSERVE_SECRET", None)
        else:
            os.environ["MESHSERVE_SECRET"] = old


def clients(cluster):
    agg = openai.OpenAI(base_url=cluster["agg"].base_url + "/v1", api_key="EMPTY", max_retries=0, timeout=120)
    dis = openai.OpenAI(base_url=cluster["url"] + "/v1", api_key="EMPTY", max_retries=0, timeout=120)
    return agg, dis


def test_completions_match_the_aggregated_server(cluster):
    agg, dis = clients(cluster)
    model = agg.models.list().data[0].id
    assert [m.id for m in dis.models.list().data] == [model]
    assert dis.models.retrieve(model).id == model  # one card, through the orchestrator
    with pytest.raises(openai.NotFoundError, match="does not exist; the servers serve"):
        dis.models.retrieve("org/absent")
    for prompt, extra in (("The quick brown fox", {"ignore_eos": True}), ("Once upon a time there was", {}),
                          ([5, 17, 33, 90, 101, 7], {"ignore_eos": True}),
                          # min_tokens past the context server's one token (was a 500 there)
                          ("Once upon a time there was", {"min_tokens": 12}),
                          ("The quick brown fox", {"min_tokens": 16, "ignore_eos": True})):
        kw = dict(model=model, prompt=prompt, max_tokens=16, temperature=0, extra_body=extra)
        want, got = agg.completions.create(**kw), dis.completions.create(**kw)
        assert got.choices[0].text == want.choices[0].text, prompt
        assert got.choices[0].finish_reason == want.choices[0].finish_reason
        assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (want.usage.prompt_tokens,
                                                                          want.usage.completion_tokens)
        want_text = "".join(c.choices[0].text for c in agg.completions.create(**kw, stream=True) if c.choices)
        got_text = "".join(c.choices[0].text for c in dis.completions.create(**kw, stream=True) if c.choices)
        assert got_text == want_text == want.choices[0].text


def test_chat_matches_the_aggregated_server_streamed_and_not(cluster):
    agg, dis = clients(cluster)
    model = agg.models.list().data[0].id
    for content in ("Explain quantum computing", "Hello there, how are you today?"):
        kw = dict(model=model, messages=[{"role": "user", "content": content}], max_tokens=16, temperature=0,
                  extra_body={"ignore_eos": True})
        want, got = agg.chat.completions.create(**kw), dis.chat.completions.create(**kw)
        assert got.choices[0].message.content == want.choices[0].message.content
        assert got.usage.completion_tokens == want.usage.completion_tokens == 16

        def streamed(client):
            chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            return text, chunks[-1].usage.completion_tokens

        assert streamed(dis) == streamed(agg) == (want.choices[0].message.content, 16)


def test_logprobs_through_the_orchestrator_match_the_aggregated_server(cluster):
    """The first token's logprobs come from the context server (signed into disaggregated_params),
    the rest from the generation server: completions (with echo too) and chat, streamed and not."""
    agg, dis = clients(cluster)
    model = agg.models.list().data[0].id
    kw = dict(model=model, prompt="The quick brown fox", max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    for extra in ({"logprobs": 3}, {"logprobs": 1, "echo": True}):
        want, got = agg.completions.create(**kw, **extra), dis.completions.create(**kw, **extra)
        assert got.choices[0].text == want.choices[0].text
        assert_logprobs_close(got.choices[0].logprobs.model_dump(), want.choices[0].logprobs.model_dump())
        assert len(got.choices[0].logprobs.tokens) == 8 + (len(want.choices[0].logprobs.tokens) - 8
                                                          if extra.get("echo") else 0)

    def streamed(client):
        lp = {"tokens": [], "token_logprobs": [], "top_logprobs": []}
        for c in client.completions.create(**kw, logprobs=2, stream=True):
            for ch in c.choices:
                if ch.logprobs:
                    for k in lp:
                        lp[k] += getattr(ch.logprobs, k)
        return lp

    got = streamed(dis)
    assert_logprobs_close(got, streamed(agg))
    assert len(got["tokens"]) == 8

    chat = dict(model=model, messages=[{"role": "user", "content": "Explain quantum computing"}], max_tokens=8,
                temperature=0, logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    want, got = agg.chat.completions.create(**chat), dis.chat.completions.create(**chat)
    assert_logprobs_close([e.model_dump() for e in got.choices[0].logprobs.content],
           [e.model_dump() for e in want.choices[0].logprobs.content])
    assert len(got.choices[0].logprobs.content) == 8

    def chat_streamed(client):
        return [e.model_dump() for c in client.chat.completions.create(**chat, stream=True) for ch in c.choices
                if ch.logprobs for e in ch.logprobs.content]

    assert_logprobs_close(chat_streamed(dis), chat_streamed(agg))


def test_both_context_servers_served_and_the_request_id_reached_them(cluster):
    agg, dis = clients(cluster)
    model = agg.models.list().data[0].id
    for i in range(2):
        r = httpx.post(cluster["url"] + "/v1/completions", headers={"X-Request-Id": f"e2e-id-{i}"}, timeout=120,
                       json={"model": model, "prompt": "A B C", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200 and r.headers["x-request-id"] == f"e2e-id-{i}"
    logs = [s.log_tail(10_000) for s in cluster["ctx"]]
    assert all("context_only" in log for log in logs)  # round robin reached both
    assert any("e2e-id-0" in log for log in logs) and any("e2e-id-1" in log for log in logs)
    assert "e2e-id-0" in cluster["gen"].log_tail(10_000)
    metrics = httpx.get(cluster["url"] + "/metrics").text
    assert "meshserve_disagg_context_seconds_count" in metrics


def _used_blocks(server) -> float:
    text = httpx.get(server.base_url + "/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("meshserve_kv_cache_used_blocks"))


def test_a_request_over_max_seq_len_is_the_aggregated_servers_400_and_pins_nothing(cluster):
    """prompt + max_tokens over max_seq_len (512, every server's): the aggregated server's 400 (the
    field and the limit), and no context server keeps the prompt's KV pinned for it (it used to
    prefill the prompt with max_tokens=1 and pin its blocks until kv_transfer_timeout_ms, 30 s, for a
    generation server that then refused the request)."""
    agg, dis = clients(cluster)
    model = agg.models.list().data[0].id
    deadline = time.monotonic() + 10  # earlier tests' pins are released by the generation server's ack
    while any(_used_blocks(s) for s in cluster["ctx"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    cases = [lambda c, **kw: c.completions.create(model=model, prompt=list(range(10, 310)), max_tokens=300,
                                                  temperature=0, **kw),
             lambda c, **kw: c.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}],
                                                       max_tokens=600, temperature=0, **kw),
             lambda c, **kw: c.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}],
                                                       max_completion_tokens=600, temperature=0, **kw)]
    for i, call in enumerate(cases * 2):  # twice: round robin reaches both context servers
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as want:
                call(agg, stream=stream)
            with pytest.raises(openai.BadRequestError) as got:
                call(dis, stream=stream)
            want_err, got_err = want.value.response.json()["error"], got.value.response.json()["error"]
            assert got_err == want_err, (i, stream)
            assert "max_seq_len=512" in want_err["message"] and "\n" not in want_err["message"]
            assert want_err["param"] in ("max_tokens", "max_completion_tokens")
    time.sleep(0.5)  # a pin would be released only by kv_transfer_timeout_ms (30 s)
    assert [_used_blocks(s) for s in cluster["ctx"]] == [0, 0]


def test_structured_outputs_and_tool_calls_through_the_orchestrator(cluster):
    """The context server holds the first token to the grammar, the generation server the rest: the
    answer equals the aggregated server's (docs/structured_outputs.md)."""
    import re

    agg, dis = clients(cluster)
    model = agg.models.list().data[0].id
    regex = r"[a-c]{2}-[0-9]{2,3}"
    kw = dict(model=model, prompt="The quick brown fox", max_tokens=16, temperature=0,
              extra_body={"guided_regex": regex})
    want, got = agg.completions.create(**kw), dis.completions.create(**kw)
    assert got.choices[0].text == want.choices[0].text and re.fullmatch(regex, got.choices[0].text)
    tools = [{"type": "function", "function": {"name": "pick", "parameters": {
        "type": "object", "properties": {"color": {"enum": ["red", "blue"]}}, "required": ["color"]}}}]
    kw = dict(model=model, messages=[{"role": "user", "content": "Pick one"}], max_tokens=24, temperature=0,
              tools=tools, tool_choice={"type": "function", "function": {"name": "pick"}})
    want, got = agg.chat.completions.create(**kw), dis.chat.completions.create(**kw)
    assert got.choices[0].message.tool_calls[0].function.name == "pick"
    assert (got.choices[0].message.tool_calls[0].function.arguments
            == want.choices[0].message.tool_calls[0].function.arguments)


def test_tokenize_and_reset_prefix_cache_through_the_orchestrator(cluster):
    """vLLM's /tokenize and /detokenize answer as the aggregated server does; /reset_prefix_cache
    resets every server's cache (a repeated prompt finds nothing cached after it) and is a 409 naming
    the server whose running request holds KV blocks."""
    agg, url = cluster["agg"].base_url, cluster["url"]
    body = {"prompt": "The quick brown fox jumps"}
    want = httpx.post(agg + "/tokenize", json=body, timeout=30)
    got = httpx.post(url + "/tokenize", json=body, timeout=30)
    assert want.status_code == got.status_code == 200 and got.json() == want.json(), got.text
    back = httpx.post(url + "/detokenize", json={"tokens": want.json()["tokens"]}, timeout=30)
    assert back.status_code == 200 and back.json() == httpx.post(agg + "/detokenize", json={
        "tokens": want.json()["tokens"]}, timeout=30).json()
    bad = httpx.post(url + "/tokenize", json={"prompt": 5}, timeout=30)  # the server's 400, passed on
    assert bad.status_code == 400 and "prompt" in bad.text, bad.text
    # the orchestrator takes serve's CORS flags (--allowed_origins https://app.example here)
    pre = {"Access-Control-Request-Method": "POST"}
    r = httpx.options(url + "/v1/completions", headers={"Origin": "https://app.example", **pre})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
    assert httpx.options(url + "/v1/completions", headers={"Origin": "https://evil.example", **pre}).status_code == 400

    servers = [*cluster["ctx"], cluster["gen"]]
    prompt = "pack my box with five dozen liquor jugs " * 6
    model = openai.OpenAI(base_url=agg + "/v1", api_key="EMPTY").models.list().data[0].id

    def counters(server) -> tuple[float, float]:
        text = httpx.get(server.base_url + "/metrics", timeout=10).text
        return tuple(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))
                     for name in ("meshserve_prefix_cache_queries_total", "meshserve_prefix_cache_hits_total"))

    def cached(server) -> float:
        """The prompt tokens the server found cached for the prompt (its hits counter's increase, read
        once the lookup's queries have reached /metrics with the engine's stats)."""
        queries, hits = counters(server)
        r = httpx.post(server.base_url + "/v1/completions", timeout=60,
                       json={"model": model, "prompt": prompt, "max_tokens": 2})
        assert r.status_code == 200, r.text
        deadline = time.monotonic() + 10
        while (now := counters(server))[0] == queries:
            assert time.monotonic() < deadline, "the prefix cache lookup never reached /metrics"
            time.sleep(0.02)
        return now[1] - hits

    for s in servers:
        cached(s)
        assert cached(s) > 0
    r = httpx.post(url + "/reset_prefix_cache", timeout=60)
    assert r.status_code == 200, r.text
    assert sorted(r.json()["reset"]) == sorted(f"127.0.0.1:{s.port}" for s in servers), r.text
    assert [cached(s) for s in servers] == [0, 0, 0]
    assert all(cached(s) > 0 for s in servers)
    # a context answer's KV stays pinned on its server until a generation server pulls it
    ctx, gen = cluster["ctx"][0], cluster["gen"]
    body = {"model": model, "prompt": prompt, "max_tokens": 4, "temperature": 0}
    first = httpx.post(ctx.base_url + "/v1/completions", timeout=60,
                       json={**body, "disaggregated_params": {"request_type": "context_only"}})
    assert first.status_code == 200, first.text
    r = httpx.post(url + "/reset_prefix_cache", timeout=60)
    err = r.json()["error"]["message"]
    assert r.status_code == 409 and f"not reset on 127.0.0.1:{ctx.port}:" in err, r.text
    others = [cluster["ctx"][1], gen]
    assert all(f"127.0.0.1:{s.port}" in err.split("; reset on ")[-1] for s in others), err
    assert cached(ctx) > 0  # the busy server kept its cache
    params = {**first.json()["disaggregated_params"], "request_type": "generation_only"}
    done = httpx.post(gen.base_url + "/v1/completions", timeout=60, json={**body, "disaggregated_params": params})
    assert done.status_code == 200, done.text  # the pull releases the pin
    deadline = time.monotonic() + 10
    while (r := httpx.post(url + "/reset_prefix_cache", timeout=60)).status_code == 409 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert r.status_code == 200, r.text
