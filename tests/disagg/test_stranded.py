"""Nothing stranded (issue 23 item 3): every way a disaggregated request can end frees its KV blocks
on both sides. Real servers: a context server and a generation server (`meshserve serve` over a tiny
random Llama, `cache_transceiver_config: {backend: DEFAULT}`, one MESHSERVE_SECRET) behind two
`meshserve disaggregated` orchestrators: `main` (-t 60) and `impatient` (-t 4, stall_timeout 2 s),
the second for the cells where the orchestrator itself gives up on a hop. A matrix of stage x event;
after each cell every surviving server's `meshserve_kv_cache_used_blocks` is back to 0 within a
bound (the transfer timeouts + slack), each survivor answers an ordinary request with its reference
greedy text, and (killed servers restarted on their ports) a request through the orchestrator still
answers the reference text, leaving 0 used blocks again.

Stages (each reached by polling /metrics and the orchestrator's /health, never by sleeping):
- queued: the context server's batch is full (`--max_batch_size 1`) with request A prefilling, and
  B waits behind it (num_requests_waiting 1);
- prefilling: A itself, a 7000-token prompt prefilled 4 tokens a step (`--max_num_tokens 4`: 1750
  steps, about four seconds on an idle machine). One scenario holds both stages at once, so each event
  hits a queued and a prefilling request;
- transferring: the context server pins the KV and the generation server has the request. Held by
  SIGSTOPping the generation server's process group before the request (the orchestrator's hop
  waits in its accept queue), then, once the context server holds the pin and the orchestrator has
  the hop open, SIGSTOPping the context server and SIGCONTing the generation server: it allocates
  blocks and its pull waits on the stopped source ("pulling"; two requests, one streamed and one
  not: a streamed request is not aborted until its KV is there, a non-streamed one at once). One
  cell leaves the generation server stopped instead ("pending": the pull has not started);
- decoding: a streamed request (600 tokens, ignore_eos) after 20 chunks reached the client.

Events:
- disconnect: the client goes away (its socket closed, or the stream closed after 20 chunks): the
  orchestrator cancels the hop in progress, the server aborts the request;
- abort: the orchestrator gives up on a hop while the client waits (the `impatient` one): -t on the
  context hop (504; the context server is SIGSTOPped so the hop outlasts -t, then continued, and
  aborts both requests), -t on a generation hop that has not answered (the pull is stalled; the
  request starts again on the context server in a pinch), stall_timeout mid-stream (the generation
  server SIGSTOPped; the stream resumes on the context server, the stopped one is continued and
  aborts);
- kill_ctx / kill_gen: SIGKILL of the server's whole process group (front and engine);
- timeout: a transfer outlives kv_transfer_timeout_ms (generation server 5 s: its pull gives up;
  context server 2 s: its pin is freed without a release).

Matrix (cell -> what must free what):
- queued+prefilling x disconnect: the context server aborts both (nothing reached the generation one);
- queued+prefilling x abort: both hops end in a 504; the context server aborts both when continued;
- queued+prefilling x kill_ctx: the generation server holds nothing; the clients get 5xx;
- queued+prefilling x kill_gen: A and B still finish on the context server and are pinned; the
  generation hop fails (503); the pins are freed by kv_transfer_timeout_ms;
- transferring x disconnect: the non-streamed request is aborted while it pulls; the streamed one
  once its KV is there (continued context server); both sides 0 (the context side by the release);
- transferring x abort: -t on the generation hops; the requests go on from the start on the context
  server (200s); the generation server's pulls end (served, or refused: the pins expired meanwhile)
  and free its blocks of the aborted requests;
- transferring x kill_ctx: the pulls fail at once (503s) and the generation server frees its blocks;
- transferring x kill_gen: the context server's pins are freed by its timeout; the requests go on
  from the start on the context server (200s);
- transferring x timeout (pulling): the context server stays stopped past the generation server's
  timeout: the pulls fail (503s) and free; continued, the context server frees its expired pins;
- transferring x timeout (pending): the generation server stays stopped past the context server's
  timeout: the pins are freed while it is stopped; continued, it pulls, is refused ("not held"),
  answers 503 and frees;
- decoding x disconnect: the generation server aborts the request;
- decoding x abort: stall_timeout; the stream completes on the context server (600 tokens); the
  stopped generation server, continued, aborts its copy;
- decoding x kill_gen: the stream completes on the context server (resumed); its blocks are freed.

Omitted cells: queued/prefilling x timeout (no transfer exists yet: the pin's timeout starts when
the prefill ends, and the kill_gen row already has pins freed by it); decoding x kill_ctx (the
context server holds nothing once the pull finished: its pin was released by the generation
server's acknowledgement, and the generation server never talks to it again); decoding x timeout
(no transfer is in flight while decoding); pending x disconnect / abort / kills (the same server
paths as the pulling cells, plus the pin timeout that the pending timeout cell covers).
"""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Callable, Optional

import httpx
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "serve"))
from serve_util import REPO, free_port, parse_metrics  # noqa: E402

from helpers import build_checkpoint  # noqa: E402

pytestmark = pytest.mark.timeout(420)

SECRET = "stranded-" + "3c" * 12
CTX_TIMEOUT_MS = 2000  # the context server's kv_transfer_timeout_ms: a pin without a release is freed after it
GEN_TIMEOUT_MS = 5000  # the generation server's: a pull gives up after it
IMPATIENT_T = 4.0  # the impatient orchestrator's -t
# and its stall_timeout: the decoding x abort cell's stream, resumed on the context server (4 prompt
# tokens a step), must send its first chunk within it (2 s was missed under two CPU hogs)
IMPATIENT_STALL = 5.0
PULL_PROMPT = 64  # tokens of the transferring cells' prompts
LONG_PROMPT = 7000  # tokens: prefilled 4 a step on the context server
MAX_SEQ_LEN = 8192
BLOCK = 64  # tokens per KV block on both servers
# a decoding cell's request: long enough to be mid-decode at the event (600 finished, ~0.5 s, before a
# client slowed by other work on the machine read its 20th chunk)
DECODE_TOKENS = 1500
LONG_DECODE = 1500  # a transferring disconnect's: it must not finish before the server sees the client gone
SANITY = {"prompt": "The quick brown fox jumps over", "max_tokens": 16, "temperature": 0, "ignore_eos": True}


def _yaml(path, timeout_ms: int) -> str:
    path.write_text(f"cache_transceiver_config:\n  backend: DEFAULT\n  kv_transfer_timeout_ms: {timeout_ms}\n"
                    f"  max_tokens_in_buffer: 256\nkv_cache_config:\n  max_tokens: 20000\n"
                    f"  tokens_per_block: {BLOCK}\n")
    return str(path)


class Server:
    """A `meshserve serve` process group that can be stopped, continued, killed and started again
    on the same port (the orchestrators' configs name it)."""

    def __init__(self, name: str, model: str, flags: tuple, log_dir: str):
        self.name, self.model, self.flags, self.log_dir = name, model, flags, log_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: Optional[subprocess.Popen] = None
        self.runs = 0
        self.stopped = False
        self.start()

    def start(self) -> None:
        self.runs += 1
        self.log_path = os.path.join(self.log_dir, f"{self.name}-{self.runs}.log")
        log = open(self.log_path, "w")
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen([sys.executable, "-m", "meshserve", "serve", self.model, "--host", "127.0.0.1",
                                      "--port", str(self.port), *self.flags], stdout=log, stderr=subprocess.STDOUT,
                                     cwd=REPO, env=env, start_new_session=True)
        log.close()
        self.stopped = False

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass
        self.stopped = sig == signal.SIGSTOP or (self.stopped and sig != signal.SIGCONT)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.proc.wait(10)
        self.stopped = False

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.alive, f"{self.name} exited:\n{self.log()[-3000:]}"
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"{self.name} not ready in {timeout_s} s:\n{self.log()[-3000:]}"
            time.sleep(0.2)

    def ensure_up(self) -> None:
        if self.stopped:
            self.signal(signal.SIGCONT)
        if not self.alive:
            self.start()
        self.wait_ready()

    def stop(self) -> None:
        if self.proc is None:
            return
        self.signal(signal.SIGCONT)
        if self.alive:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                pass
        self.signal(signal.SIGKILL)
        self.proc.wait(10)

    def metrics(self) -> dict:
        return parse_metrics(httpx.get(self.url + "/metrics", timeout=5).text)

    def used(self) -> float:
        return self.metrics()["meshserve_kv_cache_used_blocks"]

    def aborts(self) -> float:
        return self.metrics().get("meshserve_requests_total[abort]", 0.0)

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def complete(self, body: dict) -> str:
        r = httpx.post(self.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]


class Orchestrator:
    def __init__(self, name: str, ctx: Server, gen: Server, tmp, timeout_s: float, stall_s: float):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = tmp / f"{name}.yml"
        # health polls far apart: a SIGSTOPped server must not be marked unhealthy before a request
        # reaches it; a request that finds no healthy server probes the group anyway
        config.write_text(f"hostname: 127.0.0.1\nport: {self.port}\nbackend: pytorch\nhealth_check_interval: 600\n"
                          f"health_check_timeout: 2\nstall_timeout: {stall_s}\n"
                          f"context_servers:\n  urls: [\"127.0.0.1:{ctx.port}\"]\n"
                          f"generation_servers:\n  urls: [\"127.0.0.1:{gen.port}\"]\n")
        self.log_path = str(tmp / f"{name}.log")
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "meshserve", "disaggregated", "-c", str(config),
                                          "-t", str(timeout_s)], stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                         start_new_session=True)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 60
        while True:
            assert self.proc.poll() is None, open(self.log_path).read()
            try:
                httpx.get(self.url + "/health", timeout=2)
                return
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, open(self.log_path).read()
            time.sleep(0.2)

    def inflight(self, role: str) -> int:
        body = httpx.get(self.url + "/health", timeout=5).json()
        return sum(s["inflight"] for s in body[f"{role}_servers"])

    def metric(self, name: str) -> float:
        return parse_metrics(httpx.get(self.url + "/metrics", timeout=5).text).get(name, 0.0)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


class RawRequest:
    """A POST on a socket of its own (HTTP/1.1, Connection: close), so the test can drop the client
    at any moment, before or after the answer's headers."""

    def __init__(self, url: str, path: str, body: dict, request_id: str):
        host, port = url.removeprefix("http://").rsplit(":", 1)
        self.request_id = request_id.replace("_", "")  # as the servers' logs spell it
        self.sock = socket.create_connection((host, int(port)), timeout=60)
        data = json.dumps(body).encode()
        head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(data)}\r\nX-Request-Id: {self.request_id}\r\nConnection: close\r\n\r\n")
        self.sock.sendall(head.encode() + data)
        self.raw = b""
        self.eof = False

    def close(self) -> None:
        self.sock.close()

    def _read_until(self, done: Callable[[bytes], bool], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not done(self.raw) and not self.eof:
            left = deadline - time.monotonic()
            assert left > 0, f"request {self.request_id}: no complete answer in {timeout_s} s: {self.raw[:300]!r}"
            self.sock.settimeout(left)
            chunk = self.sock.recv(65536)
            if not chunk:
                self.eof = True
            self.raw += chunk

    def answer(self, timeout_s: float = 60.0) -> tuple[int, str]:
        """The status and the (de-chunked) body, read to the end."""
        self._read_until(lambda _: False, timeout_s)
        self.close()
        head, _, body = self.raw.partition(b"\r\n\r\n")
        assert head, f"request {self.request_id}: the connection closed without an answer"
        status = int(head.split(b" ", 2)[1])
        if b"transfer-encoding: chunked" in head.lower():
            out, i = b"", 0
            while True:
                j = body.index(b"\r\n", i)
                size = int(body[i:j].split(b";")[0], 16)
                if size == 0:
                    break
                out += body[j + 2:j + 2 + size]
                i = j + 2 + size + 2
            body = out
        return status, body.decode(errors="replace")


def sse_tokens(body: str) -> tuple[int, Optional[dict]]:
    """A completed SSE answer: (usage's completion_tokens, the first error event or None)."""
    tokens, error = -1, None
    for line in body.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            event = json.loads(line[6:])
            if "error" in event and error is None:
                error = event["error"]
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return tokens, error


def wait_for(pred: Callable[[], object], timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while True:
        got = pred()
        if got:
            return got
        assert time.monotonic() < deadline, f"not reached in {timeout_s} s: {what}"
        time.sleep(0.02)


def wait_zero(server: Server, bound_s: float, what: str = "") -> None:
    deadline = time.monotonic() + bound_s
    while True:
        m = server.metrics()
        used = m["meshserve_kv_cache_used_blocks"]
        if used == 0 and m["meshserve_num_requests_running"] == 0 and m["meshserve_num_requests_waiting"] == 0:
            return
        assert time.monotonic() < deadline, (f"{server.name} still holds {used:g} KV blocks {bound_s} s after "
                                             f"{what or 'the event'} (running {m['meshserve_num_requests_running']:g}, "
                                             f"waiting {m['meshserve_num_requests_waiting']:g}):\n"
                                             f"{server.log()[-4000:]}")
        time.sleep(0.05)


# ---- the cluster --------------------------------------------------------------------------------------
class Cluster:
    def __init__(self, tmp):
        model = str(tmp / "tiny")
        build_checkpoint(model, "llama", max_position_embeddings=MAX_SEQ_LEN)
        self.ctx = Server("ctx", model, ("--max_batch_size", "1", "--max_num_tokens", "4", "--max_seq_len",
                                         str(MAX_SEQ_LEN), "--config", _yaml(tmp / "ctx.yml", CTX_TIMEOUT_MS)),
                          str(tmp))
        self.gen = Server("gen", model, ("--max_batch_size", "8", "--max_seq_len", str(MAX_SEQ_LEN), "--config",
                                         _yaml(tmp / "gen.yml", GEN_TIMEOUT_MS)), str(tmp))
        self.orchs: list[Orchestrator] = []
        try:
            self.main = Orchestrator("main", self.ctx, self.gen, tmp, 60, 30)
            self.orchs.append(self.main)
            self.impatient = Orchestrator("impatient", self.ctx, self.gen, tmp, IMPATIENT_T, IMPATIENT_STALL)
            self.orchs.append(self.impatient)
            for s in (self.ctx, self.gen):
                s.wait_ready()
            for o in self.orchs:
                o.wait_ready()
            # each server's own greedy text (chunked prefill on the context server may round differently)
            self.ref = {s.name: s.complete(SANITY) for s in (self.ctx, self.gen)}
            self.ref["disagg"] = self.through(self.main)
            assert self.through(self.impatient) == self.ref["disagg"]  # it has seen both servers healthy
        except BaseException:
            self.stop()
            raise
        self.rng = random.Random(23)

    def through(self, orch: Orchestrator, stream: bool = False) -> str:
        if not stream:
            r = httpx.post(orch.url + "/v1/completions", json=SANITY, timeout=60)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"]
        parts = []
        with httpx.stream("POST", orch.url + "/v1/completions", json={**SANITY, "stream": True}, timeout=60) as r:
            assert r.status_code == 200, r.read()
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    event = json.loads(line[6:])
                    assert "error" not in event, event
                    parts += [c["text"] for c in event["choices"]]
        return "".join(parts)

    def prompt(self, n: int) -> list[int]:
        return [self.rng.randrange(3, 300) for _ in range(n)]  # never a prefix cache hit

    def settle(self, survivors: list[Server], bound_s: float, what: str) -> None:
        """Every survivor back to 0 used blocks within bound_s, and still answering its reference text."""
        for s in survivors:
            wait_zero(s, bound_s, what)
        for s in survivors:
            assert s.complete(SANITY) == self.ref[s.name], f"{s.name} answers differently after {what}"
            wait_zero(s, 5, f"{what} and a sanity request")

    def check_disaggregated(self) -> None:
        """Both servers up (killed ones restarted), and the disaggregated path answers the reference."""
        for s in (self.ctx, self.gen):
            s.ensure_up()
        assert self.through(self.main) == self.ref["disagg"]
        assert self.through(self.main, stream=True) == self.ref["disagg"]
        # the impatient one too: a server it marked unhealthy is probed now, not when a cell has it stopped
        assert self.through(self.impatient) == self.ref["disagg"]
        for s in (self.ctx, self.gen):
            wait_zero(s, CTX_TIMEOUT_MS / 1000 + 5, "the sanity requests")

    def stop(self) -> None:
        for o in self.orchs:
            o.stop()
        for s in (self.ctx, self.gen):
            s.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stranded")
    old = os.environ.get("MESHSERVE_SECRET")
    os.environ["MESHSERVE_SECRET"] = SECRET
    c = None
    try:
        c = Cluster(tmp)
        yield c
    finally:
        if c is not None:
            c.stop()
        if old is None:
            os.environ.pop("MESHSERVE_SECRET", None)
        else:
            os.environ["MESHSERVE_SECRET"] = old


@pytest.fixture
def c(cluster):
    for s in (cluster.ctx, cluster.gen):
        s.ensure_up()
        wait_zero(s, 10, "the previous test")
    for orch in (cluster.main, cluster.impatient):  # both see both servers healthy (a failed test may have
        assert cluster.through(orch) == cluster.ref["disagg"]  # left one marked down)
    for s in (cluster.ctx, cluster.gen):
        wait_zero(s, CTX_TIMEOUT_MS / 1000 + 5, "the sanity requests")
    yield cluster
    for s in (cluster.ctx, cluster.gen):
        if s.stopped:
            s.signal(signal.SIGCONT)


# ---- queued + prefilling ------------------------------------------------------------------------------
def _queued_and_prefilling(c: Cluster, orch: Orchestrator, tag: str) -> tuple[RawRequest, RawRequest]:
    """A (7000 tokens, not streamed) prefilling on the context server, B (streamed) queued behind it."""
    a = RawRequest(orch.url, "/v1/completions", {"prompt": c.prompt(LONG_PROMPT), "max_tokens": 8,
                                                 "temperature": 0, "ignore_eos": True}, f"strand-{tag}-A")

    def prefilling():
        m = c.ctx.metrics()
        return m["meshserve_num_requests_running"] == 1 and m["meshserve_kv_cache_used_blocks"] > 0

    wait_for(prefilling, 60, "A prefilling on the context server")
    b = RawRequest(orch.url, "/v1/completions", {"prompt": c.prompt(40), "max_tokens": 8, "temperature": 0,
                                                 "ignore_eos": True, "stream": True}, f"strand-{tag}-B")
    wait_for(lambda: c.ctx.metrics()["meshserve_num_requests_waiting"] == 1, 60, "B queued on the context server")
    m = c.ctx.metrics()
    assert m["meshserve_num_requests_running"] == 1, "A finished its prefill before the event: make it longer"
    return a, b


@pytest.mark.parametrize("event", ["disconnect", "abort", "kill_ctx", "kill_gen"])
def test_queued_and_prefilling(c, event):
    orch = c.impatient if event == "abort" else c.main
    tag = f"qp-{event}"
    ctx_aborts, gen_aborts = c.ctx.aborts(), c.gen.aborts()
    a, b = _queued_and_prefilling(c, orch, tag)
    if event == "disconnect":
        b.close()
        a.close()
        c.settle([c.ctx, c.gen], 10, "the clients went away")
        assert c.ctx.aborts() - ctx_aborts == 2
    elif event == "abort":
        c.ctx.signal(signal.SIGSTOP)  # the hops outlast the orchestrator's -t
        try:
            statuses = [a.answer(IMPATIENT_T + 10)[0], b.answer(IMPATIENT_T + 10)[0]]
        finally:
            c.ctx.signal(signal.SIGCONT)
        assert statuses == [504, 504]
        c.settle([c.ctx, c.gen], 10, "the orchestrator gave up (-t)")
        assert c.ctx.aborts() - ctx_aborts == 2
    elif event == "kill_ctx":
        c.ctx.kill()
        statuses = [a.answer()[0], b.answer()[0]]
        assert all(s >= 500 for s in statuses), statuses
        c.settle([c.gen], 5, "the context server was killed")
    else:
        c.gen.kill()
        (sa, body_a), (sb, body_b) = a.answer(), b.answer()
        assert (sa, sb) == (503, 503), (body_a, body_b)
        # both were pinned when their prefill ended and nobody pulls them: kv_transfer_timeout_ms frees them
        c.settle([c.ctx], 2 * CTX_TIMEOUT_MS / 1000 + 5, "the generation server was killed")
        log = c.ctx.log()
        for r in (a, b):
            assert any(r.request_id in line and "kv_transfer_timeout_ms" in line for line in log.splitlines()), \
                f"{r.request_id}: no pin freed by the timeout in the context server's log"
    assert event == "kill_gen" or c.gen.aborts() == gen_aborts
    c.check_disaggregated()


# ---- transferring -------------------------------------------------------------------------------------
def _transferring(c: Cluster, orch: Orchestrator, tag: str, pull: bool = True,
                  max_tokens: int = 8) -> list[RawRequest]:
    """Two requests (one streamed, one not) pinned on the context server with their generation hops
    open on the generation server; with `pull`, that server pulling from the stopped context server,
    else the generation server stopped before it read them."""
    c.gen.signal(signal.SIGSTOP)
    streamed = {"stream": True, "stream_options": {"include_usage": True}}
    reqs = [RawRequest(orch.url, "/v1/completions", {"prompt": c.prompt(PULL_PROMPT), "max_tokens": max_tokens,
                                                     "temperature": 0, "ignore_eos": True, **extra},
                       f"strand-{tag}-{'stream' if extra else 'plain'}") for extra in (streamed, {})]
    wait_for(lambda: orch.inflight("generation") == 2, 60, "both generation hops open on the stopped server")
    m = c.ctx.metrics()
    assert m["meshserve_kv_cache_used_blocks"] > 0 and m["meshserve_num_requests_running"] == 0, m
    if pull:
        c.ctx.signal(signal.SIGSTOP)
        c.gen.signal(signal.SIGCONT)
        # each pull's blocks allocated; the pulls wait on the stopped source
        wait_for(lambda: c.gen.metrics()["meshserve_kv_cache_used_blocks"] == 2 * -(-PULL_PROMPT // BLOCK), 10,
                 "the generation server pulling both")
    return reqs


@pytest.mark.parametrize("event", ["disconnect", "abort", "kill_ctx", "kill_gen", "timeout"])
def test_transferring(c, event):
    orch = c.impatient if event == "abort" else c.main
    gen_aborts = c.gen.aborts()
    failovers = orch.metric("meshserve_disagg_failovers_total")
    reqs = _transferring(c, orch, f"t-{event}", max_tokens=LONG_DECODE if event == "disconnect" else 8)
    if event == "disconnect":
        for r in reqs:
            r.close()
        wait_for(lambda: orch.inflight("generation") == 0, 10, "the orchestrator closing the generation hops")
        c.ctx.signal(signal.SIGCONT)  # the pulls finish: the aborted one frees, the streamed one is aborted now
        c.settle([c.gen, c.ctx], GEN_TIMEOUT_MS / 1000 + 5, "the clients went away mid-transfer")
        assert c.gen.aborts() - gen_aborts == 2  # neither ran its LONG_DECODE tokens
    elif event == "abort":
        # -t passes with no answer from the pulling server: the requests start again on the context server
        wait_for(lambda: orch.inflight("context") == 2, IMPATIENT_T + 10, "the requests going on elsewhere")
        c.ctx.signal(signal.SIGCONT)
        answers = [r.answer() for r in reqs]
        assert [s for s, _ in answers] == [200, 200], answers
        assert sse_tokens(answers[0][1]) == (8, None) and json.loads(answers[1][1])["usage"]["completion_tokens"] == 8
        assert orch.metric("meshserve_disagg_failovers_total") - failovers == 2
        c.settle([c.gen, c.ctx], GEN_TIMEOUT_MS / 1000 + 5, "the orchestrator gave up on the generation hops (-t)")
    elif event == "kill_ctx":
        c.ctx.kill()
        answers = [r.answer() for r in reqs]
        assert [s for s, _ in answers] == [503, 503], answers
        assert all("kv_transfer_failed" in body for _, body in answers), answers
        c.settle([c.gen], 5, "the context server was killed mid-transfer")
    elif event == "kill_gen":
        c.gen.kill()
        c.ctx.signal(signal.SIGCONT)
        answers = [r.answer() for r in reqs]
        assert [s for s, _ in answers] == [200, 200], answers  # started again on the context server
        assert orch.metric("meshserve_disagg_failovers_total") - failovers == 2
        c.settle([c.ctx], CTX_TIMEOUT_MS / 1000 + 5, "the generation server was killed mid-transfer")
    else:
        # the context server stays stopped: the generation server's pulls give up after its timeout
        wait_zero(c.gen, GEN_TIMEOUT_MS / 1000 + 5, "the pulls timed out")
        answers = [r.answer() for r in reqs]
        assert [s for s, _ in answers] == [503, 503], answers
        assert all("kv_transfer_failed" in body for _, body in answers), answers
        c.ctx.signal(signal.SIGCONT)  # its pins' deadlines have passed: freed at once
        c.settle([c.gen, c.ctx], 5, "the pulls timed out")
    c.check_disaggregated()


def test_transfer_pending_past_the_context_timeout(c):
    """The generation server is stopped before it reads the requests: the context server frees the
    pins by its timeout meanwhile; continued, the generation server's pulls are refused (503s) and
    free their blocks."""
    reqs = _transferring(c, c.main, "pending-timeout", pull=False)
    wait_zero(c.ctx, CTX_TIMEOUT_MS / 1000 + 5, "the pins' timeout")
    c.gen.signal(signal.SIGCONT)
    answers = [r.answer() for r in reqs]
    assert [s for s, _ in answers] == [503, 503], answers
    assert all("not held" in body for _, body in answers), answers
    c.settle([c.gen, c.ctx], 5, "the refused pulls")
    c.check_disaggregated()


# ---- decoding ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("event", ["disconnect", "abort", "kill_gen"])
def test_decoding(c, event):
    orch = c.impatient if event == "abort" else c.main
    gen_aborts = c.gen.aborts()
    failovers = orch.metric("meshserve_disagg_failovers_total")
    body = {"prompt": c.prompt(50), "max_tokens": DECODE_TOKENS, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    started, proceed, result = threading.Event(), threading.Event(), {}

    def client():
        chunks = 0
        events = []
        with httpx.stream("POST", orch.url + "/v1/completions", json=body, timeout=60,
                          headers={"X-Request-Id": f"strand-d-{event}"}) as r:
            result["status"] = r.status_code
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line)
                    chunks += 1
                    if chunks == 20:
                        started.set()
                        proceed.wait(30)
                        if event == "disconnect":
                            return  # closing the response closes the connection
        result["tokens"], result["error"] = sse_tokens("\n".join(events))

    t = threading.Thread(target=client, daemon=True)
    t.start()
    assert started.wait(60), result
    m = c.gen.metrics()
    assert m["meshserve_num_requests_running"] == 1, f"the generation server finished before the event: {m}"
    proceed.set()
    if event == "disconnect":
        t.join(10)
        c.settle([c.gen, c.ctx], 5, "the client went away mid-decode")
        assert c.gen.aborts() - gen_aborts == 1
    elif event == "abort":
        c.gen.signal(signal.SIGSTOP)  # no chunk for stall_timeout: the stream resumes on the context server
        try:
            t.join(60)
        finally:
            c.gen.signal(signal.SIGCONT)  # it finds its client gone and aborts
        assert result.get("tokens") == DECODE_TOKENS and result.get("error") is None, result
        assert orch.metric("meshserve_disagg_failovers_total") - failovers == 1
        c.settle([c.gen, c.ctx], 5, "the orchestrator gave up on the stalled stream")
    else:
        c.gen.kill()
        t.join(60)
        assert result.get("tokens") == DECODE_TOKENS and result.get("error") is None, result
        assert orch.metric("meshserve_disagg_failovers_total") - failovers == 1
        c.settle([c.ctx], 5, "the generation server was killed mid-decode")
    c.check_disaggregated()
