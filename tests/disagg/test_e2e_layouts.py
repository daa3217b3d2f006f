"""Disaggregated serving through `meshserve disaggregated` with different layouts on the two sides
and with faults (issue 22's proof): context servers at TP 2 and TP 1 (16-token blocks), a
generation server at PP 2 (32-token blocks); greedy text and token ids equal one aggregated
server's for completions and chat, streamed and not; 64 concurrent streams each equal to their
aggregated output; a context server stopped between requests (the other serves), one killed while a
request waits on it (retried on the other); a generation server refusing a transfer (a clean error,
and both servers end with zero used KV blocks)."""
from __future__ import annotations

import concurrent.futures
import os
import signal
import sys
import time

import httpx
import openai
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "serve"))
from serve_util import ServerProcess, free_port  # noqa: E402

from helpers import build_checkpoint  # noqa: E402
from test_e2e import Orchestrator  # noqa: E402

pytestmark = pytest.mark.timeout(420)
SECRET = "layouts-" + "7f" * 12


def _yaml(path, block: int, timeout_ms: int = 3000) -> str:
    path.write_text(f"cache_transceiver_config:\n  backend: DEFAULT\n  kv_transfer_timeout_ms: {timeout_ms}\n"
                    f"kv_cache_config:\n  max_tokens: 4096\n  tokens_per_block: {block}\n")
    return str(path)


def _used(server) -> float:
    for line in httpx.get(server.base_url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("meshserve_kv_cache_used_blocks{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no meshserve_kv_cache_used_blocks in /metrics")


def _wait_used_zero(server, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while _used(server) != 0:
        assert time.monotonic() < deadline, f"{server.base_url} still holds {_used(server)} KV blocks"
        time.sleep(0.25)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("layouts")
    model = str(tmp / "tiny")
    build_checkpoint(model, "llama", max_position_embeddings=2048)
    old = os.environ.get("MESHSERVE_SECRET")
    os.environ["MESHSERVE_SECRET"] = SECRET
    flags = ("--max_batch_size", "64")
    servers = {}
    try:
        servers["agg"] = ServerProcess(model, *flags, "--max_seq_len", "512", log_dir=str(tmp))
        servers["ctx_tp2"] = ServerProcess(model, *flags, "--tp_size", "2", "--max_seq_len", "512", "--config",
                                           _yaml(tmp / "ctx2.yml", 16), log_dir=str(tmp))
        servers["ctx_tp1"] = ServerProcess(model, *flags, "--max_seq_len", "512", "--config",
                                           _yaml(tmp / "ctx1.yml", 16), log_dir=str(tmp))
        # a shorter max_seq_len than the context servers': long requests are refused here only
        servers["gen_pp2"] = ServerProcess(model, *flags, "--pp_size", "2", "--max_seq_len", "256", "--config",
                                           _yaml(tmp / "gen.yml", 32), log_dir=str(tmp))
        for s in servers.values():
            s.wait_ready(300)
        port = free_port()
        config = tmp / "disagg.yml"
        config.write_text(
            f"hostname: 127.0.0.1\nport: {port}\nbackend: pytorch\nmax_retries: 2\nhealth_check_interval: 1\n"
            "context_servers:\n  num_instances: 2\n  router:\n    type: round_robin\n  urls:\n"
            f"    - \"127.0.0.1:{servers['ctx_tp2'].port}\"\n    - \"127.0.0.1:{servers['ctx_tp1'].port}\"\n"
            f"generation_servers:\n  num_instances: 1\n  urls:\n    - \"127.0.0.1:{servers['gen_pp2'].port}\"\n")
        url = f"http://127.0.0.1:{port}"
        orch = Orchestrator(str(config), str(tmp / "orchestrator.log")).wait_healthy(url, 60)
        yield {**servers, "url": url, "orch": orch}
        orch.stop()
    finally:
        for s in servers.values():
            s.stop()
        if old is None:
            os.environ.pop("MESHSERVE_SECRET", None)
        else:
            os.environ["MESHSERVE_SECRET"] = old


def _clients(cluster):
    agg = openai.OpenAI(base_url=cluster["agg"].base_url + "/v1", api_key="EMPTY", max_retries=0, timeout=180)
    dis = openai.OpenAI(base_url=cluster["url"] + "/v1", api_key="EMPTY", max_retries=0, timeout=180)
    return agg, dis


PROMPTS = ["The quick brown fox jumps over the lazy dog. " * 3, "Paris is the capital of France.",
           "def add(a, b):\n    return a + b\n" * 2]


def test_text_and_token_ids_match_across_layouts(cluster):
    agg, dis = _clients(cluster)
    model = agg.models.list().data[0].id
    for prompt in PROMPTS * 2:  # twice: round robin reaches both context servers (TP 2 and TP 1)
        kw = dict(model=model, prompt=prompt, max_tokens=24, temperature=0,
                  extra_body={"ignore_eos": True, "return_token_ids": True})
        want, got = agg.completions.create(**kw), dis.completions.create(**kw)
        assert got.choices[0].text == want.choices[0].text, prompt
        assert got.choices[0].model_extra["token_ids"] == want.choices[0].model_extra["token_ids"]
        streamed = "".join(c.choices[0].text for c in dis.completions.create(**kw, stream=True) if c.choices)
        assert streamed == want.choices[0].text
    for content in PROMPTS:
        kw = dict(model=model, messages=[{"role": "user", "content": content}], max_tokens=20, temperature=0,
                  extra_body={"ignore_eos": True})
        want = agg.chat.completions.create(**kw).choices[0].message.content
        assert dis.chat.completions.create(**kw).choices[0].message.content == want
        chunks = dis.chat.completions.create(**kw, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    for name in ("ctx_tp2", "ctx_tp1"):
        assert "context_only" in cluster[name].log_tail(100_000), f"{name} served no context request"


def test_64_concurrent_streams_each_equal_their_aggregated_output(cluster):
    agg, dis = _clients(cluster)
    model = agg.models.list().data[0].id
    prompts = [f"Request number {i}: count the words in this sentence and more." for i in range(64)]

    def run(client, prompt, stream):
        kw = dict(model=model, prompt=prompt, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
        if stream:
            return "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True) if c.choices)
        return client.completions.create(**kw).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        want = list(pool.map(lambda p: run(agg, p, False), prompts))
        got = list(pool.map(lambda p: run(dis, p, True), prompts))
    assert got == want
    for name in ("ctx_tp2", "ctx_tp1", "gen_pp2"):
        _wait_used_zero(cluster[name])


def test_generation_server_refusing_the_transfer_is_a_clean_error_and_frees_everything(cluster):
    """200 prompt tokens + 100 fit the context servers (512) but not the generation server (256)."""
    _, dis = _clients(cluster)
    model = dis.models.list().data[0].id
    with pytest.raises(openai.BadRequestError) as err:
        dis.completions.create(model=model, prompt=list(range(10, 210)), max_tokens=100, temperature=0)
    assert "max_seq_len" in str(err.value) or "256" in str(err.value), str(err.value)
    for name in ("ctx_tp2", "ctx_tp1", "gen_pp2"):  # the context side's pin ends by its 3 s timeout
        _wait_used_zero(cluster[name])
    metrics = httpx.get(cluster["url"] + "/metrics", timeout=10).text
    assert "meshserve_disagg_failures_total" in metrics


def test_context_server_killed_while_a_request_waits_on_it_is_retried_then_stopped_one_is_skipped(cluster):
    """Last: it kills the TP 1 context server. SIGSTOP it, send two requests (round robin gives one
    of them to it), SIGKILL it: that one is retried on the TP 2 server; later requests all go there."""
    agg, dis = _clients(cluster)
    model = agg.models.list().data[0].id
    victim = cluster["ctx_tp1"]
    kw = dict(model=model, max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    want = [agg.completions.create(prompt=p, **kw).choices[0].text for p in PROMPTS[:2]]
    os.killpg(victim.proc.pid, signal.SIGSTOP)
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(lambda p: dis.completions.create(prompt=p, **kw).choices[0].text, p)
                       for p in PROMPTS[:2]]
            time.sleep(1.5)
            os.killpg(victim.proc.pid, signal.SIGKILL)
            got = [f.result(timeout=120) for f in futures]
    finally:
        try:
            os.killpg(victim.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert got == want
    # stopped for good: every further request is served by the other context server
    for p in PROMPTS:
        assert dis.completions.create(prompt=p, **kw).choices[0].text == \
            agg.completions.create(prompt=p, **kw).choices[0].text
    metrics = httpx.get(cluster["url"] + "/metrics", timeout=10).text
    retries = [float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith("meshserve_disagg_retries_total")]
    assert retries and sum(retries) >= 1, metrics[-3000:]
    for name in ("ctx_tp2", "gen_pp2"):
        _wait_used_zero(cluster[name])
