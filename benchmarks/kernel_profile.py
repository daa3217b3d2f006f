#!/usr/bin/env python
"""Which kernels a scenario's GPU time goes to (torch.profiler, CUDA activity), for one engine:
an 8k-token prefill and a stretch of batch-1 decode on the 8B shape by default. Prints, per case,
wall time, summed kernel time and the top kernels; writes the tables as JSON.

  python benchmarks/kernel_profile.py --model llama-3.1-8b --out out/kernel_profile
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import kernel_record  # noqa: E402
import torch  # noqa: E402


def profile_case(llm, prompts, params, top: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    llm.generate(prompts, params, use_tqdm=False)  # warm: compiles, graphs, allocator
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        llm.generate(prompts, params, use_tqdm=False)
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t > 0 and e.device_type == torch.autograd.DeviceType.CUDA:
            rows.append({"kernel": e.key[:90], "calls": e.count, "total_us": t})
    rows.sort(key=lambda r: -r["total_us"])
    total = sum(r["total_us"] for r in rows)
    return {"wall_s": wall, "kernel_us": total, "top": rows[:top]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-3.1-8b")
    p.add_argument("--out", default="out/kernel_profile")
    p.add_argument("--prefill-len", default="8192", help="comma-separated prompt lengths, one case each")
    p.add_argument("--decode-steps", type=int, default=64)
    p.add_argument("--top", type=int, default=18)
    args = p.parse_args()
    from meshserve import LLM, SamplingParams
    from meshserve.bench.shapes import resolve_model

    os.makedirs(args.out, exist_ok=True)
    lens = [int(n) for n in args.prefill_len.split(",")]
    llm = LLM(resolve_model(args.model), load_format="dummy", dtype="bfloat16", show_progress=False,
              max_num_tokens=max([8192] + lens), kv_cache_config={"enable_block_reuse": False})
    vocab = llm._core.limits.vocab_size
    cases = {
        **{f"prefill {n}": ([[(j * 7) % (vocab - 10) + 5 for j in range(n)]],
                            SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)) for n in lens},
        f"decode b1 x{args.decode_steps}": ([[(j * 13) % (vocab - 10) + 5 for j in range(128)]],
                                            SamplingParams(max_tokens=args.decode_steps + 1, temperature=0,
                                                           ignore_eos=True)),
    }
    report = {"kernel_config": kernel_record.from_llm(llm)}
    for name, (prompts, params) in cases.items():
        r = profile_case(llm, prompts, params, args.top)
        report[name] = r
        print(f"\n== {name}: wall {r['wall_s'] * 1000:.1f} ms, kernels {r['kernel_us'] / 1000:.1f} ms")
        print(f"{'kernel':<90} {'calls':>6} {'ms':>8} {'%':>5}")
        for row in r["top"]:
            print(f"{row['kernel']:<90} {row['calls']:>6} {row['total_us'] / 1000:>8.2f} "
                  f"{100 * row['total_us'] / r['kernel_us']:>5.1f}")
    with open(os.path.join(args.out, "kernel_profile.json"), "w") as f:
        json.dump(report, f, indent=1)
    llm.shutdown()


if __name__ == "__main__":
    main()
