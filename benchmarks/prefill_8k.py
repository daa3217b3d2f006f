#!/usr/bin/env python
"""Scenario `prefill-8k`: Llama-3.1-8B shape (random weights), 8192 prompt tokens, 1 output token,
one request at a time: TTFT against the compute floor (2 x parameters x tokens FLOPs at 790 TFLOP/s,
about 167 ms). Starts `meshserve serve` unless --base-url is given; the server must accept 8193
tokens per sequence (its default is the model's 131072; else pass --server-args "--max-seq-len 16384").
"""
import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernel_record  # noqa: E402
from server_stats import scrape, server_breakdown  # noqa: E402

PEAK_FLOPS = 790e12  # H200 bf16 dense (docs/BENCHMARKS.md)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/prefill_8k", help="folder for the JSON results and server log")
    p.add_argument("--model", default="llama-3.1-8b", help="shape name or model folder")
    p.add_argument("--num-prompts", type=int, default=10)
    p.add_argument("--input-len", type=int, default=8192)
    p.add_argument("--num-warmups", type=int, default=2)
    p.add_argument("--base-url", default=None, help="benchmark this running server instead of starting one")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--server-args", default="", help="extra arguments for `meshserve serve`, one string")
    p.add_argument("--startup-timeout", type=float, default=1800.0)
    return p.parse_args()


def run_bench(args: argparse.Namespace, base_url: str, model_path: str) -> dict:
    from meshserve.commands.bench import run

    result_json = os.path.join(args.out, "prefill_8k.json")
    before = scrape(base_url)
    run(["serve", "--base-url", base_url, "--tokenizer", model_path, "--dataset", "random",
         "--input-len", str(args.input_len), "--output-len", "1", "--num-prompts", str(args.num_prompts),
         "--request-rate", "inf", "--max-concurrency", "1", "--num-warmups", str(args.num_warmups),
         "--percentiles", "50", "--result-json", result_json])
    with open(result_json) as f:
        result = json.load(f)
    result["server"] = server_breakdown(before, scrape(base_url))  # warm-ups included
    result["kernel_config"] = kernel_record.from_server(base_url)
    return result


def main() -> None:
    args = parse_args()
    from meshserve.bench.serve import run_against_server
    from meshserve.bench.shapes import resolve_model, weight_bytes

    os.makedirs(args.out, exist_ok=True)
    model_path = resolve_model(args.model)
    with open(os.path.join(model_path, "config.json")) as f:
        config = json.load(f)
    result = run_against_server(args, model_path, run_bench)

    num_params = weight_bytes(config) // 2
    flops = 2 * num_params * args.input_len  # the matmuls; causal attention adds ~13% at 8k
    floor_ms = flops / PEAK_FLOPS * 1000
    ttft = result["median_ttft_ms"]
    summary = {"scenario": "prefill-8k", "model": args.model, "input_len": args.input_len,
               "completed": result["completed"], "failed": result["failed"],
               "mean_ttft_ms": result["mean_ttft_ms"], "median_ttft_ms": ttft,
               "p99_ttft_ms": result["p99_ttft_ms"], "std_ttft_ms": result["std_ttft_ms"],
               "server": result.get("server"), "kernel_config": result["kernel_config"], "flops": flops,
               "floor_ms": floor_ms,
               "achieved_tflops": flops / (ttft / 1000) / 1e12 if ttft else 0.0}
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"\nprefill-8k: {args.model}, {args.input_len} in / 1 out, concurrency 1, "
          f"{result['completed']} ok / {result['failed']} failed")
    print(f"{'TTFT median':>12} {'mean':>8} {'p99':>8} {'std':>6} {'TFLOP/s':>8} {'floor ms':>9} {'x floor':>8}")
    print(f"{ttft:>12.1f} {result['mean_ttft_ms']:>8.1f} {result['p99_ttft_ms']:>8.1f} "
          f"{result['std_ttft_ms']:>6.1f} {summary['achieved_tflops']:>8.0f} {floor_ms:>9.1f} "
          f"{ttft / floor_ms if floor_ms else 0:>8.2f}")
    srv = result.get("server") or {}
    if srv.get("server_mean_ttft_ms") is not None:
        # The client's TTFT = HTTP + tokenization + the server's TTFT; the server's = queue and
        # scheduling + the engine steps of the prefill + sending the token back.
        print(f"server side (warm-ups included, {srv['server_requests']:.0f} requests): TTFT from engine arrival "
              f"{srv['server_mean_ttft_ms']:.1f} ms, {srv['engine_steps'] / max(1, srv['server_requests']):.1f} "
              f"steps/request of {srv['engine_mean_step_ms']:.1f} ms, queue {srv['mean_queue_ms'] or 0:.1f} ms")


if __name__ == "__main__":
    main()
