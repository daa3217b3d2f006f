#!/usr/bin/env python
"""Scenario `decode-latency`: Llama-3.1-8B shape (random weights), 128 in / 512 out, one request at
a time: ms per output token and the memory bandwidth it implies, against the bandwidth floor
(weights + KV cache read once per step at 4.3 TB/s). Starts `meshserve serve` unless --base-url.
"""
import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernel_record  # noqa: E402

PEAK_BANDWIDTH = 4.3e12  # H200 device-to-device copy, bytes/s (docs/BENCHMARKS.md)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/decode_latency", help="folder for the JSON results and server log")
    p.add_argument("--model", default="llama-3.1-8b", help="shape name or model folder")
    p.add_argument("--num-prompts", type=int, default=10)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=512)
    p.add_argument("--num-warmups", type=int, default=2)
    p.add_argument("--base-url", default=None, help="benchmark this running server instead of starting one")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--server-args", default="", help="extra arguments for `meshserve serve`, one string")
    p.add_argument("--startup-timeout", type=float, default=1800.0)
    p.add_argument("--quantization", default=None,
                   help="fp8: the server quantises the linears at load; the floor counts them at one byte")
    args = p.parse_args()
    if args.quantization:
        args.server_args = f"{args.server_args} --quantization {args.quantization}".strip()
    return args


def run_bench(args: argparse.Namespace, base_url: str, model_path: str) -> dict:
    from meshserve.commands.bench import run

    result_json = os.path.join(args.out, "decode_latency.json")
    run(["serve", "--base-url", base_url, "--tokenizer", model_path, "--dataset", "random",
         "--input-len", str(args.input_len), "--output-len", str(args.output_len),
         "--num-prompts", str(args.num_prompts), "--request-rate", "inf", "--max-concurrency", "1",
         "--num-warmups", str(args.num_warmups), "--percentiles", "50", "--result-json", result_json,
         "--plot", os.path.join(args.out, "decode_latency.png")])
    with open(result_json) as f:
        result = json.load(f)
    result["kernel_config"] = kernel_record.from_server(base_url)
    return result


def main() -> None:
    args = parse_args()
    from meshserve.bench.serve import run_against_server
    from meshserve.bench.shapes import decode_weight_bytes, kv_bytes_per_token, resolve_model

    os.makedirs(args.out, exist_ok=True)
    model_path = resolve_model(args.model)
    with open(os.path.join(model_path, "config.json")) as f:
        config = json.load(f)
    result = run_against_server(args, model_path, run_bench)

    # Each decode step reads the weights once and the KV cache of the context so far.
    mean_context = args.input_len + args.output_len / 2
    weights = decode_weight_bytes(config)
    if args.quantization == "fp8":  # the decoder layers' linears at one byte; the LM head stays bf16
        lm_head = config["vocab_size"] * config["hidden_size"] * 2
        weights = lm_head + (weights - lm_head) // 2
    step_bytes = weights + mean_context * kv_bytes_per_token(config)
    floor_ms = step_bytes / PEAK_BANDWIDTH * 1000
    tpot_ms = result["mean_tpot_ms"]
    achieved = step_bytes / (tpot_ms / 1000) if tpot_ms else 0.0
    summary = {"scenario": "decode-latency", "model": args.model, "quantization": args.quantization,
               "input_len": args.input_len,
               "output_len": args.output_len, "completed": result["completed"], "failed": result["failed"],
               "mean_tpot_ms": tpot_ms, "median_tpot_ms": result["median_tpot_ms"],
               "p99_itl_ms": result["p99_itl_ms"], "mean_ttft_ms": result["mean_ttft_ms"],
               "tok_per_s": 1000 / tpot_ms if tpot_ms else 0.0, "bytes_per_step": step_bytes,
               "achieved_gb_per_s": achieved / 1e9, "floor_ms": floor_ms,
               "fraction_of_bandwidth": achieved / PEAK_BANDWIDTH, "kernel_config": result["kernel_config"]}
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"\ndecode-latency: {args.model}, {args.input_len} in / {args.output_len} out, concurrency 1, "
          f"{result['completed']} ok / {result['failed']} failed")
    print(f"{'ms/token (mean)':>16} {'median':>7} {'ITL p99':>8} {'tok/s':>7} {'GB/s':>7} {'of 4.3TB/s':>10} "
          f"{'floor ms':>9}")
    print(f"{tpot_ms:>16.2f} {result['median_tpot_ms']:>7.2f} {result['p99_itl_ms']:>8.2f} "
          f"{summary['tok_per_s']:>7.1f} {achieved / 1e9:>7.0f} {summary['fraction_of_bandwidth']:>10.0%} "
          f"{floor_ms:>9.2f}")
    print("anchors: gpt-fast 69% of A100 bandwidth; SGLang 158 tok/s on H100 (~71%)")


if __name__ == "__main__":
    main()
