#!/usr/bin/env python
"""Scenario `online-8b`: Llama-3.1-8B shape (random weights), 467 in / 256 out, 500 requests at
Poisson rates 2, 8, 16, 32 and inf req/s; TTFT and ITL mean/p99 and output tok/s per rate, next to
TensorRT-LLM's own bf16 figures on one H200. Starts `meshserve serve` unless --base-url is given.
"""
import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernel_record  # noqa: E402

# TensorRT-LLM bf16, 1xH200 (docs/BENCHMARKS.md): rate -> (TTFT ms, ITL ms, output tok/s)
ANCHORS = {"2": (21.0, 6.0, None), "32": (44.0, 16.0, None), "inf": (None, None, 10121.0)}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/online_8b", help="folder for the JSON results, plot and server log")
    p.add_argument("--model", default="llama-3.1-8b", help="shape name or model folder")
    p.add_argument("--rates", default="2,8,16,32,inf")
    p.add_argument("--num-prompts", type=int, default=500)
    p.add_argument("--input-len", type=int, default=467)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--num-warmups", type=int, default=16)
    p.add_argument("--base-url", default=None, help="benchmark this running server instead of starting one")
    p.add_argument("--port", type=int, default=0, help="port for the started server (0: a free one)")
    p.add_argument("--server-args", default="", help="extra arguments for `meshserve serve`, one string")
    p.add_argument("--startup-timeout", type=float, default=1800.0)
    return p.parse_args()


def run_bench(args: argparse.Namespace, base_url: str, model_path: str) -> list:
    from meshserve.commands.bench import run

    result_json = os.path.join(args.out, "online_8b.json")
    run(["serve", "--base-url", base_url, "--tokenizer", model_path, "--dataset", "random",
         "--input-len", str(args.input_len), "--output-len", str(args.output_len),
         "--num-prompts", str(args.num_prompts), "--request-rate", args.rates,
         "--num-warmups", str(args.num_warmups), "--result-json", result_json,
         "--plot", os.path.join(args.out, "online_8b.png")])
    with open(result_json) as f:
        results = json.load(f)
    return (results if isinstance(results, list) else [results]), kernel_record.from_server(base_url)


def main() -> None:
    args = parse_args()
    from meshserve.bench.serve import run_against_server
    from meshserve.bench.shapes import resolve_model

    os.makedirs(args.out, exist_ok=True)
    model_path = resolve_model(args.model)
    results, kernel_config = run_against_server(args, model_path, run_bench)

    rows = []
    for r in results:
        rate = str(r["request_rate"]) if r["request_rate"] == "inf" else f"{float(r['request_rate']):g}"
        anchor = ANCHORS.get(rate, (None, None, None))
        rows.append({"rate": rate, "completed": r["completed"], "failed": r["failed"],
                     "mean_ttft_ms": r["mean_ttft_ms"], "p99_ttft_ms": r["p99_ttft_ms"],
                     "mean_itl_ms": r["mean_itl_ms"], "p99_itl_ms": r["p99_itl_ms"],
                     "output_throughput": r["output_throughput"],
                     "median_ttft_ms": r.get("median_ttft_ms"), "client_cpu_fraction": r.get("client_cpu_fraction"),
                     "trtllm_ttft_ms": anchor[0], "trtllm_itl_ms": anchor[1], "trtllm_tok_s": anchor[2]})
    summary = {"scenario": "online-8b", "model": args.model, "input_len": args.input_len,
               "output_len": args.output_len, "num_prompts": args.num_prompts, "rows": rows,
               "kernel_config": kernel_config}
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)

    def cell(value, fmt="{:.1f}"):
        return "-" if value is None else fmt.format(value)

    busy = [row["rate"] for row in rows if (row["client_cpu_fraction"] or 0) > 0.5]
    if busy:
        print(f"note: the client used over half a CPU core at rate(s) {', '.join(busy)}: its own delays "
              "are in those latencies")
    print(f"\nonline-8b: {args.model}, {args.input_len} in / {args.output_len} out, {args.num_prompts} requests")
    print(f"{'rate':>5} {'ok/fail':>8} {'TTFT mean':>10} {'TTFT p99':>9} {'ITL mean':>9} {'ITL p99':>8} "
          f"{'out tok/s':>10} {'client CPU':>10} | {'TRT TTFT':>8} {'TRT ITL':>7} {'TRT tok/s':>9}")
    for row in rows:
        print(f"{row['rate']:>5} {row['completed']:>4}/{row['failed']:<3} {cell(row['mean_ttft_ms']):>10} "
              f"{cell(row['p99_ttft_ms']):>9} {cell(row['mean_itl_ms']):>9} {cell(row['p99_itl_ms']):>8} "
              f"{cell(row['output_throughput'], '{:.0f}'):>10} {cell(row['client_cpu_fraction'], '{:.2f}'):>10} | {cell(row['trtllm_ttft_ms'], '{:.0f}'):>8} "
              f"{cell(row['trtllm_itl_ms'], '{:.0f}'):>7} {cell(row['trtllm_tok_s'], '{:.0f}'):>9}")


if __name__ == "__main__":
    main()
