"""`bench serve` against a stub OpenAI-compatible server whose timing is known.

The stub (stub_openai_server.py, its own process) streams its first token 500 ms after a request
arrives and then one token every 50 ms, so the true TTFT is 500 ms, ITL and TPOT are 50 ms, and
E2E is 500 + 50*(n-1) ms. Prompts that contain FAIL get HTTP 500.
"""
import asyncio
import json
import os
import subprocess
import sys
import time

import httpx
import pytest

from stub_openai_server import FIRST_TOKEN_S, GAP_S

NUM_TOKENS = 8


@pytest.fixture(scope="module")
def stub_server():
    """The stub in its own process, so its work never shares a GIL with the client measured."""
    yield from _stub()


@pytest.fixture(scope="module")
def stub_server_without_usage():
    yield from _stub("--omit-usage")


def _stub(*flags):
    script = os.path.join(os.path.dirname(__file__), "stub_openai_server.py")
    proc = subprocess.Popen([sys.executable, script, *flags], stdout=subprocess.PIPE, text=True)
    try:
        base_url = f"http://127.0.0.1:{int(proc.stdout.readline())}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(base_url + "/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "stub server did not start"
            time.sleep(0.05)
        yield base_url
    finally:
        proc.terminate()
        proc.wait(10)


def _received(base_url):
    return httpx.get(base_url + "/stub/received").json()


def _clear(base_url):
    httpx.delete(base_url + "/stub/received")


def _write_prompts(path, num, fail_at=()):
    with open(path, "w") as f:
        for i in range(num):
            prompt = f"prompt number {i}" + (" FAIL" if i in fail_at else "")
            f.write(json.dumps({"prompt": prompt, "output_len": NUM_TOKENS}) + "\n")


def _run_cli(argv):
    from meshserve.commands.bench import build_parser
    args = build_parser().parse_args(argv)
    return args.bench_main(args)


VLLM_FIELDS = [
    "date", "model_id", "request_rate", "max_concurrency", "duration", "completed", "failed",
    "total_input_tokens", "total_output_tokens", "request_throughput", "request_goodput",
    "output_throughput", "total_token_throughput", "input_lens", "output_lens", "ttfts", "itls",
    "errors",
] + [f"{stat}_{name}_ms" for name in ("ttft", "tpot", "itl", "e2el")
     for stat in ("mean", "median", "std", "p90", "p99")]


def test_measured_latencies_match_the_stub_timing(stub_server, tmp_path, tiny_tokenizer_dir):
    import matplotlib.image

    base_url = stub_server
    _clear(base_url)
    data, out_json, out_png = tmp_path / "p.jsonl", tmp_path / "r.json", tmp_path / "r.png"
    fail_at = (3, 7, 11, 15)
    _write_prompts(data, 16, fail_at)
    _run_cli(["serve", "--base-url", base_url, "--dataset", "jsonl", "--dataset-path", str(data),
              "--tokenizer", tiny_tokenizer_dir, "--num-prompts", "16", "--request-rate", "20",
              "--max-concurrency", "4", "--num-warmups", "2", "--percentiles", "50",
              "--slo", "ttft:2000,tpot:500", "--result-json", str(out_json), "--plot", str(out_png),
              "--disable-tqdm"])
    result = json.loads(out_json.read_text())
    received = _received(base_url)

    assert len(received) == 18  # 2 warm-ups + 16 measured
    assert result["completed"] + result["failed"] == 16
    assert result["failed"] == len(fail_at)
    assert all(result["errors"][i].startswith("HTTP 500") for i in fail_at)
    for field in VLLM_FIELDS + ["p50_ttft_ms"]:
        assert field in result, field
    assert result["model_id"] == "stub-model"  # discovered from /v1/models
    assert result["distinct_prompts"] is False  # 16 lines cannot give 16 measured prompts + 2 warm-ups
    assert result["max_concurrency"] == 4 and result["request_rate"] == 20.0
    assert result["total_output_tokens"] == 12 * NUM_TOKENS
    assert result["mean_ttft_ms"] == pytest.approx(FIRST_TOKEN_S * 1000, rel=0.10)
    assert result["mean_itl_ms"] == pytest.approx(GAP_S * 1000, rel=0.10)
    assert result["mean_tpot_ms"] == pytest.approx(GAP_S * 1000, rel=0.10)
    assert result["mean_e2el_ms"] == pytest.approx((FIRST_TOKEN_S + GAP_S * (NUM_TOKENS - 1)) * 1000, rel=0.10)
    assert result["request_goodput"] == pytest.approx(result["request_throughput"])
    assert all(len(gaps) == NUM_TOKENS - 1 for gaps, err in zip(result["itls"], result["errors"]) if not err)

    body = received[-1]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["ignore_eos"] is True and body["min_tokens"] == body["max_tokens"] == NUM_TOKENS

    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(str(out_png))
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_chat_endpoint_and_rate_sweep(stub_server, tmp_path, tiny_tokenizer_dir):
    import matplotlib.image

    base_url = stub_server
    _clear(base_url)
    out_json, out_png = tmp_path / "sweep.json", tmp_path / "sweep.png"
    _run_cli(["serve", "--base_url", base_url, "--model", "stub-model", "--endpoint", "/v1/chat/completions",
              "--dataset", "random", "--input-len", "20", "--output-len", "4", "--tokenizer",
              tiny_tokenizer_dir, "--num_prompts", "6", "--request_rate", "50,inf", "--no-ignore-eos", "--num-warmups", "2",
              "--result-json", str(out_json), "--plot", str(out_png), "--disable-tqdm"])
    results = json.loads(out_json.read_text())
    assert [r["request_rate"] for r in results] == [50.0, "inf"]
    for r in results:
        assert (r["completed"], r["failed"]) == (6, 0)
        assert r["input_lens"] == [20] * 6 and r["output_lens"] == [4] * 6
        # All six start at once here, so client and stub overheads stack up: a looser bound.
        assert r["mean_ttft_ms"] == pytest.approx(FIRST_TOKEN_S * 1000, rel=0.25)
    received = _received(base_url)
    assert len(received) == 14  # 2 warm-ups before the first rate, then 6 per rate
    assert all("messages" in b and "ignore_eos" not in b for b in received)
    # No prompt is sent twice: a server with prefix caching would answer a repeat from its cache.
    prompts = [b["messages"][-1]["content"] for b in received]
    assert len(set(prompts)) == 14
    assert all(r["distinct_prompts"] is True for r in results)
    assert [r["num_warmups"] for r in results] == [2, 0]
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.image.imread(str(out_png)).shape[0] > 400  # two rows of panels


def test_unreachable_server_counts_every_request_as_failed(tmp_path):
    from meshserve.bench.datasets import Sample
    from meshserve.bench.metrics import compute_metrics
    from meshserve.bench.serve import ServeConfig, free_port, run_once

    config = ServeConfig(base_url=f"http://127.0.0.1:{free_port()}", model="m", disable_tqdm=True)
    records, duration, _ = asyncio.run(run_once(config, [Sample("hi", 1, 4)] * 3, float("inf")))
    report = compute_metrics(records, duration)
    assert (report["completed"], report["failed"]) == (0, 3)
    assert all(report["errors"])


def test_poisson_arrivals_have_the_asked_mean_gap(monkeypatch):
    """The gaps between arrivals are the draws of an exponential (burstiness 1) or gamma process of
    the asked rate: checked on the sleeps asked for (no wall-clock timing), against numpy's own draws."""
    import numpy as np

    import meshserve.bench.serve as serve

    asked = []

    async def fake_sleep(seconds):
        asked.append(seconds)

    monkeypatch.setattr(serve.asyncio, "sleep", fake_sleep)

    async def collect(num, rate, burstiness):
        return [i async for i in serve._arrivals(num, rate, burstiness, np.random.default_rng(0))]

    assert asyncio.run(collect(41, 200.0, 1.0)) == list(range(41))
    expected = np.random.default_rng(0).exponential(1 / 200.0, size=40)
    np.testing.assert_allclose(asked, expected, rtol=1e-12)
    assert abs(np.mean(asked) - 1 / 200.0) < 0.4 / 200.0  # 40 draws: the mean is near 5 ms
    asked.clear()
    asyncio.run(collect(2001, 50.0, 0.5))  # burstier: gamma(0.5) gaps, same mean, twice the variance
    gaps = np.array(asked)
    assert len(gaps) == 2000 and abs(gaps.mean() - 0.02) < 0.002
    assert abs(gaps.var() / (0.5 * (0.02 / 0.5) ** 2) - 1) < 0.2  # gamma(k, theta) variance k * theta^2
    asked.clear()
    asyncio.run(collect(10, float("inf"), 1.0))
    assert asked == []  # rate inf: all at once


def _raw_sse_server(pieces: list[bytes], gap_s: float, status: int = 200):
    """An HTTP server (aiohttp.web, in this test's loop) that answers every POST by writing
    `pieces` as they are, `gap_s` apart: SSE events split anywhere and several in one write."""
    from aiohttp import web

    async def handler(request):
        await request.read()
        if status != 200:
            return web.Response(status=status, text="no such model: x")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for p in pieces:
            await asyncio.sleep(gap_s)
            await resp.write(p)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/completions", handler)
    return app


async def _send_to(app, samples_text=("hi",)):
    from aiohttp import web

    from meshserve.bench.datasets import Sample
    from meshserve.bench.serve import ServeConfig, _make_client, send_request
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        config = ServeConfig(base_url=f"http://127.0.0.1:{port}", endpoint="/v1/completions", model="m")
        async with _make_client(config) as client:
            return await send_request(client, config, Sample(prompt=samples_text[0], prompt_len=1, output_len=3))
    finally:
        await runner.cleanup()


def _event(text=None, **extra):
    body = {"choices": [{"text": text}]} if text is not None else {"choices": []}
    body.update(extra)
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def test_sse_events_split_across_reads_and_packed_into_one_are_each_counted():
    a, b, c = _event("Hel"), _event("lo"), _event(" you")
    usage = _event(None, usage={"completion_tokens": 3})
    # a split inside the JSON of the first event, b and half of c in one write, then the rest
    pieces = [a[:17], a[17:] + b + c[:9], c[9:] + b": keep-alive comment\n\n" + usage + b"data: [DONE]\n\n"]
    rec = asyncio.run(_send_to(_raw_sse_server(pieces, gap_s=0.2)))
    assert rec.success, rec.error
    assert rec.generated_text == "Hello you"
    assert rec.output_tokens == 3
    # the first text arrives with the second write (~0.4 s), b with it, c with the third (~0.6 s, with
    # the end). Bounds relative to the run's own end, so a loaded machine's delays do not fail it.
    assert 0.35 <= rec.ttft <= rec.latency - 0.1, (rec.ttft, rec.latency)
    assert len(rec.itl) == 2 and rec.itl[0] < 0.1 and 0.15 <= rec.itl[1] <= rec.latency - rec.ttft + 0.01, rec.itl


def test_an_error_event_and_a_non_200_answer_fail_the_request_with_the_message():
    err = b"data: " + json.dumps({"error": {"message": "engine died", "code": 503}}).encode() + b"\n\n"
    rec = asyncio.run(_send_to(_raw_sse_server([_event("a"), err], gap_s=0.01)))
    assert not rec.success and "error in stream" in rec.error and "engine died" in rec.error
    rec = asyncio.run(_send_to(_raw_sse_server([], gap_s=0, status=404)))
    assert not rec.success and rec.error.startswith("HTTP 404") and "no such model" in rec.error


def test_a_server_that_omits_usage_stops_the_run_with_an_error(stub_server_without_usage, tmp_path,
                                                                tiny_tokenizer_dir):
    """Counting chunks as tokens would misreport throughput whenever a chunk holds several tokens."""
    base_url = stub_server_without_usage
    data, out_json = tmp_path / "p.jsonl", tmp_path / "r.json"
    _write_prompts(data, 3)
    for endpoint in ("/v1/completions", "/v1/chat/completions"):
        with pytest.raises(SystemExit) as exc:
            _run_cli(["serve", "--base-url", base_url, "--endpoint", endpoint, "--dataset", "jsonl",
                      "--dataset-path", str(data), "--tokenizer", tiny_tokenizer_dir, "--num-prompts", "3",
                      "--request-rate", "inf", "--result-json", str(out_json), "--disable-tqdm"])
        message = exc.value.code
        assert isinstance(message, str), message  # a message: exit status 1
        assert "usage" in message and base_url + endpoint in message, message
        assert not out_json.exists()
    assert len(_received(base_url)) >= 2  # the stub did answer: it is the missing usage that failed the run


def test_usage_in_the_final_event_is_the_token_count_and_its_absence_is_an_error():
    from meshserve.bench.serve import MissingUsageError

    usage = _event(None, usage={"completion_tokens": 7})
    rec = asyncio.run(_send_to(_raw_sse_server([_event("ab"), usage, b"data: [DONE]\n\n"], gap_s=0.01)))
    assert rec.success and rec.output_tokens == 7  # one chunk, seven tokens: usage wins
    for pieces in ([_event("ab"), _event("cd"), b"data: [DONE]\n\n"], [_event("ab"), _event("cd")]):
        with pytest.raises(MissingUsageError, match="usage"):
            asyncio.run(_send_to(_raw_sse_server(pieces, gap_s=0.01)))


def _cli_main(argv):
    from meshserve.commands.bench import build_parser, main
    return main(build_parser().parse_args(argv))


def test_a_run_where_every_request_failed_exits_1(stub_server, tmp_path, tiny_tokenizer_dir, capsys):
    """The table is still printed (its errors say why), but the exit status is 1 and stderr has one line:
    a script that checks the status does not take a run of zero answers for a result."""
    data = tmp_path / "p.jsonl"
    _write_prompts(data, 3, fail_at=(0, 1, 2))
    rc = _cli_main(["serve", "--base-url", stub_server, "--dataset", "jsonl", "--dataset-path", str(data),
                    "--tokenizer", tiny_tokenizer_dir, "--num-prompts", "3", "--request-rate", "inf",
                    "--num-warmups", "0", "--disable-tqdm"])
    out, err = capsys.readouterr()
    assert rc == 1 and "Failed requests:" in out
    assert err == "meshserve bench serve: error: no request succeeded (the table's errors, and the log's " \
                  "warnings, say why)\n"
    _write_prompts(data, 3, fail_at=(1,))  # some answered: a result, status 0
    assert _cli_main(["serve", "--base-url", stub_server, "--dataset", "jsonl", "--dataset-path", str(data),
                      "--tokenizer", tiny_tokenizer_dir, "--num-prompts", "3", "--request-rate", "inf",
                      "--num-warmups", "0", "--disable-tqdm"]) == 0


@pytest.mark.parametrize("argv,status,message", [
    (["serve", "--input-len", "0"], 2, "--input-len 0: must be >= 1"),
    (["serve", "--output-len", "-1"], 2, "--output-len -1: must be >= 1"),
    (["serve", "--dataset", "sharegpt"], 2, "--dataset sharegpt needs --dataset-path to an existing file, got None"),
    (["serve", "--dataset", "jsonl", "--dataset-path", "/no/such.jsonl"], 2,
     "--dataset jsonl needs --dataset-path to an existing file, got '/no/such.jsonl'"),
    (["serve", "--extra-body", "[1]"], 2, "--extra-body must be a JSON object, got '[1]'"),
    (["serve", "--num-prompts", "0"], 2, "--num-prompts must be >= 1, got 0"),
    (["throughput", "--input-len", "0", "--num-requests", "2"], 2, "--input-len 0: must be >= 1"),
    (["throughput", "--num-requests", "-3"], 2, "--num-requests must be >= 1, got -3"),
    (["soak"], 2, "--base-url is required: the server to soak, e.g. http://127.0.0.1:8000"),
])
def test_what_cannot_run_is_one_line_naming_the_flag_before_any_server_is_asked(argv, status, message, capsys):
    """Checked before a model loads or a server is asked (the base URL below answers nothing: an
    argument error must not be hidden behind a connection error)."""
    if argv[0] == "serve":
        argv = [*argv, "--base-url", "http://127.0.0.1:9"]
    assert _cli_main(argv) == status
    assert capsys.readouterr().err == f"meshserve bench {argv[0]}: error: {message}\n"


def test_vllms_ignore_eos_flag_is_the_default_here_and_its_backend_flag_says_what_to_use(capsys):
    from meshserve.commands.main import build_parser
    from meshserve.commands.main import main as cli_main
    parse = build_parser().parse_args
    assert parse(["bench", "serve"]).ignore_eos and parse(["bench", "serve", "--ignore-eos"]).ignore_eos
    assert not parse(["bench", "serve", "--no-ignore-eos"]).ignore_eos
    for argv, message in (
            (["--ignore-eos", "--no-ignore-eos"], "argument --no-ignore-eos: not allowed with argument --ignore-eos"),
            (["--backend", "vllm"], "unrecognized arguments: --backend vllm; --backend (vLLM's): bench serve talks "
                                    "OpenAI's API; --endpoint /v1/completions or /v1/chat/completions picks the route")):
        with pytest.raises(SystemExit) as exc:
            cli_main(["bench", "serve", *argv])  # as `meshserve bench serve ...` runs
        assert exc.value.code == 2
        assert capsys.readouterr().err == f"meshserve bench serve: error: {message} (see meshserve bench serve --help)\n"


def test_a_server_that_cannot_be_reached_is_one_line(capsys):
    rc = _cli_main(["serve", "--base-url", "http://127.0.0.1:9", "--num-prompts", "1", "--input-len", "4"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("meshserve bench serve: error: http://127.0.0.1:9/v1/models: ConnectError"), err
