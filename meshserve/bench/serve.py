"""`meshserve bench serve`: an online load generator for OpenAI-compatible servers.

Samples from datasets.py are sent at Poisson arrival times (optionally capped by a concurrency
limit) as streaming `/v1/completions` or `/v1/chat/completions` requests; each SSE stream is timed
into a `metrics.RequestRecord`, reduced by `metrics.compute_metrics`, printed, written as JSON and
drawn by plots.py. `ServerProcess` starts a server under test for the scripts in benchmarks/.
Output token counts come from the `usage` of each stream's final chunk (requested with
stream_options.include_usage); a server that leaves it out stops the run with an error.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, AsyncIterator, Optional, Sequence
from urllib.parse import urlparse

import httpx
import msgspec
import numpy as np

if TYPE_CHECKING:  # aiohttp is imported where the client runs
    import aiohttp

from meshserve.bench import datasets
from meshserve.bench.datasets import Sample
from meshserve.bench.metrics import (RequestRecord, compute_metrics, format_report, parse_percentiles,
                                     parse_slo)
from meshserve.progress import progress_bar

logger = logging.getLogger(__name__)

CHAT_ENDPOINT = "/v1/chat/completions"


class MissingUsageError(RuntimeError):
    """A server ended a stream without `usage` in its final chunk: every token count (throughput,
    TPOT) would be a guess, so the run stops instead of counting chunks as tokens."""


@dataclass
class ServeConfig:
    """Everything about how requests are sent; what is sent comes from the samples."""
    base_url: str
    model: str
    endpoint: str = "/v1/completions"
    api_key: Optional[str] = None
    ignore_eos: bool = True
    temperature: float = 0.0
    extra_body: dict = field(default_factory=dict)
    max_concurrency: Optional[int] = None
    num_warmups: int = 0
    burstiness: float = 1.0
    seed: int = 0
    timeout_s: float = 6 * 3600.0
    disable_tqdm: bool = False

    @property
    def is_chat(self) -> bool:
        return self.endpoint.rstrip("/").endswith("chat/completions")

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + "/" + self.endpoint.lstrip("/")


def build_payload(config: ServeConfig, sample: Sample) -> dict:
    payload: dict = {
        "model": config.model,
        "max_tokens": sample.output_len,
        "temperature": config.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if config.is_chat:
        payload["messages"] = [{"role": "user", "content": sample.prompt}]
        payload["max_completion_tokens"] = sample.output_len
    else:
        payload["prompt"] = sample.prompt
    if config.ignore_eos:
        payload["ignore_eos"] = True
        payload["min_tokens"] = sample.output_len
    payload.update(config.extra_body)
    return payload


def _chunk_text(chunk: dict, chat: bool) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    if chat:
        delta = choices[0].get("delta") or {}
        return (delta.get("content") or "") + (delta.get("reasoning_content") or "")
    return choices[0].get("text") or ""


_JSON = msgspec.json.Decoder()
_JSON_ENC = msgspec.json.Encoder()


async def send_request(client: "aiohttp.ClientSession", config: ServeConfig, sample: Sample) -> RequestRecord:
    """Stream one request and time it: TTFT to the first text chunk, ITL between text chunks.

    aiohttp (as vLLM's and TensorRT-LLM's serving benchmarks use), the stream read as raw bytes and
    split into SSE lines here, each event decoded with msgspec: at rate 32 the client handles
    ~8,000 events a second, and httpx's line iterator plus the stdlib json module took most of a
    core (2026-12-03, H200 host: client CPU 77-83% of a core), which delays the client's own reads
    and inflates the latencies it reports. Events that arrive in one read get its timestamp."""
    record = RequestRecord(prompt_len=sample.prompt_len)
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    texts: list[str] = []
    usage_tokens: Optional[int] = None  # completion_tokens of the last event, None when it had no usage
    start = record.start_time = time.perf_counter()
    last_text = last_event = start
    chat = config.is_chat
    pending = b""
    try:
        async with client.post(config.url, data=_JSON_ENC.encode(build_payload(config, sample)),
                               headers=headers) as response:
            if response.status != 200:
                body = (await response.read()).decode(errors="replace")
                record.error = f"HTTP {response.status}: {body[:500]}"
                return record
            done = False
            async for raw in response.content.iter_any():
                now = time.perf_counter()
                lines = (pending + raw).split(b"\n")
                pending = lines.pop()  # an incomplete last line waits for the next read
                for line in lines:
                    if not line.startswith(b"data:"):
                        continue  # blank separators, SSE comments, event names
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        done = True
                        break
                    last_event = now
                    chunk = _JSON.decode(data)
                    if chunk.get("error"):
                        record.error = f"error in stream: {json.dumps(chunk['error'])[:500]}"
                        return record
                    text = _chunk_text(chunk, chat)
                    if text:
                        if not texts:
                            record.ttft = now - start
                        else:
                            record.itl.append(now - last_text)
                        last_text = now
                        texts.append(text)
                    usage = chunk.get("usage")
                    usage_tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
                if done:
                    break
    except Exception as exc:  # noqa: BLE001 - one bad response is a failed request, not a failed run
        record.error = f"{type(exc).__name__}: {exc}"[:500]
        return record
    if not isinstance(usage_tokens, int):
        raise MissingUsageError(
            f"{config.url} ended a stream without usage.completion_tokens in its final chunk, though the "
            f"request asked for it (stream_options.include_usage); output tokens cannot be counted (a chunk "
            f"may hold several), so no figure would be right: use a server that sends usage")
    record.latency = last_event - start
    record.output_tokens = usage_tokens
    record.generated_text = "".join(texts)
    if not texts and not record.output_tokens:
        record.error = "the stream carried no tokens"
        return record
    if not texts:
        record.ttft = record.latency
    record.success = True
    return record


async def _arrivals(num: int, rate: float, burstiness: float, rng: np.random.Generator) -> AsyncIterator[int]:
    """Yield 0..num-1 at a Poisson process of `rate` per second (gamma gaps when burstiness != 1)."""
    for i in range(num):
        yield i
        if math.isinf(rate) or i == num - 1:
            continue
        await asyncio.sleep(rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness)))


def _make_client(config: ServeConfig) -> "aiohttp.ClientSession":
    import aiohttp
    host = urlparse(config.base_url).hostname or ""
    # Unbounded pool (limit=0): a capped pool would queue requests inside the client and inflate TTFT.
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
        timeout=aiohttp.ClientTimeout(total=None, connect=60.0, sock_read=config.timeout_s),
        headers={"Content-Type": "application/json"},
        trust_env=host not in ("127.0.0.1", "localhost", "::1"))


async def run_once(config: ServeConfig, samples: Sequence[Sample], rate: float,
                   warmups: Sequence[Sample] = ()) -> tuple[list[RequestRecord], float, float]:
    """Send warm-ups (not recorded), then every sample at `rate`.

    Returns the records, the duration (s) and the CPU seconds this process spent meanwhile: a
    client near one full core delays its own reads, and its latencies are then too high.
    """
    limit = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else None
    rng = np.random.default_rng(config.seed)
    async with _make_client(config) as client:

        async def limited(sample: Sample) -> RequestRecord:
            if limit is None:
                return await send_request(client, config, sample)
            async with limit:
                return await send_request(client, config, sample)

        if warmups:
            logger.info("Sending %d warm-up requests", len(warmups))
            results = await asyncio.gather(*(limited(s) for s in warmups))
            if not any(r.success for r in results):
                raise RuntimeError(f"every warm-up request to {config.url} failed; first error: "
                                   f"{results[0].error}")
        bar = progress_bar(total=len(samples), disable=config.disable_tqdm, desc=f"rate {rate:g} req/s")

        async def tracked(sample: Sample) -> RequestRecord:
            record = await limited(sample)
            bar.update(1)
            return record

        start, cpu_start = time.perf_counter(), time.process_time()
        tasks = [asyncio.create_task(tracked(samples[i]))
                 async for i in _arrivals(len(samples), rate, config.burstiness, rng)]
        records = list(await asyncio.gather(*tasks))
        duration, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        bar.close()
    return records, duration, cpu


def parse_rates(text: str) -> list[float]:
    rates = []
    for part in str(text).split(","):
        try:
            rate = float(part)
        except ValueError:
            raise ValueError(f"--request-rate: {part!r} is not a number or 'inf'") from None
        if not rate > 0:
            raise ValueError(f"--request-rate: {part!r} must be > 0 (or 'inf')")
        rates.append(rate)
    return rates


def fetch_served_model(base_url: str, api_key: Optional[str] = None,
                       timeout_s: float = 30.0) -> tuple[str, Optional[str]]:
    """The first model of /v1/models: its id, and its `root` (the server's model folder) if listed."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    response = httpx.get(base_url.rstrip("/") + "/v1/models", headers=headers, timeout=timeout_s)
    response.raise_for_status()
    models = response.json().get("data") or []
    if not models:
        raise RuntimeError(f"{base_url}/v1/models lists no models; pass --model")
    return models[0]["id"], models[0].get("root")


def split_samples(samples: Sequence[Sample], num_prompts: int, num_rates: int,
                  num_warmups: int) -> tuple[list[list[Sample]], list[Sample]]:
    """(one list of `num_prompts` samples per rate, the warm-ups), from `samples` in that order.

    A server with prefix caching answers a prompt it has already seen from its cache, so a warm-up
    or an earlier rate that sent the same prompt would make the measured TTFT a cache hit. Each rate
    and the warm-ups therefore get samples of their own (build `num_prompts * num_rates +
    num_warmups` of them); only a dataset too small for that is reused, cycling.
    """
    pick = lambda i: samples[i % len(samples)]  # noqa: E731
    per_rate = [[pick(r * num_prompts + i) for i in range(num_prompts)] for r in range(num_rates)]
    warm = [pick(num_rates * num_prompts + i) for i in range(num_warmups)]
    return per_rate, warm


def run_benchmark(config: ServeConfig, samples: Sequence[Sample], rates: Sequence[float],
                  percentiles: Sequence[float], slo: dict[str, float], num_prompts: int,
                  metadata: Optional[dict] = None) -> list[dict]:
    """One result dict per rate, each with vLLM's fields plus the run's settings; `samples` are
    split as `split_samples` says (distinct prompts per rate and for the warm-ups)."""
    per_rate, warmups = split_samples(samples, num_prompts, len(rates), config.num_warmups)
    # no prompt sent twice (a prefix-cache hit would flatter TTFT)
    distinct = len({id(s) for s in samples}) >= num_prompts * len(rates) + len(warmups)
    results = []
    for rate, samples in zip(rates, per_rate):
        records, duration, cpu = asyncio.run(run_once(config, samples, rate, warmups))
        sent_warmups, warmups = len(warmups), []  # the server is warm after the first rate
        result = {
            "date": datetime.now().strftime("%Y%m%d-%H%M%S"),
            "backend": "openai-chat" if config.is_chat else "openai",
            "endpoint": config.endpoint,
            "model_id": config.model,
            "num_prompts": len(samples),
            "request_rate": "inf" if math.isinf(rate) else rate,
            "burstiness": config.burstiness,
            "max_concurrency": config.max_concurrency,
            "num_warmups": sent_warmups,
            "distinct_prompts": distinct,
            "slo": dict(slo) or None,
            **(metadata or {}),
        }
        result.update(compute_metrics(records, duration, percentiles, slo or None))
        result["client_cpu_fraction"] = cpu / duration
        print(format_report(result, percentiles), flush=True)
        if result["client_cpu_fraction"] > 0.7:
            logger.warning("The benchmark client kept %.0f%% of a CPU core busy; its own delays are in "
                           "the latencies. Lower the load or run the client on a quieter machine.",
                           100 * result["client_cpu_fraction"])
        failures = [e for e in result["errors"] if e]
        if failures:
            logger.warning("%d requests failed; first error: %s", len(failures), failures[0])
        results.append(result)
    return results


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", default=None, help="server root (default http://HOST:PORT)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--endpoint", default="/v1/completions",
                        help=f"/v1/completions or {CHAT_ENDPOINT}")
    parser.add_argument("--model", default=None, help="model name to send (default: the first of /v1/models)")
    parser.add_argument("--api-key", default=None, help="bearer token (default: $OPENAI_API_KEY)")
    datasets.add_dataset_args(parser)
    parser.add_argument("--num-prompts", type=int, default=1000)
    parser.add_argument("--request-rate", default="inf",
                        help="requests per second, Poisson; 'inf' sends all at once; "
                             "comma-separated rates run one after another")
    parser.add_argument("--burstiness", type=float, default=1.0,
                        help="gamma shape of the gaps: 1 is Poisson, <1 burstier, >1 steadier")
    parser.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most")
    parser.add_argument("--num-warmups", type=int, default=0,
                        help="warm-up requests (prompts of their own) left out of the figures")
    eos = parser.add_mutually_exclusive_group()
    eos.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                     help="let requests stop at EOS (default: ignore_eos and min_tokens = output len)")
    eos.add_argument("--ignore-eos", dest="ignore_eos", action="store_true", default=True,
                     help="vLLM's flag; the default here")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--extra-body", default=None, help="JSON object merged into every request body")
    parser.add_argument("--percentiles", "--metric-percentiles", default="",
                        help="extra percentiles besides p90 and p99, e.g. 50,90,99,99.9")
    parser.add_argument("--slo", "--goodput", default="",
                        help="goodput SLOs in ms, e.g. ttft:200,tpot:50,e2el:5000")
    parser.add_argument("--result-json", default=None,
                        help="write the result here (a JSON list when several rates run)")
    parser.add_argument("--plot", default=None, help="write a PNG of latency CDFs (and rate sweeps) here")
    parser.add_argument("--label", default=None, help="free text stored in the result")
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--timeout", type=float, default=6 * 3600.0, help="per-request timeout, s")
    parser.add_argument("--disable-tqdm", action="store_true")


def _check_args(args: argparse.Namespace) -> None:
    datasets.check_dataset_args(args)
    for name in ("num_prompts", "max_concurrency"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.num_warmups < 0:
        raise ValueError(f"--num-warmups must be >= 0, got {args.num_warmups}")
    if args.burstiness <= 0:
        raise ValueError(f"--burstiness must be > 0, got {args.burstiness}")


def main(args: argparse.Namespace) -> list[dict]:
    _check_args(args)
    rates = parse_rates(args.request_rate)  # a bad value: a ValueError naming the flag
    percentiles = parse_percentiles(args.percentiles)
    slo = parse_slo(args.slo)
    try:
        extra_body = json.loads(args.extra_body) if args.extra_body else {}
    except json.JSONDecodeError as exc:
        raise ValueError(f"--extra-body {args.extra_body!r}: not JSON ({exc})") from None
    if not isinstance(extra_body, dict):
        raise ValueError(f"--extra-body must be a JSON object, got {args.extra_body!r}")
    base_url = args.base_url or f"http://{args.host}:{args.port}"
    api_key = args.api_key or os.environ.get("OPENAI_API_KEY")
    model, root = args.model, None
    if model is None or args.tokenizer is None:
        served, root = fetch_served_model(base_url, api_key)
        model = model or served
    # The server's own folder when it runs on this machine; else the name (a path, hub id or shape).
    tokenizer_id = args.tokenizer or (root if root and os.path.isdir(root) else model)
    tokenizer = datasets.load_tokenizer(tokenizer_id, args.trust_remote_code)
    # Distinct prompts for every rate and the warm-ups: none is answered from the prefix cache.
    samples = datasets.build_samples(args, tokenizer, args.num_prompts * len(rates) + args.num_warmups)
    logger.info("Dataset %s: %s", args.dataset, datasets.describe(samples))
    print(f"bench serve: {args.num_prompts} prompts x {len(rates)} rate(s) + {args.num_warmups} warm-ups, "
          f"{datasets.describe(samples)} -> {base_url}{args.endpoint}", flush=True)
    config = ServeConfig(base_url=base_url, model=model, endpoint=args.endpoint, api_key=api_key,
                         ignore_eos=args.ignore_eos, temperature=args.temperature, extra_body=extra_body,
                         max_concurrency=args.max_concurrency, num_warmups=args.num_warmups,
                         burstiness=args.burstiness, seed=args.seed, timeout_s=args.timeout,
                         disable_tqdm=args.disable_tqdm)
    metadata = {"tokenizer_id": tokenizer_id if tokenizer is not None else None,
                "dataset": args.dataset, "label": args.label}
    try:
        results = run_benchmark(config, samples, rates, percentiles, slo, args.num_prompts, metadata)
    except MissingUsageError as exc:
        raise SystemExit(f"bench serve: {exc}") from None
    if args.result_json:
        os.makedirs(os.path.dirname(os.path.abspath(args.result_json)), exist_ok=True)
        with open(args.result_json, "w") as f:
            json.dump(results[0] if len(results) == 1 else results, f, indent=2)
        print(f"Wrote {args.result_json}")
    if args.plot:
        from meshserve.bench.plots import plot_results
        plot_results(results, args.plot)
        print(f"Wrote {args.plot}")
    if all(r["completed"] == 0 for r in results):  # a table of zeros is not a result: exit status 1
        raise SystemExit("no request succeeded (the table's errors, and the log's warnings, say why)")
    return results


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def meshserve_command() -> list[str]:
    """How to call the `meshserve` CLI here: the installed script, else through this interpreter."""
    exe = shutil.which("meshserve")
    if exe:
        return [exe]
    return [sys.executable, "-m", "meshserve"]


class ServerProcess:
    """Runs a server command in its own process group until the block ends; ready when
    GET /v1/models answers 200. Output goes to `log_path`, whose tail is shown if it dies."""

    def __init__(self, command: Sequence[str], base_url: str, log_path: str,
                 startup_timeout_s: float = 1800.0) -> None:
        self.command, self.base_url, self.log_path = list(command), base_url, log_path
        self.startup_timeout_s = startup_timeout_s
        self.process: Optional[subprocess.Popen] = None

    def __enter__(self) -> "ServerProcess":
        os.makedirs(os.path.dirname(os.path.abspath(self.log_path)), exist_ok=True)
        log = open(self.log_path, "w")
        print(f"Starting server: {' '.join(self.command)} (log: {self.log_path})", flush=True)
        self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        log.close()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with code {self.process.returncode}; "
                                   f"last log lines:\n{self._log_tail()}")
            try:
                if httpx.get(self.base_url + "/v1/models", timeout=5.0, trust_env=False).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(2.0)
        raise TimeoutError(f"server not ready after {self.startup_timeout_s:.0f} s; "
                           f"last log lines:\n{self._log_tail()}")

    def _log_tail(self, num_lines: int = 30) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-num_lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        pgid = os.getpgid(self.process.pid)  # our own session, started above
        for sig, wait_s in ((signal.SIGINT, 30), (signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            os.killpg(pgid, sig)
            try:
                self.process.wait(wait_s)
                return
            except subprocess.TimeoutExpired:
                continue

    def __exit__(self, *exc) -> None:
        self.stop()


def run_against_server(args, model_path: str, run_bench):
    """Call `run_bench(args, base_url, model_path)` against `args.base_url`, or against a
    `meshserve serve MODEL --load-format dummy` started for the call (log in args.out/server.log).
    Used by the online scenario scripts in benchmarks/."""
    import shlex

    if args.base_url:
        return run_bench(args, args.base_url, model_path)
    port = args.port or free_port()
    command = meshserve_command() + ["serve", model_path, "--load-format", "dummy",
                                     "--host", "127.0.0.1", "--port", str(port)]
    command += shlex.split(args.server_args)
    base_url = f"http://127.0.0.1:{port}"
    with ServerProcess(command, base_url, os.path.join(args.out, "server.log"), args.startup_timeout):
        return run_bench(args, base_url, model_path)
