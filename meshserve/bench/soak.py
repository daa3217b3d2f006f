"""`meshserve bench soak`: hold N concurrent streams against a server for a while, cancel a share of
them at random points, and check that nothing was lost.

    meshserve bench soak --base-url http://127.0.0.1:8000 --concurrency 64 --duration 60 \
        --cancel-fraction 0.2 --result-json soak.json

Each stream is a greedy (temperature 0) streaming `/v1/completions` request for one of a fixed set of
prompts, each with its own max_tokens. Before the soak every prompt is sent once without streaming:
its "twin", the text a completed stream must equal (the cancelled ones must be a prefix of it). After
the duration no new stream starts, the open ones finish, and the server's /metrics must come back to
no running or waiting sequence and no KV block held, and its resident memory (API process + engine
process) must not have grown past --max-rss-growth-mb since the twins ran. The JSON has `completed`,
`cancelled`, `mismatched`, `errors`, `rss_before`, `rss_after` and the rest; the exit status is 1 when
anything was lost, mismatched, failed or leaked (0 otherwise).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import httpx

# Varied prompts (lengths, topics, formats); prompt i asks for 8 * (1 + i % 4) tokens
PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "def fibonacci(n):",
    "Once upon a time, in a small village at the edge of a forest, there lived",
    "List three uses of copper:",
    "Translate to French: The weather is nice today.",
    "Q: What is 17 times 23?\nA:",
    "The quick brown fox",
    "In 1969, the first humans",
    "Explain in one sentence why the sky is blue.",
    "SELECT name, age FROM users WHERE",
    "A recipe for pancakes:\n1.",
    "The three laws of thermodynamics are",
    "import numpy as np\nx = np.arange(10)\n",
    "Dear hiring manager,\n",
    "The most important thing about distributed systems is",
    "Roses are red,",
    "Summarize: Large language models generate text one token at a time, each conditioned on the ones before.",
    "Here is a list of prime numbers: 2, 3, 5, 7,",
    "The mitochondria is",
    "To be, or not to be,",
    "HTTP status code 404 means",
    "The first rule of writing tests is",
    "Once the server started, it",
]


def max_tokens_of(i: int) -> int:
    return 8 * (1 + i % 4)


@dataclass
class SoakResult:
    base_url: str
    model: str
    concurrency: int
    duration_s: float
    cancel_fraction: float
    started: int = 0
    completed: int = 0
    cancelled: int = 0
    mismatched: int = 0
    errors: int = 0
    tokens: int = 0
    rss_before: int = 0
    rss_after: int = 0
    rss_growth_bound: int = 0
    running_after: Optional[float] = None
    waiting_after: Optional[float] = None
    kv_used_blocks_after: Optional[float] = None
    settled_s: Optional[float] = None
    elapsed_s: float = 0.0
    samples: list = field(default_factory=list)  # the first few errors and mismatches, one line each
    ok: bool = False


def _metric(text: str, name: str) -> Optional[float]:
    """The sum of a metric's samples in Prometheus text (None when absent)."""
    total, seen = 0.0, False
    for line in text.splitlines():
        if line.startswith(name) and (line[len(name)] in " {"):
            total += float(line.rsplit(" ", 1)[1])
            seen = True
    return total if seen else None


class Soak:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        self.client = httpx.AsyncClient(base_url=args.base_url.rstrip("/"), headers=headers,
                                        timeout=httpx.Timeout(args.request_timeout))
        self.rng = random.Random(args.seed)
        self.twins: dict[int, tuple[str, Optional[str]]] = {}
        self.model = args.model
        self.result = SoakResult(args.base_url, args.model or "", args.concurrency, args.duration,
                                 args.cancel_fraction, rss_growth_bound=int(args.max_rss_growth_mb * 2**20))

    def _note(self, line: str) -> None:
        if len(self.result.samples) < 10:
            self.result.samples.append(line[:300])

    def _body(self, i: int, stream: bool) -> dict:
        return {"model": self.model, "prompt": PROMPTS[i], "max_tokens": max_tokens_of(i), "temperature": 0,
                "stream": stream}

    async def metrics(self) -> str:
        r = await self.client.get("/metrics")
        r.raise_for_status()
        return r.text

    async def rss(self) -> int:
        text = await self.metrics()
        return int((_metric(text, "process_resident_memory_bytes") or 0)
                   + (_metric(text, "meshserve_engine_resident_memory_bytes") or 0))

    async def twin(self, i: int) -> None:
        r = await self.client.post("/v1/completions", json=self._body(i, False))
        r.raise_for_status()
        choice = r.json()["choices"][0]
        self.twins[i] = (choice["text"], choice.get("finish_reason"))

    async def one_stream(self) -> None:
        res = self.result
        i = self.rng.randrange(len(PROMPTS))
        cancel_after = None
        if self.rng.random() < self.args.cancel_fraction:
            cancel_after = self.rng.randint(1, max(1, max_tokens_of(i) - 1))  # chunks to read, then hang up
        res.started += 1
        text, finish, chunks = [], None, 0
        try:
            async with self.client.stream("POST", "/v1/completions", json=self._body(i, True)) as r:
                if r.status_code != 200:
                    body = (await r.aread()).decode(errors="replace")
                    res.errors += 1
                    self._note(f"HTTP {r.status_code}: {body}")
                    return
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[len("data: "):]
                    if data == "[DONE]":
                        break
                    event = json.loads(data)
                    if "error" in event:
                        res.errors += 1
                        self._note(f"stream error: {event['error']}")
                        return
                    for choice in event.get("choices") or ():
                        text.append(choice.get("text") or "")
                        finish = choice.get("finish_reason") or finish
                    chunks += 1
                    if cancel_after is not None and chunks >= cancel_after and finish is None:
                        break  # leaving the block closes the connection: the server must abort the request
        except (httpx.HTTPError, json.JSONDecodeError) as e:
            res.errors += 1
            self._note(f"{type(e).__name__}: {e}")
            return
        got = "".join(text)
        want, want_finish = self.twins[i]
        if cancel_after is not None and finish is None:
            res.cancelled += 1
            if not want.startswith(got):
                res.mismatched += 1
                self._note(f"cancelled stream of prompt {i}: {got!r} is not a prefix of {want!r}")
            return
        res.completed += 1
        res.tokens += chunks
        if got != want or finish != want_finish:
            res.mismatched += 1
            self._note(f"prompt {i}: stream {got!r} ({finish}) != non-streamed {want!r} ({want_finish})")

    async def worker(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            await self.one_stream()

    async def settle(self) -> None:
        """Wait until the server holds no sequence and no KV block (or the settle timeout)."""
        res = self.result
        t0 = time.monotonic()
        while True:
            text = await self.metrics()
            res.running_after = _metric(text, "meshserve_num_requests_running")
            res.waiting_after = _metric(text, "meshserve_num_requests_waiting")
            res.kv_used_blocks_after = _metric(text, "meshserve_kv_cache_used_blocks")
            if not any((res.running_after, res.waiting_after, res.kv_used_blocks_after)):
                res.settled_s = time.monotonic() - t0
                return
            if time.monotonic() - t0 > self.args.settle_timeout:
                self._note(f"not settled after {self.args.settle_timeout} s: running {res.running_after}, "
                           f"waiting {res.waiting_after}, KV blocks held {res.kv_used_blocks_after}")
                return
            await asyncio.sleep(0.25)

    async def run(self) -> SoakResult:
        res = self.result
        t0 = time.monotonic()
        try:
            if self.model is None:
                r = await self.client.get("/v1/models")
                r.raise_for_status()
                self.model = res.model = r.json()["data"][0]["id"]
            sem = asyncio.Semaphore(self.args.concurrency)

            async def bounded(i):
                async with sem:
                    await self.twin(i)
            await asyncio.gather(*(bounded(i) for i in range(len(PROMPTS))))
            res.rss_before = await self.rss()
            deadline = time.monotonic() + self.args.duration
            await asyncio.gather(*(self.worker(deadline) for _ in range(self.args.concurrency)))
            await self.settle()
            res.rss_after = await self.rss()
        except httpx.HTTPError as e:
            res.errors += 1
            self._note(f"{type(e).__name__}: {e}")
        finally:
            await self.client.aclose()
        res.elapsed_s = time.monotonic() - t0
        res.ok = (res.errors == 0 and res.mismatched == 0 and res.completed > 0 and res.settled_s is not None
                  and res.rss_after - res.rss_before <= res.rss_growth_bound)
        return res


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", default=None, help="the server, e.g. http://127.0.0.1:8000 (required)")
    parser.add_argument("--model", default=None, help="served model name (default: the first of /v1/models)")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--concurrency", type=int, default=64, help="streams open at once (default 64)")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of new streams (default 60)")
    parser.add_argument("--cancel-fraction", type=float, default=0.2,
                        help="share of streams cancelled at a random point (default 0.2)")
    parser.add_argument("--max-rss-growth-mb", type=float, default=512.0,
                        help="resident memory the server may gain over the soak (default 512)")
    parser.add_argument("--settle-timeout", type=float, default=30.0,
                        help="seconds for the server to drop every sequence and KV block afterwards (default 30)")
    parser.add_argument("--request-timeout", type=float, default=300.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--result-json", default=None)


def main(args: argparse.Namespace) -> int:
    if not args.base_url:
        raise ValueError("--base-url is required: the server to soak, e.g. http://127.0.0.1:8000")
    for name, low in (("concurrency", 1), ("duration", 0), ("max_rss_growth_mb", 0), ("settle_timeout", 0)):
        if getattr(args, name) < low:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)}: must be >= {low}")
    if not 0.0 <= args.cancel_fraction <= 1.0:
        raise ValueError(f"--cancel-fraction={args.cancel_fraction}: must be between 0 and 1")
    res = asyncio.run(Soak(args).run())
    growth = (res.rss_after - res.rss_before) / 2**20
    print(f"soak: {res.started} streams in {res.elapsed_s:.0f} s at concurrency {res.concurrency}: "
          f"{res.completed} completed, {res.cancelled} cancelled, {res.mismatched} mismatched, {res.errors} errors; "
          f"after: running {res.running_after}, waiting {res.waiting_after}, KV blocks held "
          f"{res.kv_used_blocks_after}; RSS {res.rss_before / 2**20:.0f} -> {res.rss_after / 2**20:.0f} MiB "
          f"({growth:+.0f}, bound {res.rss_growth_bound / 2**20:.0f}): {'OK' if res.ok else 'FAILED'}", flush=True)
    for line in res.samples:
        print(f"  {line}")
    if args.result_json:
        with open(args.result_json, "w") as f:
            json.dump(asdict(res), f, indent=2)
    return 0 if res.ok else 1


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cli_args(p)
    sys.exit(main(p.parse_args()))
