#!/usr/bin/env python
"""Sweep the latent decode kernel's launch settings (KV splits, BLOCK_N, stages) at 8k context,
batch 1 and 64, Moonlight's shape (16 heads, 512 + 64 dims, bf16), as CUDA-graph replays; prints
us, GB/s and the ratio to the 4.3 TB/s floor for each, best last.

    python benchmarks/mla_kernel_sweep.py
"""
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from meshserve.kernels.mla_decode import mla_decode  # noqa: E402


def time_us(fn, n=50):
    for _ in range(3):
        fn()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(n):
        g.replay()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / n * 1000


def main():
    H, L, R, page, ctx = 16, 512, 64, 32, 8192
    for B, splits_list in ((1, (16, 32, 64)), (64, (4, 8, 16))):
        blocks = ctx // page
        cache = torch.randn(B * blocks + 1, page, L + R, device="cuda", dtype=torch.bfloat16)
        tables = torch.arange(1, B * blocks + 1, device="cuda", dtype=torch.int32).view(B, blocks)
        lens = torch.full((B,), ctx, device="cuda", dtype=torch.int32)
        q = torch.randn(B, H, L + R, device="cuda", dtype=torch.bfloat16)
        floor = B * ctx * (L + R) * 2 / 4.3e12 * 1e6
        rows = []
        for splits, bn, st in itertools.product(splits_list, (32, 64), (2, 3)):
            try:
                us = time_us(lambda: mla_decode(q, cache, tables, lens, L, 0.07, splits, block_n=bn, num_stages=st))
            except Exception as err:  # a tile that does not fit
                print(f"B={B} splits={splits} block_n={bn} stages={st}: {type(err).__name__}")
                continue
            rows.append((us, splits, bn, st))
            print(f"B={B} splits={splits:>2} block_n={bn} stages={st}: {us:7.1f} us  ratio {us / floor:5.2f}",
                  flush=True)
        us, splits, bn, st = min(rows)
        print(f"best B={B}: splits={splits} block_n={bn} stages={st}: {us:.1f} us, ratio {us / floor:.2f}")


if __name__ == "__main__":
    main()
