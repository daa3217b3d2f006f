#!/usr/bin/env python
"""How long one long prompt holds back other requests' streams in the API server.

K streaming completions run (ignore_eos); once they stream, one long prompt (random words, max_tokens
1) is sent now and then. With the server's --max_seq_len below the prompt's length (as the .sh
does) the prompt is tokenized and then refused with a 400, so the engine does no work for it and
the gaps measure the API server alone. For the running streams it reports the gaps between
chunks: the median over the whole run, and the longest gap that overlaps a long prompt's request.
Run it against a server whose engine is cheap (benchmarks/api_tiny_model.py), e.g.:

    bash benchmarks/long_prompt_stall.sh   # starts that server, runs this with both settings

Prints a table; --out writes JSON.
"""
import argparse
import asyncio
import json
import random
import statistics
import time

import aiohttp


def words(n_chars: int, seed: int) -> str:
    rng = random.Random(seed)
    vocab = ["alpha", "river", "stone", "quiet", "seven", "lantern", "orbit", "maple", "copper", "drift",
             "harbor", "violet", "ember", "signal", "meadow", "pixel", "thunder", "glacier", "saffron", "echo"]
    out, size = [], 0
    while size < n_chars:
        w = rng.choice(vocab) + str(rng.randrange(100))
        out.append(w)
        size += len(w) + 1
    return " ".join(out)


async def stream(session, url, model, times: list, stop: asyncio.Event, max_tokens: int):
    body = {"model": model, "prompt": "Count: 1 2 3", "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
            "temperature": 0}
    async with session.post(url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for _ in r.content.iter_any():
            times.append(time.perf_counter())
            if stop.is_set():
                break


async def main_async(a):
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
        model = (await (await session.get(a.base_url + "/v1/models")).json())["data"][0]["id"]
        stop = asyncio.Event()
        times = [[] for _ in range(a.streams)]
        tasks = [asyncio.create_task(stream(session, a.base_url, model, t, stop, a.stream_tokens)) for t in times]
        while min(len(t) for t in times) < 20:
            for t in tasks:
                if t.done():
                    t.result()  # a stream that failed: raise its error
            await asyncio.sleep(0.05)
        windows = []
        for i in range(a.long_prompts):
            await asyncio.sleep(a.pause)
            body = {"model": model, "prompt": words(a.chars, i), "max_tokens": 1}
            t0 = time.perf_counter()
            async with session.post(a.base_url + "/v1/completions", json=body) as r:
                await r.read()
            windows.append((t0, time.perf_counter(), r.status))
        await asyncio.sleep(a.pause)
        stop.set()
        await asyncio.wait(tasks, timeout=10)
        for t in tasks:
            t.cancel()
    gaps = [(b - c, c, b) for t in times for c, b in zip(t, t[1:])]
    median_ms = statistics.median(g for g, _, _ in gaps) * 1e3
    worst = []
    for t0, t1, _ in windows:
        over = [g for g, c, b in gaps if c < t1 and b > t0]
        worst.append(max(over) * 1e3 if over else 0.0)
    res = dict(streams=a.streams, chars=a.chars, long_prompt_status=[w[2] for w in windows],
               long_prompt_ms=[(t1 - t0) * 1e3 for t0, t1, _ in windows], median_gap_ms=median_ms,
               worst_gap_during_long_prompt_ms=worst, label=a.label)
    print(f"{a.label or 'run'}: {a.streams} streams, long prompt {a.chars} chars (HTTP {windows[0][2]}): "
          f"median chunk gap {median_ms:.1f} ms; longest gap during each long prompt "
          f"{', '.join(f'{w:.0f}' for w in worst)} ms (their requests took "
          f"{', '.join(f'{x:.0f}' for x in res['long_prompt_ms'])} ms)")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=2)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--chars", type=int, default=120_000, help="characters of each long prompt")
    p.add_argument("--stream-tokens", type=int, default=3000, help="max_tokens of each running stream")
    p.add_argument("--long-prompts", type=int, default=5)
    p.add_argument("--pause", type=float, default=0.5, help="seconds between long prompts")
    p.add_argument("--label", default="")
    p.add_argument("--out")
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()
