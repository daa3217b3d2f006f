"""Dynamic membership of the disaggregated orchestrator and its key: servers join (`POST /register`)
and leave (`POST /unregister`) while it runs, guarded by a bearer token derived from the shared key
(MESHSERVE_SECRET, else the key file); a server that proves another key on /health is not used;
the command takes the key file when MESHSERVE_SECRET is unset and refuses an unsafe one. Against
fake servers."""
from __future__ import annotations

import threading

import httpx
import pytest

from fake_servers import FULL_TEXT, MODEL, FakeContextServer, FakeGenerationServer
from meshserve.commands import main as cli
from meshserve.disagg import params
from meshserve.disagg.orchestrator import membership_token
from meshserve.disagg.params import CHALLENGE_HEADER, PROOF_HEADER, key_from_secret, key_proof
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


def _prove_with(fake, holder: dict):
    """The fake's /health answers the orchestrator's key challenge with holder["key"] (None: no proof)."""
    @fake.app.middleware("http")
    async def proof(request, call_next):
        response = await call_next(request)
        challenge = request.headers.get(CHALLENGE_HEADER)
        if request.url.path == "/health" and challenge and holder["key"] is not None:
            response.headers[PROOF_HEADER] = key_proof(holder["key"], challenge)
        return response


def test_a_server_holding_another_key_is_not_used(orchestrator, fakes):
    keys = {"good": {"key": KEY}, "bad": {"key": b"another key"}, "late": {"key": b"yet another key"}}
    made = {name: FakeGenerationServer(f"gen_{name}") for name in keys}
    for name, fake in made.items():
        _prove_with(fake, keys[name])
        fake.start()
    good, bad, late = made["good"], made["bad"], made["late"]
    try:
        o = orchestrator(config([fakes["ctx"]], [good, bad, fakes["gen_a"]]))  # gen_a: no proof (no check)
        wait_for(lambda: not o.orch.generation[1].healthy)
        state = httpx.get(o.url + "/health").json()["generation_servers"]
        assert [s["healthy"] for s in state] == [True, False, True]
        error = state[1]["error"]
        assert error.startswith("it holds another key than this orchestrator's, so its disaggregated_params and KV "
                                "transfers would be refused: copy the orchestrator's key file") and "\n" not in error
        assert "MESHSERVE_SECRET" in error and KEY.hex() not in error
        for _ in range(4):
            r = o.post("/v1/completions", {"model": MODEL, "prompt": "x"})
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == FULL_TEXT
        assert not bad.received and len(good.received) == len(fakes["gen_a"].received) == 2
        # one that joins with another key is registered, and not used
        r = o.member("/register", {"url": late.address, "role": "generation"})
        assert r.status_code == 200 and r.json()["healthy"] is False
        assert o.orch.generation[3].last_error == error
        # restarted with the orchestrator's key (here: the fake now proves it), it is used again
        keys["bad"]["key"] = KEY
        wait_for(lambda: o.orch.generation[1].healthy)
        for _ in range(3):
            assert o.post("/v1/completions", {"model": MODEL, "prompt": "x"}).status_code == 200
        assert len(bad.received) == 1 and not late.received
    finally:
        for fake in made.values():
            fake.stop()


def test_the_command_takes_the_key_file_without_meshserve_secret(tmp_path, capsys, monkeypatch):
    path = tmp_path / "disagg-config.yml"
    path.write_text(seed_config(8000, ["localhost:8001"], "localhost:8003"))
    for name in ("MESHSERVE_SECRET", "MESHSERVE_SECRET_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    default = tmp_path / "cache" / "meshserve" / "disagg.key"
    with pytest.raises(ValueError, match=f"MESHSERVE_SECRET is not set and there is no key file {default}"):
        membership_token()
    # an unsafe key file: the command stops, one line naming the fix
    unsafe = tmp_path / "unsafe.key"
    unsafe.write_text("ab" * 32)
    unsafe.chmod(0o644)
    assert cli.main(["disaggregated", "-c", str(path), "--secret_file", str(unsafe)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err == (f"meshserve disaggregated: error: the key file {unsafe} is readable or "
                                       f"writable by others (mode 0644): chmod 600 {unsafe}")
    monkeypatch.setenv("MESHSERVE_SECRET_FILE", str(unsafe))
    assert cli.main(["disaggregated", "-c", str(path)]) == 2
    assert "chmod 600" in capsys.readouterr().err
    monkeypatch.delenv("MESHSERVE_SECRET_FILE")
    key, _ = params.create_key_file(str(default))  # as the command (or a server) makes it
    assert membership_token() == membership_token(key)
    monkeypatch.setenv("MESHSERVE_SECRET", SECRET)
    assert membership_token() == membership_token(KEY) != membership_token(key_from_secret("other"))
    assert SECRET not in membership_token() and len(membership_token()) == 64
