#!/usr/bin/env python
"""The MoE expert kernels alone at Qwen3-30B-A3B's shape (H 2048, I 768, 128 experts, top-8, bf16):
TRITON (kernels/moe.py) and CUTLASS (torch._grouped_mm) per token count, timed as CUDA-graph
replays, with the bytes of the distinct experts touched (uniform random routing) against 4.3 TB/s.
Then a torch.profiler table of decode steps of the model at batch 1 (CUDA graphs on), cut to
--layers layers, so the time per layer splits into kernels.

    python benchmarks/moe_kernel.py --out $OUT/moe_kernel
"""
import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def bench_kernels(rows):
    from meshserve.layers.moe.experts import create_experts
    H, I, E, K = 2048, 768, 128, 8
    g = torch.Generator(device="cuda").manual_seed(0)
    w13 = torch.randn(E, 2 * I, H, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
    w2 = torch.randn(E, H, I, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
    for T in (1, 8, 64, 256, 1024, 4096):
        x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16, generator=g)
        ids = torch.stack([torch.randperm(E, device="cuda", generator=g)[:K] for _ in range(T)])
        w = torch.rand(T, K, device="cuda", generator=g)
        touched = ids.unique().numel()
        floor_us = touched * 3 * H * I * 2 / 4.3e12 * 1e6
        for name in ("TRITON", "CUTLASS"):
            ex = create_experts(name, torch.device("cuda"), torch.bfloat16)
            for _ in range(3):
                ex.apply(x, w13, w2, w, ids)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                ex.apply(x, w13, w2, w, ids)
            for _ in range(5):
                graph.replay()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            n = 50
            start.record()
            for _ in range(n):
                graph.replay()
            end.record()
            torch.cuda.synchronize()
            us = start.elapsed_time(end) / n * 1000
            rows.append({"kernel": name, "tokens": T, "us": us, "floor_us": floor_us, "experts_touched": touched})
            print(f"{name:>8} T={T:>5}: {us:8.1f} us  floor {floor_us:7.1f} us  ratio {us / floor_us:5.2f}", flush=True)
            del graph


def profile_model(a):
    from meshserve import LLM, SamplingParams
    from meshserve.models import shapes
    s = copy.deepcopy(shapes.SHAPES[a.model])
    s.config["num_hidden_layers"] = a.layers
    shapes.SHAPES["moe-profile"] = s
    llm = LLM("moe-profile", load_format="dummy", max_batch_size=64, max_seq_len=1024, show_progress=False)
    sp = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    prompt = [{"prompt_token_ids": list(range(100, 228))}]
    llm.generate(prompt, sp, use_tqdm=False)
    t = time.perf_counter()
    llm.generate(prompt, sp, use_tqdm=False)
    print(f"{a.layers} layers, batch 1: {(time.perf_counter() - t) / 64 * 1000:.2f} ms/step (incl. prefill)")
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        llm.generate(prompt, sp, use_tqdm=False)
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=70)
    print(table)
    with open(os.path.join(a.out, "profile.txt"), "w") as f:
        f.write(table)
    llm.shutdown()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="qwen3-30b-a3b")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--out", default="out/moe_kernel")
    p.add_argument("--skip-profile", action="store_true")
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    rows = []
    bench_kernels(rows)
    with open(os.path.join(a.out, "kernels.json"), "w") as f:
        json.dump(rows, f, indent=2)
    if not a.skip_profile:
        profile_model(a)


if __name__ == "__main__":
    main()
