#!/usr/bin/env python
"""Pipeline micro-batches against one batch in flight, on CPU ranks (gloo) or GPUs.

A Llama-shaped model with random weights is split over `--pp` stages; `--num-requests`
(>= 2 x pp) concurrent requests generate `--output-len` tokens each with ignore_eos. The same
engine runs twice: `pipeline_micro_batches=pp` (the default: every stage works on its own
micro-batch) and `pipeline_micro_batches=1` (one batch walks the stages while the others idle).
Prints a table last and writes JSON; the ratio is the point, absolute CPU numbers are not.

    .venv/bin/python benchmarks/pp_microbatch.py --pp 2 --out out/pp_microbatch
"""
import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernel_record  # noqa: E402


def write_config(path: str, hidden: int, layers: int, vocab: int) -> None:
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
           "intermediate_size": hidden * 3, "num_hidden_layers": layers, "num_attention_heads": hidden // 64,
           "num_key_value_heads": max(1, hidden // 256), "vocab_size": vocab, "max_position_embeddings": 4096,
           "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "torch_dtype": "float32", "eos_token_id": 2}
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)


def run(model: str, args, micro_batches: int) -> dict:
    from meshserve import LLM, SamplingParams

    prompts = [[(7 * i + j) % 1000 + 3 for j in range(args.input_len)] for i in range(args.num_requests)]
    sp = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
    with LLM(model, load_format="dummy", skip_tokenizer_init=True, pipeline_parallel_size=args.pp,
             pipeline_micro_batches=micro_batches, show_progress=False,
             kv_cache_config={"max_tokens": 4 * args.num_requests * (args.input_len + args.output_len)}) as llm:
        llm.generate(prompts[:2], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)  # warm-up
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            outs = llm.generate(prompts, sp, use_tqdm=False)
            times.append(time.perf_counter() - t0)
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        busy = llm.get_stats()["pipeline_stage_busy_fraction"]
        kernel_config = kernel_record.from_llm(llm)
    best = min(times)
    return {"micro_batches": micro_batches, "seconds": times, "output_tokens": tokens,
            "output_tok_s": tokens / best, "stage_busy_fraction_last_window": busy, "kernel_config": kernel_config}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--num-requests", type=int, default=16)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="out/pp_microbatch")
    args = p.parse_args()
    if args.num_requests < 2 * args.pp:
        p.error(f"--num-requests={args.num_requests} must be at least 2 x pp = {2 * args.pp}")
    model = tempfile.mkdtemp(prefix="pp-bench-")
    write_config(model, args.hidden, args.layers, args.vocab)
    results = [run(model, args, args.pp), run(model, args, 1)]
    ratio = results[0]["output_tok_s"] / results[1]["output_tok_s"]
    os.makedirs(args.out, exist_ok=True)
    summary = {"scenario": "pp-microbatch", "pp": args.pp, "hidden": args.hidden, "layers": args.layers,
               "num_requests": args.num_requests, "input_len": args.input_len, "output_len": args.output_len,
               "results": results, "ratio_micro_batches_over_one": ratio}
    with open(os.path.join(args.out, "pp_microbatch.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"\npp={args.pp}, {args.num_requests} requests x {args.input_len} in / {args.output_len} out, "
          f"hidden {args.hidden}, {args.layers} layers")
    print(f"{'batches in flight':>18} | {'output tok/s':>12} | {'best s':>7}")
    for r in results:
        print(f"{r['micro_batches']:>18} | {r['output_tok_s']:>12.1f} | {min(r['seconds']):>7.2f}")
    print(f"ratio (micro-batches / one batch): {ratio:.2f}x")


if __name__ == "__main__":
    main()
