#!/usr/bin/env python
"""Scenario `offline-8b`: Llama-3.1-8B shape (random weights), 1000 in / 1000 out fixed, 3,000
requests through the offline API: output tok/s against the bf16 floor (~13.5k tok/s on one H200)
and TensorRT-LLM's 17.7k tok/s in fp8.
"""
import argparse
import json
import os
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernel_record  # noqa: E402

FLOOR_TOK_S = 13500.0  # bf16, 1xH200 (docs/BENCHMARKS.md)
TRTLLM_FP8_TOK_S = 17700.0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/offline_8b", help="folder for the JSON results")
    p.add_argument("--model", default="llama-3.1-8b", help="shape name or model folder")
    p.add_argument("--num-requests", type=int, default=3000)
    p.add_argument("--input-len", type=int, default=1000)
    p.add_argument("--output-len", type=int, default=1000)
    p.add_argument("--tp-size", type=int, default=1)
    p.add_argument("--max-batch-size", type=int, default=None)
    p.add_argument("--max-num-tokens", type=int, default=None)
    p.add_argument("--bench-args", default="", help="extra arguments for `meshserve bench throughput`")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    from meshserve.commands.bench import run

    os.makedirs(args.out, exist_ok=True)
    result_json = os.path.join(args.out, "offline_8b.json")
    argv = ["throughput", args.model, "--load-format", "dummy", "--dataset", "random",
            "--input-len", str(args.input_len), "--output-len", str(args.output_len),
            "--num-requests", str(args.num_requests), "--tp-size", str(args.tp_size),
            "--result-json", result_json]
    if args.max_batch_size:
        argv += ["--max-batch-size", str(args.max_batch_size)]
    if args.max_num_tokens:
        argv += ["--max-num-tokens", str(args.max_num_tokens)]
    run(argv + shlex.split(args.bench_args))
    with open(result_json) as f:
        result = json.load(f)
    out_tok_s = result["output_throughput"]
    summary = {"scenario": "offline-8b", "model": args.model, "num_requests": result["num_requests"],
               "elapsed_time": result["elapsed_time"], "output_throughput": out_tok_s,
               "total_token_throughput": result["tokens_per_second"], "floor_tok_s": FLOOR_TOK_S,
               "fraction_of_floor": out_tok_s / FLOOR_TOK_S, "trtllm_fp8_tok_s": TRTLLM_FP8_TOK_S,
               "kernel_config": kernel_record.local()}
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"\noffline-8b: {args.model}, {args.input_len} in / {args.output_len} out, "
          f"{result['num_requests']} requests, tp {args.tp_size}")
    print(f"{'elapsed s':>10} {'out tok/s':>10} {'total tok/s':>12} {'of floor':>9} | {'floor':>7} {'TRT fp8':>8}")
    print(f"{result['elapsed_time']:>10.1f} {out_tok_s:>10.0f} {result['tokens_per_second']:>12.0f} "
          f"{out_tok_s / FLOOR_TOK_S:>9.0%} | {FLOOR_TOK_S:>7.0f} {TRTLLM_FP8_TOK_S:>8.0f}")


if __name__ == "__main__":
    main()
