"""Dynamic membership of the disaggregated orchestrator and its key: servers join (`POST /register`)
and leave (`POST /unregister`) while it runs, guarded by a bearer token derived from
MESHSERVE_SECRET; the command refuses to start without MESHSERVE_SECRET. Against fake servers."""
from __future__ import annotations

import threading

import httpx
import pytest

from fake_servers import FULL_TEXT, MODEL, FakeContextServer, FakeGenerationServer
from meshserve.commands import main as cli
from meshserve.disagg.orchestrator import membership_token
from meshserve.disagg.params import key_from_secret
from meshserve.disagg.router import KvCacheAwareRouter, RoundRobinRouter, Server
from test_orchestrator import OrchestratorThread, config, seed_config, wait_for

pytestmark = pytest.mark.timeout(60)

SECRET = "membership-test-secret"
KEY = key_from_secret(SECRET)


class KeyedOrchestrator(OrchestratorThread):
    def __init__(self, cfg: dict, key=KEY, **kw):
        super().__init__(cfg, key=key, **kw)

    @property
    def auth(self) -> dict:
        return {"Authorization": f"Bearer {membership_token(KEY)}"}

    def member(self, route: str, body, headers=None) -> httpx.Response:
        return httpx.post(self.url + route, json=body, headers=self.auth if headers is None else headers, timeout=10)


@pytest.fixture(scope="module")
def fakes():
    servers = {"ctx": FakeContextServer("ctx").start(), "ctx_b": FakeContextServer("ctx_b").start(),
               "gen_a": FakeGenerationServer("gen_a").start(), "gen_b": FakeGenerationServer("gen_b").start()}
    yield servers
    for s in servers.values():
        s.stop()


@pytest.fixture(autouse=True)
def _reset(fakes):
    for s in fakes.values():
        s.received.clear()
        s.sent.clear()
        s.stream_closed.clear()
        s.healthy, s.fail_status, s.delay, s.chunk_delay = True, None, 0.0, 0.005
    yield


@pytest.fixture
def orchestrator():
    started = []

    def make(cfg: dict, **kw) -> KeyedOrchestrator:
        started.append(KeyedOrchestrator(cfg, **kw))
        return started[-1]

    yield make
    for o in started:
        o.stop()


def listed(o, group: str) -> list[str]:
    return [s["url"] for s in httpx.get(o.url + "/health").json()[group]]


def test_the_membership_routes_need_the_token(orchestrator, fakes):
    o = orchestrator(config([fakes["ctx"]], [fakes["gen_a"]]))
    body = {"url": fakes["gen_b"].address, "role": "generation"}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {SECRET}"},
                    {"Authorization": f"Bearer {membership_token(b'another key')}"}):
        for route in ("/register", "/unregister"):
            r = o.member(route, body, headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (route, headers)
            assert "membership token" in r.json()["error"]["message"]
    assert listed(o, "generation_servers") == [fakes["gen_a"].address]
    o.orch.key = None  # an orchestrator without a key takes no registrations
    r = o.member("/register", body)
    assert r.status_code == 503 and "MESHSERVE_SECRET" in r.json()["error"]["message"]


def test_bad_bodies_are_400s_naming_the_field(orchestrator, fakes):
    o = orchestrator(config([fakes["ctx"]], [fakes["gen_a"]]))
    for body, param in (({"url": "127.0.0.1:1", "role": "decoder"}, "role"), ({"url": "nohost", "role": "context"},
                        "url"), ({"url": "127.0.0.1:1"}, "role"), ({"url": "a:1", "role": "context", "x": 1}, "x")):
        r = o.member("/register", body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)
    r = httpx.post(o.url + "/register", content=b"[1", headers=o.auth)
    assert r.status_code == 400
    r = o.member("/unregister", {"url": fakes["gen_b"].address, "role": "generation"})
    assert r.status_code == 404 and "is registered" in r.json()["error"]["message"]


def test_a_generation_server_joins_and_takes_requests(orchestrator, fakes):
    gen_a, gen_b = fakes["gen_a"], fakes["gen_b"]
    o = orchestrator(config([fakes["ctx"]], [gen_a]))
    r = o.member("/register", {"url": gen_b.address, "role": "generation"})
    assert r.status_code == 200 and r.json() == {"status": "registered", "role": "generation",
                                                 "url": gen_b.address, "healthy": True}
    r = o.member("/register", {"url": "http://" + gen_b.address, "role": "generation"})
    assert r.json()["status"] == "already registered"
    assert listed(o, "generation_servers") == [gen_a.address, gen_b.address]
    assert o.orch.config.generation.urls == [gen_a.address]  # the running orchestrator's groups only
    for _ in range(4):
        r = o.post("/v1/completions", {"model": MODEL, "prompt": "x"})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == FULL_TEXT
    assert len(gen_a.received) == len(gen_b.received) == 2  # round robin over both
    m = o.metrics()
    assert m[f'meshserve_disagg_server_healthy{{role="generation",server="{gen_b.address}"}}'] == 1

    ctx_b = fakes["ctx_b"]  # a context server too; one that does not answer yet joins unhealthy
    ctx_b.healthy = False
    r = o.member("/register", {"url": ctx_b.address, "role": "context"})
    assert r.status_code == 200 and r.json()["healthy"] is False
    assert o.post("/v1/completions", {"prompt": "x"}).status_code == 200 and not ctx_b.received
    ctx_b.healthy = True
    wait_for(lambda: o.orch.context[1].healthy)
    for _ in range(2):
        assert o.post("/v1/completions", {"prompt": "x"}).status_code == 200
    assert len(ctx_b.received) == 1


def test_a_server_that_leaves_gets_no_new_requests_and_finishes_its_own(orchestrator, fakes):
    gen_a, gen_b = fakes["gen_a"], fakes["gen_b"]
    o = orchestrator(config([fakes["ctx"]], [gen_a, gen_b]))
    gen_a.chunk_delay = 0.15  # a stream in flight on gen_a while it leaves
    got = []
    t = threading.Thread(target=lambda: got.append(httpx.post(o.url + "/v1/completions", timeout=20, json={
        "model": MODEL, "prompt": "x", "stream": True}).text))
    t.start()
    wait_for(lambda: gen_a.received)
    r = o.member("/unregister", {"url": gen_a.address, "role": "generation"})
    assert r.status_code == 200 and r.json() == {"status": "unregistered", "role": "generation",
                                                 "url": gen_a.address, "inflight": 1}
    assert listed(o, "generation_servers") == [gen_b.address]
    for _ in range(3):
        assert o.post("/v1/completions", {"prompt": "x"}).status_code == 200
    t.join(20)
    assert got and got[0].endswith("data: [DONE]\n\n") and gen_a.stream_closed == [False]  # it finished there
    assert len(gen_a.received) == 1 and len(gen_b.received) == 3
    assert f'server="{gen_a.address}"' not in httpx.get(o.url + "/metrics").text

    r = o.member("/unregister", {"url": gen_b.address, "role": "generation"})  # the last one
    assert r.status_code == 200
    r = o.post("/v1/completions", {"prompt": "x"})
    assert r.status_code == 503 and r.json()["error"]["message"] == "no generation server is registered"
    health = httpx.get(o.url + "/health")
    assert health.status_code == 503 and health.json()["generation_servers"] == []
    assert o.member("/register", {"url": gen_a.address, "role": "generation"}).status_code == 200  # back again
    assert o.post("/v1/completions", {"prompt": "x"}).status_code == 200


def test_routers_forget_a_server_that_leaves():
    s = [Server(f"127.0.0.1:{9000 + i}", "generation") for i in range(3)]
    router = RoundRobinRouter(list(s))
    assert router.choose(s, {}) is s[0] and router.choose(s, {}) is s[1]
    router.remove(s[1])
    rest = [s[0], s[2]]
    assert [router.choose(rest, {}) for _ in range(3)] == [s[2], s[0], s[2]]
    new = Server("127.0.0.1:9100", "generation")
    router.add(new)
    assert [router.choose(rest + [new], {}) for _ in range(3)] == [s[0], s[2], new]
    kv = KvCacheAwareRouter(list(s), block_size=4)
    first = kv.choose(s, {"prompt": "a shared prefix of text"})
    kv.remove(first)
    assert all(v is not first for v in kv.table.values()) and not kv.table
    assert kv.choose([x for x in s if x is not first], {"prompt": "a shared prefix of text"}) is not first


def test_the_command_needs_meshserve_secret(tmp_path, capsys, monkeypatch):
    path = tmp_path / "disagg-config.yml"
    path.write_text(seed_config(8000, ["localhost:8001"], "localhost:8003"))
    monkeypatch.delenv("MESHSERVE_SECRET", raising=False)
    assert cli.main(["disaggregated", "-c", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("meshserve disaggregated: error: MESHSERVE_SECRET is not set: export "
                                              "the same secret on every context and generation server and on the "
                                              "orchestrator")
    with pytest.raises(ValueError, match="MESHSERVE_SECRET is not set"):
        membership_token()
    monkeypatch.setenv("MESHSERVE_SECRET", SECRET)
    assert membership_token() == membership_token(KEY) != membership_token(key_from_secret("other"))
    assert SECRET not in membership_token() and len(membership_token()) == 64
