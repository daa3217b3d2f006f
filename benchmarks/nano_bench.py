#!/usr/bin/env python
"""Scenario `nano-bench` (nano-vllm's benchmark): Qwen3-0.6B shape (random weights), 256 sequences,
input and output lengths each uniform in 100..1024 with seed 0, through the offline API: output
tok/s against the ~34k tok/s floor. (Lengths come from numpy's generator, not nano-vllm's
`random.randint`, so the exact token totals differ slightly from nano-vllm's run.)
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

FLOOR_TOK_S = 34000.0  # 1xH200 (docs/BENCHMARKS.md)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/nano_bench", help="folder for the JSON results")
    p.add_argument("--model", default="qwen3-0.6b", help="shape name or model folder")
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--min-len", type=int, default=100)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bench-args", default="", help="extra arguments for `meshserve bench throughput`")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    from meshserve.commands.bench import run

    os.makedirs(args.out, exist_ok=True)
    result_json = os.path.join(args.out, "nano_bench.json")
    # [min, max] as center * (1 -/+ ratio): 100..1024 is 562 -/+ 462.
    center = (args.min_len + args.max_len) / 2
    ratio = (args.max_len - args.min_len) / (args.max_len + args.min_len)
    run(["throughput", args.model, "--load-format", "dummy", "--dataset", "random",
         "--input-len", str(round(center)), "--output-len", str(round(center)), "--range-ratio", repr(ratio),
         "--num-requests", str(args.num_requests), "--seed", str(args.seed), "--result-json", result_json]
        + shlex.split(args.bench_args))
    with open(result_json) as f:
        result = json.load(f)
    out_tok_s = result["output_throughput"]
    summary = {"scenario": "nano-bench", "model": args.model, "num_requests": result["num_requests"],
               "total_output_tokens": result["total_output_tokens"], "elapsed_time": result["elapsed_time"],
               "output_throughput": out_tok_s, "floor_tok_s": FLOOR_TOK_S,
               "fraction_of_floor": out_tok_s / FLOOR_TOK_S, "kernel_config": kernel_record.local()}
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"\nnano-bench: {args.model}, {result['num_requests']} sequences, lengths {args.min_len}-{args.max_len}")
    print(f"{'elapsed s':>10} {'out tokens':>11} {'out tok/s':>10} {'of floor':>9} | {'floor':>7}")
    print(f"{result['elapsed_time']:>10.2f} {result['total_output_tokens']:>11} {out_tok_s:>10.0f} "
          f"{out_tok_s / FLOOR_TOK_S:>9.0%} | {FLOOR_TOK_S:>7.0f}")


if __name__ == "__main__":
    main()
