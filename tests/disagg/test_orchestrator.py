"""The disaggregated orchestrator against fake context and generation servers (fake_servers.py):
the context-first flow and the bodies it forwards, SSE passthrough, the three routers, health
checks, retries, errors, the config file and /metrics. The real servers: test_e2e.py."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import uvicorn

from fake_servers import (CONTINUATION, FIRST_ID, FIRST_TEXT, FULL_TEXT, MODEL, FakeContextServer,
                          FakeGenerationServer, free_port, opaque_state)
from meshserve.commands import main as cli
from meshserve.disagg.orchestrator import ConfigError, Orchestrator, build_app, parse_config
from meshserve.disagg.router import KvCacheAwareRouter, LoadBalancingRouter, RoundRobinRouter, Server

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.timeout(60)


class OrchestratorThread:
    """The orchestrator's app on a uvicorn thread (its lifespan starts the health checks)."""

    def __init__(self, config: dict, request_timeout: float = 30.0, key=None):
        self.orch = Orchestrator(parse_config(config), request_timeout, key=key)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(build_app(self.orch), host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the orchestrator did not start"
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    def post(self, route: str, body: dict, **kw) -> httpx.Response:
        return httpx.post(self.url + route, json=body, timeout=10, **kw)

    def metrics(self) -> dict[str, float]:
        return self.metrics_of(self.url)

    @staticmethod
    def metrics_of(url: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for line in httpx.get(url + "/metrics").text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = out.get(name, 0.0) + float(value)
        return out


@pytest.fixture(scope="module")
def fakes():
    servers = {"ctx_a": FakeContextServer("ctx_a").start(), "ctx_b": FakeContextServer("ctx_b").start(),
               "gen": FakeGenerationServer("gen").start()}
    yield servers
    for s in servers.values():
        s.stop()


@pytest.fixture
def ctx_a(fakes):
    return fakes["ctx_a"]


@pytest.fixture
def ctx_b(fakes):
    return fakes["ctx_b"]


@pytest.fixture
def gen(fakes):
    return fakes["gen"]


@pytest.fixture(autouse=True)
def _reset(fakes):
    for s in fakes.values():
        if s._server is None:
            s.start()
        s.received.clear()
        s.sent.clear()
        s.healthy, s.fail_status, s.delay, s.chunk_delay = True, None, 0.0, 0.005
        s.die_after = s.stall_after = s.error_after = None
        s.stream_closed.clear()
        if isinstance(s, FakeContextServer):
            s.finish_at_context = False
    yield


def config(ctx, gen, ctx_router="round_robin", gen_router="round_robin", **top) -> dict:
    return {"hostname": "127.0.0.1", "port": 0, "backend": "pytorch",
            "context_servers": {"num_instances": len(ctx), "urls": [s.address for s in ctx],
                                "router": {"type": ctx_router} if isinstance(ctx_router, str) else ctx_router},
            "generation_servers": {"num_instances": len(gen), "urls": [s.address for s in gen],
                                   "router": {"type": gen_router}},
            "health_check_interval": 0.2, **top}


@pytest.fixture
def orchestrator():
    started = []

    def make(cfg: dict, **kw) -> OrchestratorThread:
        started.append(OrchestratorThread(cfg, **kw))
        return started[-1]

    yield make
    for o in started:
        o.stop()


# ---- the flow -----------------------------------------------------------------------------------------
def test_completion_flow_forwards_the_bodies_and_the_request_id(orchestrator, ctx_a, gen):
    o = orchestrator(config([ctx_a], [gen]))
    body = {"model": MODEL, "prompt": "Say hi", "max_tokens": 6, "temperature": 0, "stream": False}
    r = o.post("/v1/completions", body, headers={"X-Request-Id": "req-123"})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == FULL_TEXT and "disaggregated_params" not in r.json()
    assert r.headers["x-request-id"] == "req-123"
    (ctx_in,), (gen_in,) = ctx_a.received, gen.received
    assert ctx_in["body"] == {**body, "stream": False, "return_token_ids": True,  # the prompt's ids, for failover
                              "disaggregated_params": {"request_type": "context_only"}}
    assert gen_in["body"] == {**body, "disaggregated_params": {
        "request_type": "generation_only", "first_gen_tokens": [FIRST_ID], "ctx_request_id": "ctx_a-" + str(
            ctx_a.count), "opaque_state": opaque_state("ctx_a")}}
    assert ctx_in["headers"]["x-request-id"] == gen_in["headers"]["x-request-id"] == "req-123"

    r = o.post("/v1/completions", body)  # no id: one is made up, the same for both servers
    rid = r.headers["x-request-id"]
    assert len(rid) >= 16 and ctx_a.received[1]["headers"]["x-request-id"] == rid
    assert gen.received[1]["headers"]["x-request-id"] == rid


def sse_events(data: bytes) -> list:
    return [json.loads(e[6:]) if e != b"data: [DONE]" else "[DONE]" for e in data.split(b"\n\n") if e]


def without_ids(event):
    if not isinstance(event, dict):
        return event
    event = {k: v for k, v in event.items() if k != "prompt_token_ids"}
    if "choices" in event:
        event["choices"] = [{k: v for k, v in c.items() if k not in ("token_ids", "prompt_token_ids")}
                            for c in event["choices"]]
    return event


def test_stream_is_relayed_event_for_event_and_the_context_hop_does_not_stream(orchestrator, ctx_a, gen):
    o = orchestrator(config([ctx_a], [gen]))
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", o.url + "/v1/chat/completions", json=body, timeout=10) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        got = b"".join(r.iter_bytes())
    # what the generation server sent, less the token ids the orchestrator asked for (return_token_ids)
    sent = sse_events(bytes(gen.sent[0]))
    assert "token_ids" in sent[1]["choices"][0] and "prompt_token_ids" in sent[0]
    assert sse_events(got) == [without_ids(e) for e in sent]
    ctx_body = ctx_a.received[0]["body"]
    assert ctx_body["stream"] is False and "stream_options" not in ctx_body
    gen_body = gen.received[0]["body"]
    assert gen_body["stream"] is True and gen_body["stream_options"] == {"include_usage": True}
    assert gen_body["return_token_ids"] is True

    body["return_token_ids"] = True  # a client that asks for them gets them as the server sent them
    with httpx.stream("POST", o.url + "/v1/chat/completions", json=body, timeout=10) as r:
        got = b"".join(r.iter_bytes())
    assert sse_events(got) == sse_events(bytes(gen.sent[1]))


def test_openai_client_chat_and_completions_streaming_and_not(orchestrator, ctx_a, ctx_b, gen):
    o = orchestrator(config([ctx_a, ctx_b], [gen]))
    client = openai.OpenAI(base_url=o.url + "/v1", api_key="EMPTY", max_retries=0)
    assert [m.id for m in client.models.list().data] == [MODEL]
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Explain quantum "
                                                                  "computing"}], max_tokens=512)
    assert chat.choices[0].message.content == FULL_TEXT and chat.usage.completion_tokens == 1 + len(CONTINUATION)
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=8, stream=True)
    pieces = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
    assert pieces == [FIRST_TEXT, *CONTINUATION]
    done = client.completions.create(model=MODEL, prompt="Once", max_tokens=6)
    assert done.choices[0].text == FULL_TEXT
    text = "".join(c.choices[0].text for c in client.completions.create(model=MODEL, prompt="Once", max_tokens=6,
                                                                       stream=True))
    assert text == FULL_TEXT
    assert len(ctx_a.received) == len(ctx_b.received) == 2  # round robin over the two context servers


def test_first_token_that_finishes_is_answered_by_the_context_server(orchestrator, ctx_a, gen):
    ctx_a.finish_at_context = True
    o = orchestrator(config([ctx_a], [gen]))
    r = o.post("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == FIRST_TEXT
    client = openai.OpenAI(base_url=o.url + "/v1", api_key="EMPTY", max_retries=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == FIRST_TEXT
    assert chunks[-1].usage.completion_tokens == 1
    assert gen.received == []


def test_client_errors_are_answered_cleanly(orchestrator, ctx_a, gen):
    o = orchestrator(config([ctx_a], [gen]))
    r = httpx.post(o.url + "/v1/completions", content=b"{not json", timeout=10)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = o.post("/v1/completions", {"prompt": "x", "disaggregated_params": {"request_type": "generation_only"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "disaggregated_params"
    ctx_a.fail_status = 400  # a server's 4xx: as it is, no retry
    r = o.post("/v1/completions", {"prompt": "x"})
    assert r.status_code == 400 and r.json()["error"]["message"] == "ctx_a fails on purpose"
    assert len(ctx_a.received) == 1 and gen.received == []
    ctx_a.fail_status, gen.fail_status = None, 503
    r = o.post("/v1/completions", {"prompt": "x"})
    assert r.status_code == 503 and r.json()["error"]["message"] == "gen fails on purpose"
    r = o.post("/v1/embeddings", {"input": "x"})  # a route it does not serve: named, with the ones it does
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert r.json()["error"]["message"].startswith("POST /v1/embeddings is not served here; this server serves ")
    assert "POST /v1/completions" in r.json()["error"]["message"]
    r = httpx.get(o.url + "/v1/chat/completions", timeout=10)
    assert r.status_code == 405 and r.json()["error"]["message"].endswith("/v1/chat/completions takes POST")


def test_a_client_that_goes_away_cancels_its_request(orchestrator, ctx_a, gen):
    o = orchestrator(config([ctx_a], [gen]))
    ctx_a.delay = 1.0  # gone during the context hop: no generation hop
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(o.url + "/v1/completions", json={"prompt": "x"}, timeout=0.3)
    wait_for(lambda: o.orch.context[0].inflight == 0)
    time.sleep(1.0)
    assert len(ctx_a.received) == 1 and gen.received == []
    ctx_a.delay, gen.chunk_delay = 0, 0.3  # gone mid-stream: the generation server's stream is closed
    with httpx.stream("POST", o.url + "/v1/completions", json={"prompt": "x", "stream": True}, timeout=10) as r:
        next(r.iter_bytes())
    wait_for(lambda: o.orch.generation[0].inflight == 0)
    time.sleep(2.0)  # the whole stream takes 6 x 0.3 s: it was cut short
    assert gen.stream_closed == [True] and not gen.sent[0].endswith(b"[DONE]\n\n")


# ---- routers ------------------------------------------------------------------------------------------
def servers(n: int) -> list[Server]:
    return [Server(f"127.0.0.1:{9000 + i}", "context") for i in range(n)]


def test_round_robin_takes_the_servers_in_turn_and_skips_the_missing():
    s = servers(3)
    router = RoundRobinRouter(s)
    assert [router.choose(s, {}) for _ in range(6)] == s + s
    assert [router.choose([s[0], s[2]], {}) for _ in range(4)] == [s[0], s[2], s[0], s[2]]


def test_load_balancing_takes_the_least_busy_ties_in_turn():
    s = servers(3)
    router = LoadBalancingRouter(s)
    s[0].inflight, s[1].inflight, s[2].inflight = 3, 1, 2
    assert router.choose(s, {}) is s[1]
    assert router.choose([s[0], s[2]], {}) is s[2]
    for x in s:
        x.inflight = 0
    assert {id(router.choose(s, {})) for _ in range(3)} == {id(x) for x in s}


def test_kv_cache_aware_follows_the_longest_prefix_and_falls_back_to_load():
    s = servers(3)
    router = KvCacheAwareRouter(s, block_size=4, max_imbalance=2)
    system = "You are a helpful assistant. "  # 7 blocks of 4 characters
    first = router.choose(s, {"prompt": system + "Question one"})
    assert all(router.choose(s, {"prompt": system + q}) is first for q in ("Two?", "and three", "4"))
    first.inflight = 1  # a new prefix: the least busy of the others
    other = router.choose(s, {"prompt": "Completely different text here"})
    assert other is not first
    assert router.choose(s, {"prompt": "Completely different text, again"}) is other
    assert router.choose([x for x in s if x is not first], {"prompt": system + "x"}) is not first  # unhealthy
    first.inflight = 5  # too busy beyond max_imbalance: load balancing
    assert router.choose(s, {"prompt": system + "Question one"}) is not first
    # token-id prompts and chat messages hash too; the longest match wins
    ids = list(range(40))
    a = router.choose(s, {"prompt": ids})
    assert router.choose(s, {"prompt": ids[:20] + [7] * 10}) is a
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": "hello there"}]
    c = router.choose(s, {"messages": msgs})
    assert router.choose(s, {"messages": msgs + [{"role": "assistant", "content": "hi"}]}) is c
    assert router.block_hashes({"prompt": "abc"}) == []  # shorter than a block: no affinity


def test_routers_choose_through_the_orchestrator(orchestrator, ctx_a, ctx_b, gen):
    o = orchestrator(config([ctx_a, ctx_b], [gen], ctx_router="load_balancing"))
    ctx_a.delay = 0.8
    slow = threading.Thread(target=o.post, args=("/v1/completions", {"prompt": "slow"}))
    slow.start()  # the first choice of an idle group: ctx_a
    deadline = time.monotonic() + 5
    while not ctx_a.received and time.monotonic() < deadline:
        time.sleep(0.01)
    for _ in range(3):  # ctx_a is busy: ctx_b takes them all
        assert o.post("/v1/completions", {"prompt": "quick"}).status_code == 200
    slow.join()
    assert len(ctx_a.received) == 1 and len(ctx_b.received) == 3
    o.stop()

    ctx_a.delay = 0
    o = orchestrator(config([ctx_a, ctx_b], [gen], ctx_router={"type": "kv_cache_aware", "block_size": 8}))
    before = {s.name: len(s.received) for s in (ctx_a, ctx_b)}
    for i in range(3):
        for prefix in ("The quick brown fox jumps over ", "Lorem ipsum dolor sit amet, consectetur "):
            assert o.post("/v1/completions", {"prompt": prefix + str(i)}).status_code == 200
    served = {s.name: [r["body"]["prompt"][:5] for r in s.received[before[s.name]:]] for s in (ctx_a, ctx_b)}
    assert sorted(map(set, served.values()), key=sorted) == [{"Lorem"}, {"The q"}], served


# ---- health, retries, errors ---------------------------------------------------------------------------
def wait_for(predicate, timeout=5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_unhealthy_servers_are_skipped_and_readmitted(orchestrator, ctx_a, ctx_b, gen):
    o = orchestrator(config([ctx_a, ctx_b], [gen]))
    ctx_a.healthy = False
    wait_for(lambda: not o.orch.context[0].healthy)
    health = httpx.get(o.url + "/health").json()
    assert health["status"] == "ok" and health["context_servers"][0]["healthy"] is False
    assert "503" in health["context_servers"][0]["error"]
    for _ in range(4):
        assert o.post("/v1/completions", {"prompt": "x"}).status_code == 200
    assert ctx_a.received == [] and len(ctx_b.received) == 4
    assert o.metrics()[f'meshserve_disagg_server_healthy{{role="context",server="{ctx_a.address}"}}'] == 0
    ctx_a.healthy = True
    wait_for(lambda: o.orch.context[0].healthy)
    for _ in range(4):
        assert o.post("/v1/completions", {"prompt": "x"}).status_code == 200
    assert len(ctx_a.received) == 2 and len(ctx_b.received) == 6


def test_a_dead_context_server_is_retried_on_another(orchestrator, ctx_a, ctx_b, gen):
    o = orchestrator(config([ctx_a, ctx_b], [gen], health_check_interval=60))
    ctx_a.stop()  # dies after the first health check: the orchestrator still thinks it is healthy
    r = o.post("/v1/completions", {"prompt": "x"})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == FULL_TEXT
    assert len(ctx_b.received) == 1 and not o.orch.context[0].healthy  # marked at once
    m = o.metrics()
    assert m['meshserve_disagg_retries_total{stage="context"}'] == 1
    assert m['meshserve_disagg_failures_total{stage="context"}'] == 1
    ctx_b.fail_status = 500  # a 5xx is retried too; with nothing left it is answered as it is
    o.orch.context[0].healthy = True
    r = o.post("/v1/completions", {"prompt": "x"})
    assert r.status_code == 500 and r.json()["error"]["message"] == "ctx_b fails on purpose"


def test_max_retries_bounds_the_context_attempts(orchestrator, ctx_a, ctx_b, gen):
    o = orchestrator(config([ctx_a, ctx_b], [gen], max_retries=0))
    ctx_a.fail_status = 502
    r = o.post("/v1/completions", {"prompt": "x"})
    assert r.status_code == 502 and ctx_b.received == []


def test_all_servers_down_is_a_503_with_one_line_reason(orchestrator, ctx_a, ctx_b, gen):
    o = orchestrator(config([ctx_a, ctx_b], [gen]))
    ctx_a.stop()
    ctx_b.healthy = False
    wait_for(lambda: not any(s.healthy for s in o.orch.context))
    r = o.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 503
    message = r.json()["error"]["message"]
    assert "\n" not in message and message.startswith("no context server is available")
    assert ctx_a.address in message and ctx_b.address in message and "cannot connect" in message
    health = httpx.get(o.url + "/health")
    assert health.status_code == 503 and health.json()["error"] == "no healthy server among context_servers"
    ctx_b.healthy = True  # a request that finds none probes the group once: no wait for the next poll
    o.orch.config.health_check_interval = 60
    assert o.post("/v1/completions", {"prompt": "x"}).status_code == 200
    gen.stop()
    r = o.post("/v1/completions", {"prompt": "x"})
    assert r.status_code == 503 and r.json()["error"]["message"].startswith("no generation server is available")
    assert o.metrics()['meshserve_disagg_request_errors_total{status="503"}'] == 2


def test_no_healthy_generation_server_is_a_503_before_any_context_work(orchestrator, ctx_a, gen):
    """A context server would prefill the prompt and pin its KV (until kv_transfer_timeout_ms) for a
    generation server nobody can reach: the 503 comes first, and a server back is taken at once."""
    o = orchestrator(config([ctx_a], [gen], health_check_interval=60))
    gen.healthy = False
    o.orch.generation[0].healthy = False
    r = o.post("/v1/completions", {"prompt": "x"})
    message = r.json()["error"]["message"]
    assert r.status_code == 503 and message.startswith("no generation server is available") and "\n" not in message
    assert gen.address in message
    assert ctx_a.received == [] and gen.received == []
    gen.healthy = True  # the group is probed once when it has no healthy server: no wait for the next poll
    assert o.post("/v1/completions", {"prompt": "x"}).status_code == 200
    assert len(ctx_a.received) == len(gen.received) == 1


# ---- metrics -------------------------------------------------------------------------------------------
def test_metrics_count_requests_and_time_each_hop(orchestrator, ctx_a, gen):
    o = orchestrator(config([ctx_a], [gen]))
    o.post("/v1/completions", {"prompt": "x"})
    with httpx.stream("POST", o.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                                    "stream": True}) as r:
        r.read()
    m = o.metrics()
    assert m['meshserve_disagg_requests_total{route="/v1/completions"}'] == 1
    assert m['meshserve_disagg_requests_total{route="/v1/chat/completions"}'] == 1
    assert m["meshserve_disagg_context_seconds_count"] == 2
    assert m["meshserve_disagg_generation_first_byte_seconds_count"] == 2
    assert m["meshserve_disagg_generation_tpot_seconds_count"] == 1  # the stream only
    assert m["meshserve_disagg_time_to_first_token_seconds_count"] == 1
    assert m["meshserve_disagg_request_seconds_count"] == 2
    assert m['meshserve_disagg_server_inflight{role="generation",server="%s"}' % gen.address] == 0
    assert m.get('meshserve_disagg_retries_total{stage="context"}', 0) == 0


# ---- the config file and the command -------------------------------------------------------------------
SEED = ("hostname: localhost\nport: {port}\nbackend: pytorch\ncontext_servers:\n  num_instances: {n}\n  urls:\n"
        "{urls}generation_servers:\n  num_instances: 1\n  urls:\n    - \"{gen}\"\n")


def seed_config(port, ctx_urls, gen_url) -> str:
    return SEED.format(port=port, n=len(ctx_urls), urls="".join(f"    - \"{u}\"\n" for u in ctx_urls), gen=gen_url)


@pytest.mark.parametrize("extra,expected", [
    ("max_retrys: 2\n", "unknown key 'max_retrys' (did you mean 'max_retries'?); accepted: hostname, port, backend, context_servers, "
                        "generation_servers, max_retries, health_check_interval, health_check_timeout, "
                        "max_failovers, stall_timeout"),
    ("stall_timeout: -1\n", "stall_timeout=-1: expected a number of seconds > 0"),
    ("backend: tensorrt\n", "backend='tensorrt'; accepted: pytorch"),
    ("port: 70000\n", "port=70000: expected an integer [0, 65535]"),
    ("max_retries: -1\n", "max_retries=-1: expected an integer >= 0"),
    ("health_check_interval: 0\n", "health_check_interval=0: expected a number of seconds > 0"),
])
def test_config_errors_are_one_line(tmp_path, capsys, extra, expected):
    text = seed_config(8000, ["localhost:8001", "localhost:8002"], "localhost:8003")
    text = "\n".join(line for line in text.splitlines() if not line.startswith(extra.split(":")[0] + ":")) + "\n"
    path = tmp_path / "disagg-config.yml"
    path.write_text(text + extra)
    assert cli.main(["disaggregated", "-c", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err == f"meshserve disaggregated: error: {path}: {expected}"


@pytest.mark.parametrize("groups,expected", [
    ({"urls": ["a:1"], "routr": {}}, "context_servers: unknown key 'routr' (did you mean 'router'?); accepted: num_instances, urls, router"),
    ({"urls": ["a:1"], "router": {"type": "random"}},
     "context_servers.router.type='random'; accepted: round_robin, load_balancing, kv_cache_aware"),
    ({"urls": ["a:1"], "router": {"type": "round_robin", "block_size": 4}},
     "context_servers.router (round_robin): unknown key 'block_size'; accepted: type"),
    ({"urls": ["a:1"], "router": {"type": "kv_cache_aware", "block_size": 0}},
     "context_servers.router.block_size=0: expected an integer >= 1"),
    ({"num_instances": 2, "urls": ["a:1"]}, "context_servers.num_instances=2 but context_servers.urls lists 1 "
                                            "server(s)"),
    ({"urls": ["localhost"]}, "context_servers.urls[0]='localhost': expected \"host:port\" (or "
                              "\"http://host:port\")"),
    ({"urls": []}, "context_servers.urls=[]: expected a list of \"host:port\" (one per server)"),
])
def test_server_group_errors_name_the_field(groups, expected):
    with pytest.raises(ConfigError) as e:
        parse_config({"context_servers": groups, "generation_servers": {"urls": ["b:2"]}}, "f.yml")
    assert str(e.value) == f"f.yml: {expected}"


@pytest.mark.parametrize("groups,expected", [
    # a scheme httpx cannot speak, or a host with a space, would be accepted and then never answer
    ({"urls": ["ftp://a:1"]}, "context_servers.urls[0]='ftp://a:1': expected \"host:port\" (or \"http://host:port\")"),
    ({"urls": ["local host:1"]}, "context_servers.urls[0]='local host:1': expected \"host:port\" (or "
                                 "\"http://host:port\")"),
    # one server spelt two ways is still listed twice
    ({"urls": ["a:1", "http://a:1"]}, "context_servers.urls lists a server twice: ['a:1', 'http://a:1']"),
    # a router that is not a mapping is refused even when falsy (it was taken as the default)
    ({"urls": ["a:1"], "router": []}, "context_servers.router must be a mapping such as {type: round_robin}, got []"),
    ({"urls": ["a:1"], "router": 0}, "context_servers.router must be a mapping such as {type: round_robin}, got 0"),
])
def test_server_group_values_that_would_be_accepted_and_never_work_are_refused(groups, expected):
    with pytest.raises(ConfigError) as e:
        parse_config({"context_servers": groups, "generation_servers": {"urls": ["b:2"]}}, "f.yml")
    assert str(e.value) == f"f.yml: {expected}"
    ok = parse_config({"context_servers": {"urls": ["https://a:1"], "router": None},
                       "generation_servers": {"urls": ["b:2"]}})
    assert ok.context.urls == ["https://a:1"] and ok.context.router == "round_robin"


@pytest.mark.parametrize("value", ["-1", "nan"])
def test_a_shutdown_timeout_uvicorn_would_take_as_0_is_refused(tmp_path, capsys, value):
    path = tmp_path / "disagg-config.yml"
    path.write_text(seed_config(free_port(), ["localhost:8001"], "localhost:8003"))
    assert cli.main(["disaggregated", "-c", str(path), "--shutdown_timeout", value]) == 2
    assert capsys.readouterr().err == (f"meshserve disaggregated: error: --shutdown_timeout {value}: expected a number "
                                       f"of seconds >= 0 (0: stop without waiting for in-flight requests)\n")


def test_a_key_given_twice_is_refused(tmp_path, capsys):
    """PyYAML keeps the last of two equal keys: the orchestrator listened on the second port, silently."""
    path = tmp_path / "disagg-config.yml"
    path.write_text(seed_config(8000, ["localhost:8001"], "localhost:8003") + "port: 8001\n")
    assert cli.main(["disaggregated", "-c", str(path)]) == 2
    assert capsys.readouterr().err == (f"meshserve disaggregated: error: {path}: not valid YAML: duplicate key 'port' "
                                       f"(each key may be given once) at line 12, column 1\n")


def test_missing_config_and_missing_groups(tmp_path, capsys):
    assert cli.main(["disaggregated", "-c", str(tmp_path / "missing.yml")]) == 2
    assert capsys.readouterr().err.strip() == f"meshserve disaggregated: error: -c {tmp_path / 'missing.yml'}: " \
                                              f"no such file"
    with pytest.raises(ConfigError, match="generation_servers is required"):
        parse_config({"context_servers": {"urls": ["a:1"]}}, "f.yml")
    cfg = parse_config({"context_servers": {"urls": ["a:1", "http://b:2/"]}, "generation_servers": {"urls": ["c:3"]}})
    assert cfg.context.urls == ["a:1", "http://b:2"] and cfg.max_retries == 1 and cfg.port == 8000


def start_command(tmp_path, ctx_urls: list, gen_url: str, *flags: str) -> tuple[subprocess.Popen, str]:
    """`meshserve disaggregated -c <the seed's YAML> -t 30 *flags` in a subprocess, once /health answers."""
    port = free_port()
    path = tmp_path / "disagg-config.yml"
    path.write_text(seed_config(port, ctx_urls, gen_url).replace("localhost", "127.0.0.1", 1))
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               MESHSERVE_SECRET="orchestrator-test-secret")
    proc = subprocess.Popen([sys.executable, "-m", "meshserve", "disaggregated", "-c", str(path), "-t", "30", *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        if proc.poll() is not None:
            raise AssertionError(proc.stdout.read().decode())
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the orchestrator did not answer /health in 20 s")
        time.sleep(0.1)


def stop_command(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0
    return proc.stdout.read().decode()


def test_the_command_serves_the_seed_config(tmp_path, ctx_a, ctx_b, gen):
    proc, url = start_command(tmp_path, [ctx_a.address, ctx_b.address], gen.address)
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="EMPTY", max_retries=0)
        out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=8)
        assert out.choices[0].message.content == FULL_TEXT
    finally:
        log = stop_command(proc)
    assert "orchestrating 2 context server(s) (round_robin router) and 1 generation server(s)" in log


def _response(sock: socket.socket) -> bytes:
    """What the server sends until it closes the connection or 10 s pass."""
    data = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            return data
        data += chunk


def test_the_front_door_has_the_limits_of_serve(tmp_path, ctx_a, gen):
    """The orchestrator is what clients reach: a connection that never finishes its headers is a 408 and
    closed (--request_header_timeout), headers over --max_request_header_kb a 431, a body over
    --max_request_body_mb a 413, each before any server sees a byte; the next request is served."""
    proc, url = start_command(tmp_path, [ctx_a.address], gen.address, "--request_header_timeout", "1.5",
                              "--max_request_header_kb", "2", "--max_request_body_mb", "0.001")
    try:
        port = int(url.rsplit(":", 1)[1])
        stalled = socket.create_connection(("127.0.0.1", port), timeout=10)
        stalled.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # the blank line never comes
        t0 = time.monotonic()
        answer = _response(stalled)  # ends when the orchestrator closes it
        assert answer.startswith(b"HTTP/1.1 408") and 1.0 < time.monotonic() - t0 < 8, answer
        stalled.close()

        body = {"model": MODEL, "prompt": "x", "max_tokens": 4}
        r = httpx.post(url + "/v1/completions", json=body, headers={"x-padding": "p" * 3000}, timeout=10)
        assert r.status_code == 431 and "--max_request_header_kb" in r.json()["error"]["message"]
        r = httpx.post(url + "/v1/completions", json={**body, "prompt": "x" * 2000}, timeout=10)
        assert r.status_code == 413 and "--max_request_body_mb" in r.json()["error"]["message"]
        assert ctx_a.bodies == [] and gen.bodies == []

        r = httpx.post(url + "/v1/completions", json=body, timeout=10)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == FULL_TEXT
        errors = {k: v for k, v in OrchestratorThread.metrics_of(url).items() if "request_errors_total" in k}
        assert errors == {'meshserve_disagg_request_errors_total{status="431"}': 1.0,
                          'meshserve_disagg_request_errors_total{status="413"}': 1.0}, errors
    finally:
        stop_command(proc)


@pytest.mark.parametrize("flag,value,expected", [
    ("--request_header_timeout", "0", "expected a number of seconds > 0"),
    ("--request_body_timeout", "inf", "expected a number of seconds > 0"),
    ("--max_request_body_mb", "-1", "expected a number of MiB > 0"),
    ("--max_request_header_kb", "nan", "expected a number of KiB > 0")])
def test_front_door_limits_that_cannot_be_honoured_are_refused(tmp_path, capsys, flag, value, expected):
    path = tmp_path / "disagg-config.yml"
    path.write_text(seed_config(free_port(), ["localhost:8001"], "localhost:8003"))
    assert cli.main(["disaggregated", "-c", str(path), flag, value]) == 2
    assert capsys.readouterr().err == f"meshserve disaggregated: error: {flag} {value}: {expected}\n"
