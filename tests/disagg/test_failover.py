"""Failover of the disaggregated orchestrator: a generation server that dies, stalls past
`stall_timeout` or sends a 5xx error event mid-stream, and the request goes on elsewhere with the
output so far given back (`resume_output_token_ids`), in one client stream.

Against fake servers (fake_servers.py): completions and chat, the stall timeout, a dropped
connection, an error event, a server silent before answering, a context server in a pinch, the
limits, and the bodies sent. Against real servers (`meshserve serve` over a tiny random Llama, one
context and two generation servers): a generation server killed (SIGKILL) or stopped (SIGSTOP)
while it streams, and the client's text equal to an uninterrupted run's, greedy and seeded; a
resumed completion's text at every boundary (multi-byte characters split across tokens); a forged
`disaggregated_params` sent straight to a generation server refused."""
from __future__ import annotations

import json
import os
import signal
import sys
import time

import httpx
import openai
import pytest

from fake_servers import (FULL_TEXT, MODEL, PROMPT_IDS, TOKEN_IDS, TOKENS, FakeContextServer,
                          FakeGenerationServer)
from meshserve.disagg.orchestrator import StreamRelay, UpstreamFailed
from test_orchestrator import OrchestratorThread, config, wait_for

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def fakes():
    servers = {"ctx": FakeContextServer("ctx").start(), "gen_a": FakeGenerationServer("gen_a").start(),
               "gen_b": FakeGenerationServer("gen_b").start()}
    yield servers
    for s in servers.values():
        s.stop()


@pytest.fixture(autouse=True)
def _reset(fakes):
    for s in fakes.values():
        if s._server is None:
            s.start()
        s.received.clear()
        s.sent.clear()
        s.stream_closed.clear()
        s.healthy, s.fail_status, s.delay, s.chunk_delay = True, None, 0.0, 0.005
        s.die_after = s.stall_after = s.error_after = None
    yield


@pytest.fixture
def orchestrator():
    started = []

    def make(cfg: dict, **kw) -> OrchestratorThread:
        started.append(OrchestratorThread(cfg, **kw))
        return started[-1]

    yield make
    for o in started:
        o.stop()


def events(data: bytes) -> list:
    return [json.loads(e[6:]) if e != b"data: [DONE]" else "[DONE]" for e in data.split(b"\n\n") if e]


def stream(o: OrchestratorThread, route: str, body: dict) -> list:
    with httpx.stream("POST", o.url + route, json={**body, "stream": True}, timeout=30) as r:
        assert r.status_code == 200, r.read()
        return events(b"".join(r.iter_bytes()))


def texts(evs: list, chat: bool) -> list[str]:
    out = []
    for e in evs:
        for c in e["choices"] if isinstance(e, dict) and "choices" in e else ():
            out.append(c["delta"].get("content", "") if chat else c["text"])
    return out


def failovers(o: OrchestratorThread) -> float:
    return o.metrics().get("meshserve_disagg_failovers_total", 0.0)


def two_gens(fakes, **top) -> dict:
    return config([fakes["ctx"]], [fakes["gen_a"], fakes["gen_b"]], **top)


# ---- the relay on its own -------------------------------------------------------------------------------
def test_stream_relay_skips_what_the_client_has_and_counts_one_run():
    relay = StreamRelay(chat=True, want_ids=False)
    head = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": "m"}

    def chat(content, ids, finish=None, **extra):
        return {**head, "choices": [{"index": 0, "delta": {"content": content}, "logprobs": None,
                                     "finish_reason": finish, "token_ids": ids}], **extra}

    role = {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}], "prompt_token_ids": [1]}
    assert relay.feed(role) == [{**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}]
    assert relay.feed(chat("Hel", [5])) == [{**head, "choices": [{"index": 0, "delta": {"content": "Hel"},
                                                                  "logprobs": None, "finish_reason": None}]}]
    assert relay.feed(chat("", [6])) == []  # token ids only (half a character): nothing for this client
    out = relay.feed(chat("lo\u00e9", [7], finish="abort"))  # the server gave up: not an end
    assert out[0]["choices"][0]["finish_reason"] is None and relay.aborted and not relay.finished
    assert relay.ids == [5, 6, 7] and relay.text == "Hel" + "lo\u00e9" and relay.can_resume()

    relay.resume(chat_upstream=False, given=3)  # a resumed completion: its text starts with the whole output's
    resumed = {"id": "cmpl-9", "object": "text_completion", "created": 9, "model": "m"}
    out = relay.feed({**resumed, "choices": [{"index": 0, "text": "Hello\u00e9 w", "token_ids": [8],
                                              "prompt_token_ids": [1, 5, 6, 7]}], "usage": None})
    assert out == [{**head, "choices": [{"index": 0, "delta": {"content": " w"}, "logprobs": None,
                                         "finish_reason": None, "stop_reason": None}], "usage": None}]
    assert relay.diverged is None and relay.ids == [5, 6, 7, 8]
    out = relay.feed({**resumed, "choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 1,
                                                          "total_tokens": 5}})
    assert out == [{**head, "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 4, "total_tokens": 5}}]
    assert relay.usage_sent
    with pytest.raises(UpstreamFailed, match="the engine is not running"):
        relay.feed({"error": {"message": "the engine is not running", "type": "server_error", "code": 503}})
    assert relay.feed({"error": {"message": "bad", "type": "invalid_request_error", "code": 400}}) is None


# ---- fake servers ---------------------------------------------------------------------------------------
def test_a_stalled_stream_goes_on_elsewhere_without_lost_or_repeated_text(orchestrator, fakes):
    gen_a, gen_b = fakes["gen_a"], fakes["gen_b"]
    o = orchestrator(two_gens(fakes, stall_timeout=0.5, health_check_interval=60))
    gen_a.stall_after = 3  # "Hello", " from", " the"; then silence, the connection open
    t0 = time.monotonic()
    evs = stream(o, "/v1/completions", {"model": MODEL, "prompt": "Say hi", "max_tokens": 6, "temperature": 0})
    assert 0.5 <= time.monotonic() - t0 < 10
    assert texts(evs, chat=False) == TOKENS and evs[-1] == "[DONE]"  # each token once, in order
    assert {(e["id"], e["created"], e["model"], e["object"]) for e in evs[:-1]} == {
        (f"gen-{gen_a.name}", evs[0]["created"], MODEL, "text_completion")}  # one stream, as the client saw it begin
    assert all("token_ids" not in c and "prompt_token_ids" not in c for e in evs[:-1] for c in e["choices"])
    assert evs[-2]["choices"][0]["finish_reason"] == "length"
    (resumed,) = gen_b.received
    assert resumed["path"] == "/v1/completions"
    assert resumed["body"] == {"model": MODEL, "temperature": 0, "max_tokens": 3, "prompt": PROMPT_IDS,
                               "resume_output_token_ids": TOKEN_IDS[:3], "return_token_ids": True, "stream": True}
    assert resumed["headers"]["x-request-id"] == gen_a.received[0]["headers"]["x-request-id"]
    wait_for(lambda: gen_a.stream_closed == [True] and o.orch.generation[0].inflight == 0)
    assert not o.orch.generation[0].healthy  # skipped until /health answers 200 again
    m = o.metrics()
    assert failovers(o) == 1 and m['meshserve_disagg_failures_total{stage="generation"}'] == 1
    assert m["meshserve_disagg_request_seconds_count"] == 1


def test_a_chat_stream_cut_short_goes_on_as_chat_chunks_with_usage_of_one_run(orchestrator, fakes):
    gen_a, gen_b = fakes["gen_a"], fakes["gen_b"]
    o = orchestrator(two_gens(fakes))
    gen_a.die_after = 3  # the role chunk, "Hello", " from"; then the connection drops
    client = openai.OpenAI(base_url=o.url + "/v1", api_key="EMPTY", max_retries=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=6, stream=True, stream_options={"include_usage": True}))
    assert [c.choices[0].delta.role for c in chunks if c.choices].count("assistant") == 1
    assert [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content] == TOKENS
    assert {c.id for c in chunks} == {"gen-gen_a"} and {c.object for c in chunks} == {"chat.completion.chunk"}
    assert chunks[-1].usage.prompt_tokens == 5 and chunks[-1].usage.completion_tokens == len(TOKENS)
    assert chunks[-2].choices[0].finish_reason == "length"
    (resumed,) = gen_b.received
    body = resumed["body"]
    assert resumed["path"] == "/v1/completions" and "messages" not in body  # the rendered prompt's ids instead
    assert body["prompt"] == PROMPT_IDS and body["resume_output_token_ids"] == TOKEN_IDS[:2]
    assert body["max_tokens"] == 4 and body["stream_options"] == {"include_usage": True}
    assert failovers(o) == 1


def test_token_ids_asked_by_the_client_come_once_each_across_a_failover(orchestrator, fakes):
    fakes["gen_a"].error_after = 4  # a 503 error event (the engine died) after 4 tokens
    o = orchestrator(two_gens(fakes))
    evs = stream(o, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 6, "return_token_ids": True})
    ids = [t for e in evs[:-1] for c in e["choices"] for t in c["token_ids"]]
    assert ids == TOKEN_IDS and "".join(texts(evs, chat=False)) == FULL_TEXT
    assert [c.get("prompt_token_ids") for e in evs[:-1] for c in e["choices"]] == [PROMPT_IDS] + [None] * 5
    assert not any("error" in e for e in evs[:-1]) and failovers(o) == 1


def test_a_generation_server_silent_before_answering_is_replaced_from_the_start(orchestrator, fakes):
    gen_a, gen_b = fakes["gen_a"], fakes["gen_b"]
    o = orchestrator(two_gens(fakes), request_timeout=1.0)
    gen_a.delay = 5  # it took the request (and the context KV) and says nothing
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6}
    r = o.post("/v1/chat/completions", body)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == FULL_TEXT
    assert gen_b.received[0]["body"] == body  # the client's request, as an ordinary one
    assert failovers(o) == 1
    gen_a.delay = 0
    o.orch.generation[0].healthy = True
    gen_a.stall_after = 0  # streaming: no chunk at all -> from the start too, the role chunk once
    o.orch.config.stall_timeout = 0.3
    evs = stream(o, "/v1/chat/completions", body)
    assert "".join(texts(evs, chat=True)) == FULL_TEXT
    assert [c["delta"].get("role") for e in evs[:-1] for c in e["choices"]].count("assistant") == 1
    assert gen_b.received[1]["body"] == {**body, "stream": True, "return_token_ids": True}


def test_a_context_server_takes_over_in_a_pinch(orchestrator, fakes):
    ctx, gen_a = fakes["ctx"], fakes["gen_a"]
    o = orchestrator(config([ctx], [gen_a], stall_timeout=0.3))
    gen_a.stall_after = 2
    evs = stream(o, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 6})
    assert "".join(texts(evs, chat=False)) == FULL_TEXT
    assert ctx.received[-1]["body"]["resume_output_token_ids"] == TOKEN_IDS[:2]
    assert failovers(o) == 1


def test_servers_counted_unhealthy_are_probed_before_a_stream_is_given_up(orchestrator, fakes):
    """Every other server missed its last health check (a loaded host) but answers now: the failover
    probes them and goes on on the generation server, instead of ending the stream."""
    gen_a, gen_b = fakes["gen_a"], fakes["gen_b"]
    o = orchestrator(two_gens(fakes, stall_timeout=0.5, health_check_interval=60))
    wait_for(lambda: all(s.healthy for s in o.orch.generation + o.orch.context))
    gen_a.stall_after = 2
    raw = b""
    with httpx.stream("POST", o.url + "/v1/completions", timeout=30,
                      json={"model": MODEL, "prompt": "x", "max_tokens": 6, "stream": True}) as r:
        for chunk in r.iter_bytes():
            if not raw:  # gen_a streams: the others miss a health check now (a loaded host)
                o.orch.generation[1].healthy = o.orch.context[0].healthy = False
            raw += chunk
    evs = events(raw)
    assert "".join(texts(evs, chat=False)) == FULL_TEXT and evs[-1] == "[DONE]"
    assert gen_b.received and gen_b.received[-1]["body"]["resume_output_token_ids"] == TOKEN_IDS[:2]
    assert failovers(o) == 1 and o.orch.generation[1].healthy


def test_limits_and_what_is_not_continued(orchestrator, fakes):
    gen_a, gen_b = fakes["gen_a"], fakes["gen_b"]
    o = orchestrator(two_gens(fakes, max_failovers=1, stall_timeout=0.3))
    gen_a.stall_after, gen_b.die_after = 2, 1  # the second failure is one too many
    evs = stream(o, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 6})
    assert "".join(texts(evs[:-2], chat=False)) == "".join(TOKENS[:3])
    error = evs[-2]["error"]
    assert error["code"] == 502 and "failed mid-stream" in error["message"] and "max_failovers=1" in error["message"]
    assert evs[-1] == "[DONE]" and failovers(o) == 1

    for s in o.orch.generation:
        s.healthy = True
    gen_a.stall_after, gen_b.die_after = None, 6  # every token and its finish_reason sent, [DONE] missing
    evs = stream(o, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 6})
    got = stream(o, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 6})
    for e in (evs, got):
        assert "".join(texts(e, chat=False)) == FULL_TEXT and e[-1] == "[DONE]"
    assert failovers(o) == 1  # nothing left to continue

    o.stop()
    gen_a.die_after, gen_b.die_after = 2, None
    o = orchestrator(two_gens(fakes, max_failovers=0))
    evs = stream(o, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 6})
    assert "max_failovers=0" in evs[-2]["error"]["message"] and failovers(o) == 0


def test_an_echoed_stream_is_not_resumed(orchestrator, fakes):
    fakes["gen_a"].die_after = 2  # the resumed text would not start with the echoed prompt
    o = orchestrator(two_gens(fakes))
    evs = stream(o, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 6, "echo": True})
    assert "a stream with echo is not resumed" in evs[-2]["error"]["message"] and failovers(o) == 0
    assert not fakes["gen_b"].received


@pytest.mark.parametrize("route,extra", [("/v1/completions", {"prompt": "x", "logprobs": 2}),
                                         ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                                   "logprobs": True})])
def test_a_stream_with_logprobs_is_not_resumed(orchestrator, fakes, route, extra):
    """A resumed run would send its tokens without logprobs: the client gets the error event instead."""
    fakes["gen_a"].die_after = 2
    o = orchestrator(two_gens(fakes))
    evs = stream(o, route, {"model": MODEL, "max_tokens": 6, **extra})
    assert "a stream with logprobs is not resumed" in evs[-2]["error"]["message"] and failovers(o) == 0
    assert not fakes["gen_b"].received


def test_several_sequences_or_streamed_prompt_logprobs_are_refused_before_any_server_is_asked(orchestrator, fakes):
    o = orchestrator(two_gens(fakes))
    for route, body in (("/v1/completions", {"prompt": "x", "n": 2}),
                        ("/v1/completions", {"prompt": "x", "best_of": 3}),
                        ("/v1/completions", {"prompt": "x", "n": "2"}),  # the servers' pydantic takes "2" as 2
                        ("/v1/completions", {"prompt": "x", "n": 2.0}),
                        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 4})):
        r = o.post(route, {"model": MODEL, **body})
        err = r.json()["error"]
        key = "n" if "n" in body else "best_of"
        assert r.status_code == 400 and err["param"] == key and f"{key}={int(body[key])}" in err["message"], err
        assert "disaggregated_params" not in err["message"] and "\n" not in err["message"]
    r = o.post("/v1/completions", {"model": MODEL, "prompt": "x", "stream": True, "prompt_logprobs": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_logprobs", r.text
    r = o.post("/v1/completions", {"model": MODEL, "prompt": "x", "use_beam_search": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "use_beam_search", r.text
    assert all(not s.received for s in fakes.values())


def test_clients_cannot_send_what_the_orchestrator_sets(orchestrator, fakes):
    o = orchestrator(two_gens(fakes))
    for key, value in (("disaggregated_params", {"request_type": "generation_only", "opaque_state": "forged"}),
                       ("resume_output_token_ids", [1, 2])):
        r = o.post("/v1/completions", {"model": MODEL, "prompt": "x", key: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == key
        assert "set by the orchestrator" in r.json()["error"]["message"]
    assert all(not s.received for s in fakes.values())


# ---- real servers -------------------------------------------------------------------------------------
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "serve"))
from serve_util import ServerProcess, free_port  # noqa: E402

from helpers import build_checkpoint  # noqa: E402
from test_e2e import DISAGG_YAML, SERVER_FLAGS, Orchestrator  # noqa: E402


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("failover")
    model = str(tmp / "tiny")
    build_checkpoint(model, "llama", max_position_embeddings=2048, num_hidden_layers=16)
    yaml_path = tmp / "server.yml"
    yaml_path.write_text(DISAGG_YAML)
    old = os.environ.get("MESHSERVE_SECRET")
    os.environ["MESHSERVE_SECRET"] = "meshserve-failover-test-secret"
    servers, orch = [], None
    try:
        ctx = ServerProcess(model, *SERVER_FLAGS, "--config", str(yaml_path), log_dir=str(tmp))
        gens = [ServerProcess(model, *SERVER_FLAGS, "--config", str(yaml_path), log_dir=str(tmp)) for _ in range(2)]
        servers = [ctx, *gens]
        for s in servers:
            s.wait_ready(240)
        port = free_port()
        cfg = tmp / "disagg-config.yml"
        cfg.write_text(f"hostname: 127.0.0.1\nport: {port}\ncontext_servers:\n  urls: [\"127.0.0.1:{ctx.port}\"]\n"
                       f"generation_servers:\n  urls: [" + ", ".join(f'"127.0.0.1:{g.port}"' for g in gens) + "]\n"
                       "health_check_interval: 0.5\nstall_timeout: 3\n")
        url = f"http://127.0.0.1:{port}"
        orch = Orchestrator(str(cfg), str(tmp / "orchestrator.log")).wait_healthy(url)
        model_id = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        yield {"ctx": ctx, "gens": gens, "url": url, "orch": orch, "model": model_id}
    finally:
        for s in servers:
            if s.proc.poll() is None:
                os.kill(s.proc.pid, signal.SIGCONT)
        if orch is not None:
            assert orch.stop() == 0
        for s in servers:
            s.stop()
        if old is None:
            os.environ.pop("MESHSERVE_SECRET", None)
        else:
            os.environ["MESHSERVE_SECRET"] = old


def real_metrics(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def frozen_holder(cluster) -> ServerProcess:
    """The generation server the orchestrator has a stream open on, left SIGSTOPped. Every live
    generation server is stopped first, so the stream cannot end while the orchestrator is asked
    (on a loaded machine a fast server can finish the whole stream between the client's chunk and
    the question); the others are continued."""
    live = [g for g in cluster["gens"] if g.proc.poll() is None]
    for g in live:
        os.kill(g.proc.pid, signal.SIGSTOP)
    held = None
    try:
        health = httpx.get(cluster["url"] + "/health", timeout=10).json()
        busy = [s["url"] for s in health["generation_servers"] if s["inflight"]]
        assert len(busy) == 1, health
        held = next(g for g in live if busy[0].endswith(f":{g.port}"))
    finally:
        for g in live:
            if g is not held:
                os.kill(g.proc.pid, signal.SIGCONT)
    return held


def stream_text(url: str, route: str, body: dict, on_chunk=None) -> tuple[str, list[dict]]:
    """The streamed text of a request, and its events; on_chunk(n) is called after the n-th event."""
    chat = route.endswith("chat/completions")
    parts, evs = [], []
    with httpx.stream("POST", url + route, json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            e = json.loads(line[6:])
            assert "error" not in e, e
            evs.append(e)
            for c in e["choices"]:
                parts.append((c["delta"].get("content") or "") if chat else c["text"])
            if on_chunk is not None:
                on_chunk(len(evs))
    return "".join(parts), evs


def wait_healthy(cluster, timeout=30.0) -> None:
    deadline = time.monotonic() + timeout
    while not all(s["healthy"] for s in httpx.get(cluster["url"] + "/health").json()["generation_servers"]
                  if any(s["url"].endswith(f":{g.port}") for g in cluster["gens"] if g.proc.poll() is None)):
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_resumed_completions_equal_the_whole_run_at_every_boundary(cluster):
    """The servers' side: `resume_output_token_ids` = the first k output tokens gives the whole
    output's text and the rest of its ids, wherever the cut falls (inside a multi-byte character
    too: the tokenizer is byte-level BPE, the model random)."""
    gen = cluster["gens"][0]
    body = {"model": cluster["model"], "prompt": "The quick brown fox", "max_tokens": 40, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True}
    text, evs = stream_text(gen.base_url, "/v1/completions", body)
    ids = [t for e in evs for c in e["choices"] for t in c["token_ids"]]
    prompt = evs[0]["choices"][0]["prompt_token_ids"]
    assert len(ids) == 40
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(gen.log_path), "tiny"))
    split = [k for k in range(1, 40) if tok.decode(ids[:k]).endswith("\ufffd")]  # a character cut in two
    assert split
    cuts = sorted(set(split[:4] + [1, 2, 17, 39]))
    for k in cuts:
        resumed = {**body, "prompt": prompt, "resume_output_token_ids": ids[:k], "max_tokens": 40 - k}
        got, got_evs = stream_text(gen.base_url, "/v1/completions", resumed)
        assert got == text, (k, got, text)
        assert [t for e in got_evs for c in e["choices"] for t in c["token_ids"]] == ids[k:], k
        whole = httpx.post(gen.base_url + "/v1/completions", json=resumed, timeout=60).json()
        assert whole["choices"][0]["text"] == text and whole["usage"]["completion_tokens"] == 40 - k
    seeded = {**body, "temperature": 1.0, "seed": 1234}
    text, evs = stream_text(gen.base_url, "/v1/completions", seeded)
    ids = [t for e in evs for c in e["choices"] for t in c["token_ids"]]
    got, _ = stream_text(gen.base_url, "/v1/completions", {**seeded, "prompt": prompt,
                                                            "resume_output_token_ids": ids[:13], "max_tokens": 27})
    assert got == text  # the seed goes on where the first run's was
    # penalties count the given tokens as outputs, min_tokens (less what was produced, as the
    # orchestrator sends it) still bans the stop id, and a stop string straddling the cut is caught
    sampled = {**body, "temperature": 0.8, "seed": 99, "presence_penalty": 1.2, "frequency_penalty": 0.6,
               "repetition_penalty": 1.3}
    text, evs = stream_text(gen.base_url, "/v1/completions", sampled)
    ids = [t for e in evs for c in e["choices"] for t in c["token_ids"]]

    def resumed(req: dict, given: list[int], min_tokens: int = 0) -> tuple[str, list[int]]:
        r = {**req, "prompt": prompt, "resume_output_token_ids": given, "max_tokens": 40 - len(given)}
        r.pop("min_tokens", None)
        if min_tokens > len(given):
            r["min_tokens"] = min_tokens - len(given)
        got, got_evs = stream_text(gen.base_url, "/v1/completions", r)
        return got, [t for e in got_evs for c in e["choices"] for t in c["token_ids"]]

    for k in (1, 3, 9, 26):
        assert resumed(sampled, ids[:k]) == (text, ids[k:]), k
    limited = {**sampled, "ignore_eos": False, "stop_token_ids": [ids[2]], "min_tokens": 4}
    want, want_evs = stream_text(gen.base_url, "/v1/completions", limited)
    want_ids = [t for e in want_evs for c in e["choices"] for t in c["token_ids"]]
    assert ids[2] not in want_ids[:3]
    for k in (1, 2, 3, 5):
        if k < len(want_ids):
            assert resumed(limited, want_ids[:k], 4) == (want, want_ids[k:]), k
    for cut in range(3, 30):  # a 4-character stop string, two characters either side of the cut
        head = tok.decode(ids[:cut])
        if text.startswith(head) and len(head) >= 2 and text.find(text[len(head) - 2:len(head) + 2]) == len(head) - 2:
            break
    stop = text[len(head) - 2:len(head) + 2]
    want, _ = stream_text(gen.base_url, "/v1/completions", {**sampled, "stop": [stop]})
    assert want == text[:len(head) - 2] and len(stop) == 4
    assert resumed({**sampled, "stop": [stop]}, ids[:cut])[0] == want


def test_a_stopped_generation_server_stalls_and_the_chat_stream_goes_on(cluster):
    url = cluster["url"]
    body = {"model": cluster["model"], "messages": [{"role": "user", "content": "Tell me a story"}],
            "max_tokens": 80, "temperature": 0, "ignore_eos": True, "stream_options": {"include_usage": True}}
    want, want_evs = stream_text(url, "/v1/chat/completions", body)
    before = real_metrics(url).get("meshserve_disagg_failovers_total", 0)
    stopped = []

    def stop(n):
        if n == 20:
            stopped.append(frozen_holder(cluster))  # silent: no chunk, no /health, the connection open

    try:
        got, got_evs = stream_text(url, "/v1/chat/completions", body, stop)
    finally:
        for s in stopped:
            os.kill(s.proc.pid, signal.SIGCONT)
    assert stopped and got == want
    assert got_evs[-1]["usage"]["completion_tokens"] == 80 == want_evs[-1]["usage"]["completion_tokens"]
    assert got_evs[-1]["usage"]["prompt_tokens"] == want_evs[-1]["usage"]["prompt_tokens"]
    assert len({e["id"] for e in got_evs}) == 1
    assert real_metrics(url)["meshserve_disagg_failovers_total"] == before + 1
    wait_healthy(cluster)

    seeded = {**body, "temperature": 0.9, "seed": 7}  # sampled: the same with a seed
    want, _ = stream_text(url, "/v1/chat/completions", seeded)
    stopped.clear()
    try:
        got, _ = stream_text(url, "/v1/chat/completions", seeded, stop)
    finally:
        for s in stopped:
            os.kill(s.proc.pid, signal.SIGCONT)
    assert stopped and got == want
    assert real_metrics(url)["meshserve_disagg_failovers_total"] == before + 2
    wait_healthy(cluster)


def _stream_killing_the_holder(cluster, body):
    """Stream `body` through the orchestrator and kill -9 the generation server holding it after 20
    chunks: (text, events, [the killed server], failover counter before)."""
    url = cluster["url"]
    deadline = time.monotonic() + 30  # a generation server the orchestrator counts healthy takes the stream
    while not any(s["healthy"] for s in httpx.get(url + "/health").json()["generation_servers"]):
        assert time.monotonic() < deadline, "no healthy generation server to stream from"
        time.sleep(0.2)
    before = real_metrics(url).get("meshserve_disagg_failovers_total", 0)
    killed = []

    def kill(n):
        if n == 20:
            killed.append(frozen_holder(cluster))
            os.kill(killed[0].proc.pid, signal.SIGKILL)

    got, evs = stream_text(url, "/v1/completions", body, kill)
    assert killed and killed[0].proc.wait(10) == -signal.SIGKILL
    return got, evs, killed, before


def test_a_killed_generation_server_mid_stream_loses_nothing(cluster):
    url = cluster["url"]
    body = {"model": cluster["model"], "prompt": "Once upon a time there was", "max_tokens": 300, "temperature": 0,
            "ignore_eos": True}
    want, _ = stream_text(url, "/v1/completions", body)
    got, evs, killed, before = _stream_killing_the_holder(cluster, body)
    assert got == want and len(got) > 0
    assert evs[-1]["choices"][0]["finish_reason"] == "length"
    assert real_metrics(url)["meshserve_disagg_failovers_total"] == before + 1
    health = httpx.get(url + "/health").json()
    dead = next(s for s in health["generation_servers"] if s["url"].endswith(f":{killed[0].port}"))
    assert dead["healthy"] is False and health["status"] == "ok"
    r = httpx.post(url + "/v1/completions", json={**body, "max_tokens": 8}, timeout=60)  # the survivor serves
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8


def test_a_forged_disaggregated_params_is_refused_by_the_generation_server(cluster):
    from meshserve.disagg import params

    gen = next(g for g in cluster["gens"] if g.proc.poll() is None)
    forged = params.sign({"v": 1, "ctx_request_id": "x", "prompt_token_ids": [1, 2, 3], "first_token": 5,
                          "layouts": [], "block_ids": [[0]], "num_tokens": 3}, b"not the servers' secret")
    r = httpx.post(gen.base_url + "/v1/completions", timeout=30, json={
        "model": cluster["model"], "prompt": [1, 2, 3], "max_tokens": 4, "disaggregated_params": {
            "request_type": "generation_only", "first_gen_tokens": [5], "ctx_request_id": "x", "opaque_state": forged}})
    assert r.status_code == 400 and "signature does not match" in r.json()["error"]["message"]
    r = httpx.post(cluster["url"] + "/v1/completions", timeout=30, json={
        "model": cluster["model"], "prompt": [1, 2, 3], "disaggregated_params": {"request_type": "generation_only",
                                                                                 "opaque_state": forged}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "disaggregated_params"


def test_a_killed_stream_with_penalties_and_a_seed_goes_on_as_uninterrupted(cluster):
    """Sampled with a seed, presence / frequency / repetition penalties and min_tokens: the server
    that takes over counts the tokens given back as outputs (engine/request.py), so the client's
    text equals an uninterrupted run's. Last in the file: it kills the other generation server, so
    the context server takes over (in a pinch)."""
    url = cluster["url"]
    body = {"model": cluster["model"], "prompt": "Once upon a time there was", "max_tokens": 120,
            "temperature": 0.9, "seed": 4242, "top_p": 0.95, "presence_penalty": 1.1, "frequency_penalty": 0.7,
            "repetition_penalty": 1.2, "min_tokens": 60, "return_token_ids": True}
    want, want_evs = stream_text(url, "/v1/completions", body)
    got, evs, killed, before = _stream_killing_the_holder(cluster, body)
    assert got == want and len(got) > 0
    ids = [t for e in evs for c in e["choices"] for t in c.get("token_ids") or ()]
    assert ids == [t for e in want_evs for c in e["choices"] for t in c.get("token_ids") or ()]
    assert evs[-1]["choices"][0]["finish_reason"] == want_evs[-1]["choices"][0]["finish_reason"]
    assert real_metrics(url)["meshserve_disagg_failovers_total"] == before + 1
