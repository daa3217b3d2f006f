#!/usr/bin/env python
"""The fused RMSNorm + skinny GEMM (kernels/gemv.py norm_gemv) against the two kernels it replaces
(kernels/fused.py rms_norm with the residual, then gemv; for a router gate also router_topk), one
row, on the GPU: microseconds per layer's worth, over a CUDA graph that walks enough weight copies
(>= 512 MB) that nothing comes from L2, as in a decode step. Sweeps the fused kernel's (BLOCK_N,
warps). Prints a table, writes JSON.

    python benchmarks/norm_gemv.py --out $OUT/norm_gemv
"""
import argparse
import itertools
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from cuda_timing import graph_seconds  # noqa: E402

SHAPES = {  # name: (K, N, routed top-k or 0)
    "30b.qkv": (2048, 5120, 0), "30b.gate+router": (2048, 128, 8), "0.6b.qkv": (1024, 4096, 0),
    "16b.q": (2048, 3072, 0), "8b.qkv": (4096, 6144, 0),
}
CONFIGS = list(itertools.product([1, 2, 4], [4, 8]))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="out/norm_gemv")
    p.add_argument("--shapes", default=",".join(SHAPES))
    a = p.parse_args()
    from meshserve.kernels.fused import rms_norm
    from meshserve.kernels.gemv import gemv, norm_gemv
    from meshserve.kernels.moe_router import route_constexprs, router_topk
    os.makedirs(a.out, exist_ok=True)
    rows = []
    print(f"{'shape':>16} {'unfused us':>10} {'fused (rule) us':>15} {'best us':>8}  best (BLOCK_N, warps)", flush=True)
    for name in a.shapes.split(","):
        k, n, top_k = SHAPES[name]
        copies = max(2, -(-512 * 2**20 // (k * n * 2)))
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5 for _ in range(copies)]
        xs = [torch.randn(1, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        res = [torch.randn(1, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        nw = torch.rand(k, device="cuda", dtype=torch.bfloat16) + 0.5
        route = None
        if top_k:
            meta = route_constexprs(n, top_k, sigmoid=False, renormalize=True, has_bias=False, n_group=None,
                                    topk_group=None, scale=1.0)
            counters = [torch.zeros(1, dtype=torch.int32, device="cuda") for _ in range(copies)]

        def unfused():
            for x, r, w in zip(xs, res, ws):
                h, _ = rms_norm(x, nw, 1e-6, residual=r)  # (adds into r: values drift, timing does not)
                y = gemv(h, w)
                if top_k:
                    router_topk(y, top_k)

        def fused(config=None):
            def run():
                for i, (x, r, w) in enumerate(zip(xs, res, ws)):
                    rt = (counters[i], meta, None, 1.0, None) if top_k else None
                    norm_gemv(x, r, nw, 1e-6, w, want_h=bool(top_k), route=rt, config=config)
            return run

        base = graph_seconds(unfused, 20) / copies * 1e6
        rule = graph_seconds(fused(), 20) / copies * 1e6
        sweep = {}
        for bn, warps in CONFIGS:
            try:
                sweep[(bn, warps)] = graph_seconds(fused((bn, warps)), 20) / copies * 1e6
            except Exception as e:  # a tile too large for registers / shared memory
                print(f"  ({bn}, {warps}): {type(e).__name__}", flush=True)
        best = min(sweep, key=sweep.get)
        print(f"{name:>16} {base:10.2f} {rule:15.2f} {sweep[best]:8.2f}  {best}", flush=True)
        rows.append({"shape": name, "k": k, "n": n, "top_k": top_k, "unfused_us": base, "fused_rule_us": rule,
                     "sweep_us": {f"{bn}x{w}": us for (bn, w), us in sweep.items()}, "best": list(best)})
    with open(os.path.join(a.out, "norm_gemv.json"), "w") as f:
        json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
