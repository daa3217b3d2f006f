#!/usr/bin/env python
"""The server's own view of a benchmark run, from its Prometheus histograms (GET /metrics) scraped
before and after: mean TTFT from the request's arrival at the engine (after HTTP and tokenization),
mean queue time (arrival to first scheduled) and mean engine step. Used by prefill_8k.py and
profile_online.sh.

  server_stats.py scrape URL FILE.json
  server_stats.py report BEFORE.json AFTER.json RESULT.json OUT.json [PYSPY_RAW ...]
    RESULT.json: a `meshserve bench serve --result-json` file (the client's TTFT); PYSPY_RAW: py-spy
    `record -f raw` files, summarised (top frames by own and by inclusive samples).
"""
import collections
import json
import os
import sys
import urllib.request

SERVER_SERIES = ("meshserve_time_to_first_token_seconds", "meshserve_iteration_latency_seconds",
                 "meshserve_request_queue_time_seconds")


def scrape(base_url: str) -> dict:
    """{series_sum: value, series_count: value} for SERVER_SERIES, summed over label sets."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(base_url.rstrip("/") + "/metrics", timeout=30) as r:
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            for name in SERVER_SERIES:
                if s.name in (name + "_sum", name + "_count"):
                    out[s.name] = out.get(s.name, 0.0) + s.value
    return out


def server_breakdown(before: dict, after: dict) -> dict:
    """Means (ms) over what happened between two scrapes."""
    def mean(name):
        n = after.get(name + "_count", 0) - before.get(name + "_count", 0)
        return ((after.get(name + "_sum", 0) - before.get(name + "_sum", 0)) / n * 1000 if n else None), n
    ttft, requests = mean(SERVER_SERIES[0])
    step, steps = mean(SERVER_SERIES[1])
    queue, _ = mean(SERVER_SERIES[2])
    return {"server_mean_ttft_ms": ttft, "engine_mean_step_ms": step, "engine_steps": steps,
            "server_requests": requests, "mean_queue_ms": queue}


def pyspy_summary(path: str, top: int = 15) -> dict:
    """Top frames of a py-spy raw file (one `frame;frame;... count` line per distinct stack)."""
    own, inclusive, total = collections.Counter(), collections.Counter(), 0
    with open(path) as f:
        for line in f:
            stack, _, n = line.rstrip().rpartition(" ")
            if not stack or not n.isdigit():
                continue
            frames = stack.split(";")
            total += int(n)
            own[frames[-1]] += int(n)
            for fr in set(frames):
                inclusive[fr] += int(n)
    pct = lambda c: [(round(100.0 * v / total, 1), k) for k, v in c.most_common(top)] if total else []  # noqa: E731
    entry = ("main (", "<module> (", "run_engine_process (")  # every sample passes through these
    inc = collections.Counter({k: v for k, v in inclusive.items() if "meshserve/" in k and not k.startswith(entry)})
    return {"samples": total, "own": pct(own), "inclusive_meshserve": pct(inc)}


def report(before: str, after: str, result: str, out: str, pyspy: list) -> dict:
    with open(before) as f:
        b = json.load(f)
    with open(after) as f:
        a = json.load(f)
    with open(result) as f:
        res = json.load(f)
    res = res[0] if isinstance(res, list) else res
    srv = server_breakdown(b, a)
    client = res.get("mean_ttft_ms")
    rep = {"rate": res.get("request_rate"), "completed": res.get("completed"), "client_mean_ttft_ms": client,
           "client_mean_itl_ms": res.get("mean_itl_ms"), **srv,
           "outside_engine_ms": (client - srv["server_mean_ttft_ms"])
           if client is not None and srv["server_mean_ttft_ms"] is not None else None,
           "profiles": {os.path.basename(p): pyspy_summary(p) for p in pyspy if os.path.exists(p)}}
    with open(out, "w") as f:
        json.dump(rep, f, indent=2)
    fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    print(f"rate {rep['rate']}, {rep['completed']} requests: client TTFT {fmt(client)} ms = "
          f"{fmt(rep['outside_engine_ms'])} outside the engine (HTTP, tokenization, streaming) + "
          f"{fmt(srv['server_mean_ttft_ms'])} from engine arrival (queue {fmt(srv['mean_queue_ms'])}); "
          f"engine step {fmt(srv['engine_mean_step_ms'])} ms over {srv['engine_steps']:.0f} steps; "
          f"client ITL {fmt(rep['client_mean_itl_ms'])} ms")
    for name, prof in rep["profiles"].items():
        print(f"\n{name}: {prof['samples']} samples (busy ones; py-spy leaves out idle waits)")
        for p, frame in prof["own"][:10]:
            print(f"  own {p:5.1f}%  {frame[:120]}")
        for p, frame in prof["inclusive_meshserve"][:12]:
            print(f"  inc {p:5.1f}%  {frame[:120]}")
    return rep


def main(argv: list) -> None:
    if len(argv) == 3 and argv[0] == "scrape":
        with open(argv[2], "w") as f:
            json.dump(scrape(argv[1]), f)
    elif len(argv) >= 5 and argv[0] == "report":
        report(argv[1], argv[2], argv[3], argv[4], argv[5:])
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
