#!/usr/bin/env python
"""Decode attention -> o_proj at batch 1 with and without the L2 prefetch (kernel_config.decode_l2_prefetch,
kernels/prefetch.py): CUDA-graph replays of 48 layers' worth of (attention, skinny GEMM) pairs on
distinct caches and weights (a decode step's pattern: nothing stays in L2 from the step before),
default shape Qwen3-30B-A3B's (32 / 4 heads of 128, o_proj 4096 -> 2048, bf16). Also each kernel
alone, and the pair under PDL. Prints a table (us per layer), writes JSON.

    python benchmarks/l2_prefetch.py --contexts 128,256,384 --out $OUT/l2_prefetch
"""
import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import kernel_record  # noqa: E402
from cuda_timing import graph_seconds  # noqa: E402
from meshserve import kernels  # noqa: E402
from meshserve.kernels import settings as ks  # noqa: E402
from meshserve.kernels.gemv import gemv  # noqa: E402
from meshserve.kernels.paged_attention import paged_attention, plan_tiles  # noqa: E402
from meshserve.layers.attention.backends.triton import decode_num_splits  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--page", type=int, default=32)
    p.add_argument("--contexts", default="128,256,384")
    p.add_argument("--layers", type=int, default=48)
    p.add_argument("--out", default="out/l2_prefetch")
    a = p.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    H, KVH, D, P, L = a.heads, a.kv_heads, a.head_dim, a.page, a.layers
    splits = decode_num_splits(1, KVH, torch.cuda.get_device_properties(dev).multi_processor_count)
    weights = [torch.randn(a.hidden, H * D, dtype=dt, device=dev) / (H * D) ** 0.5 for _ in range(L)]
    mb = weights[0].numel() * weights[0].element_size() / 1e6
    rows = []
    for ctx in map(int, a.contexts.split(",")):
        nb = -(-ctx // P)
        caches = [torch.randn(2, nb + 1, P, KVH, D, dtype=dt, device=dev) for _ in range(L)]
        bt = torch.arange(1, nb + 1, dtype=torch.int32, device=dev).view(1, nb)
        q = torch.randn(1, H, D, dtype=dt, device=dev)
        s = torch.full((1,), ctx, dtype=torch.int32, device=dev)
        ql = torch.arange(2, dtype=torch.int32, device=dev)
        ts, st = plan_tiles([1], 1, dev)
        ws = [{} for _ in range(L)]

        def attn(i, prefetch):
            return paged_attention(q, caches[i], bt, s, ql, ts, st, 1, D ** -0.5, None, splits, workspace=ws[i],
                                   prefetch=weights[i] if prefetch else None)

        def pair(prefetch):
            return lambda: [gemv(attn(i, prefetch).view(1, H * D), weights[i]) for i in range(L)]

        row = {"context": ctx, "splits": splits, "o_proj_mb": round(mb, 1)}
        row["attention_us"] = graph_seconds(lambda: [attn(i, False) for i in range(L)]) / L * 1e6
        row["attention_prefetching_us"] = graph_seconds(lambda: [attn(i, True) for i in range(L)]) / L * 1e6
        x = torch.randn(1, H * D, dtype=dt, device=dev)
        row["o_proj_us"] = graph_seconds(lambda: [gemv(x, w) for w in weights]) / L * 1e6
        for pdl in (False, True):
            kernels.configure(dataclasses.replace(ks.H200, pdl=pdl))
            try:
                tag = "_pdl" if pdl else ""
                ref, got = pair(False)()[-1], pair(True)()[-1]
                assert torch.equal(ref, got), "the prefetch changed the result"
                row[f"pair{tag}_us"] = graph_seconds(pair(False)) / L * 1e6
                row[f"pair_prefetch{tag}_us"] = graph_seconds(pair(True)) / L * 1e6
            finally:
                kernels.configure(ks.H200)
        rows.append(row)
        print(f"ctx {ctx}: attention {row['attention_us']:.2f} us (prefetching {row['attention_prefetching_us']:.2f}), "
              f"o_proj alone {row['o_proj_us']:.2f}; attention + o_proj {row['pair_us']:.2f} -> "
              f"{row['pair_prefetch_us']:.2f} with the prefetch; under PDL {row['pair_pdl_us']:.2f} -> "
              f"{row['pair_prefetch_pdl_us']:.2f}", flush=True)
        del caches
        torch.cuda.empty_cache()
    os.makedirs(a.out, exist_ok=True)
    doc = {"rows": rows, "layers": L, "kernel_record": kernel_record.local()}
    with open(os.path.join(a.out, "l2_prefetch.json"), "w") as f:
        json.dump(doc, f, indent=1)
    print(f"{'ctx':>5}{'attn':>8}{'attn+pf':>9}{'o_proj':>8}{'pair':>8}{'pair+pf':>9}{'pdl':>8}{'pdl+pf':>8}   us/layer")
    for r in rows:
        print(f"{r['context']:>5}{r['attention_us']:>8.2f}{r['attention_prefetching_us']:>9.2f}{r['o_proj_us']:>8.2f}"
              f"{r['pair_us']:>8.2f}{r['pair_prefetch_us']:>9.2f}{r['pair_pdl_us']:>8.2f}{r['pair_prefetch_pdl_us']:>8.2f}")


if __name__ == "__main__":
    main()
