#!/usr/bin/env python
"""Skinny GEMM sweep on the GPU: cuBLAS (F.linear) against meshserve's Triton kernel
(meshserve/kernels/gemv.py) over tile configurations, for the linear shapes of the 8B and 0.6B
models at 1, 2 and 4 rows. Each timing replays a CUDA graph that walks enough distinct weight copies
(>= 512 MB) that nothing is served from L2, like a decode step. Prints a table, writes JSON.

  python benchmarks/gemv.py --out out/gemv
"""
import argparse
import itertools
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernel_record  # noqa: E402
from cuda_timing import graph_seconds  # noqa: E402

SHAPES = {  # name: (K, N)
    "8b.qkv": (4096, 6144), "8b.o": (4096, 4096), "8b.gate_up": (4096, 28672), "8b.down": (14336, 4096),
    "8b.lm_head": (4096, 128256), "0.6b.qkv": (1024, 4096), "0.6b.gate_up": (1024, 6144),
    "0.6b.down": (3072, 1024),
    # Qwen3-30B-A3B (moe-1gpu): attention projections and the router gate
    "30b.qkv": (2048, 5120), "30b.o": (4096, 2048), "30b.gate": (2048, 128),
    # Moonlight-16B-A3B (mla-1gpu): q, kv_a (latent + rope), o, router gate
    "16b.q": (2048, 3072), "16b.kv_a": (2048, 576), "16b.o": (2048, 2048), "16b.gate": (2048, 64),
}
CONFIGS = list(itertools.product([1, 2, 4, 8, 16], [256, 512, 1024, 2048], [4, 8]))


def time_chain(fn, xs, ws, reps=20) -> float:
    """Seconds per call of fn(x, w), averaged over a graph that calls it once per weight copy."""
    return graph_seconds(lambda: [fn(x, w) for x, w in zip(xs, ws)], reps) / len(ws)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/gemv")
    p.add_argument("--rows", default="1,2,4")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--sweep", default="8b", help="sweep tile configs for M=1 on shapes starting with this (a+b: either)")
    args = p.parse_args()
    from meshserve.kernels.gemv import _config, gemv

    os.makedirs(args.out, exist_ok=True)
    results = []
    print(f"{'shape':>13} {'M':>2} {'cuBLAS us':>9} {'GB/s':>6} {'default us':>10} {'GB/s':>6} "
          f"{'best us':>8} {'GB/s':>6}  best (BLOCK_N, BLOCK_K, warps)")
    for name in args.shapes.split(","):
        k, n = SHAPES[name]
        nbytes = k * n * 2
        copies = max(2, -(-512 * 2**20 // nbytes))
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        for m in [int(r) for r in args.rows.split(",")]:
            xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
            ref = F.linear(xs[0], ws[0]).float()
            t_cublas = time_chain(lambda x, w: F.linear(x, w), xs, ws)
            t_default = time_chain(lambda x, w: gemv(x, w), xs, ws)
            sweep = {}
            for cfg in CONFIGS if (m == 1 and name.startswith(tuple(args.sweep.split("+")))) else [_config(m, n, k)]:
                if cfg[1] * cfg[0] * triton_next_pow2(m) > 16384:
                    continue
                err = (gemv(xs[0], ws[0], config=cfg).float() - ref).norm() / ref.norm()
                if err > 1e-2:
                    raise SystemExit(f"{name} M={m} config {cfg}: relative error {err:.2e}")
                sweep[cfg] = time_chain(lambda x, w, c=cfg: gemv(x, w, config=c), xs, ws)
            best = min(sweep, key=sweep.get)
            row = {"shape": name, "K": k, "N": n, "M": m, "cublas_us": t_cublas * 1e6,
                   "default_config": list(_config(m, n, k)), "default_us": t_default * 1e6,
                   "best_config": list(best), "best_us": sweep[best] * 1e6,
                   "cublas_gbps": nbytes / t_cublas / 1e9, "default_gbps": nbytes / t_default / 1e9,
                   "best_gbps": nbytes / sweep[best] / 1e9,
                   "sweep": {str(c): t * 1e6 for c, t in sweep.items()}}
            results.append(row)
            print(f"{name:>13} {m:>2} {row['cublas_us']:>9.1f} {row['cublas_gbps']:>6.0f} {row['default_us']:>10.1f} "
                  f"{row['default_gbps']:>6.0f} {row['best_us']:>8.1f} {row['best_gbps']:>6.0f}  {best}", flush=True)
        del ws
        torch.cuda.empty_cache()
    with open(os.path.join(args.out, "gemv.json"), "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "kernel_config": kernel_record.local(),
                   "results": results}, f, indent=1)


def triton_next_pow2(m: int) -> int:
    return 1 << (m - 1).bit_length()


if __name__ == "__main__":
    main()
