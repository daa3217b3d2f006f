#!/usr/bin/env python
"""Prefill-sized GEMMs on the GPU: F.linear on the 8B shape's four projections at the row counts
of an online-8b prefill step (467 prompt tokens plus the running decode rows) and of prefill-8k,
through cuBLAS and through cuBLASLt (torch.backends.cuda.preferred_blas_library). Each timing
replays a CUDA graph over several weight copies (no L2 reuse across calls, as across layers).
Prints us per call, TFLOP/s and the 32-layer sum per row count; writes JSON.

  python benchmarks/gemm_prefill.py --out out/gemm_prefill
"""
import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernel_record  # noqa: E402
from cuda_timing import graph_seconds  # noqa: E402

SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}  # K, N
LAYERS = 32


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/gemm_prefill")
    p.add_argument("--rows", default="467,470,480,493,496,512,528,8192")
    p.add_argument("--libs", default="cublas,cublaslt")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    results = []
    weights = {name: [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(4)]
               for name, (k, n) in SHAPES.items()}
    print(f"{'lib':>9} {'M':>5} " + " ".join(f"{n + ' us':>10} {'TF/s':>5}" for n in SHAPES) + f" {'32 layers ms':>12}")
    for lib in args.libs.split(","):
        torch.backends.cuda.preferred_blas_library(lib)
        for m in [int(r) for r in args.rows.split(",")]:
            row = {"lib": lib, "rows": m}
            total = 0.0
            cells = []
            for name, (k, n) in SHAPES.items():
                ws = weights[name]
                xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in ws]
                t = graph_seconds(lambda: [F.linear(x, w) for x, w in zip(xs, ws)], 20) / len(ws)
                tflops = 2 * m * n * k / t / 1e12
                row[name] = {"us": t * 1e6, "tflops": tflops}
                total += t
                cells.append(f"{t * 1e6:>10.1f} {tflops:>5.0f}")
            row["layers_ms"] = total * LAYERS * 1e3
            results.append(row)
            print(f"{lib:>9} {m:>5} " + " ".join(cells) + f" {row['layers_ms']:>12.2f}")
    torch.backends.cuda.preferred_blas_library("default")
    with open(os.path.join(args.out, "gemm_prefill.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "kernel_config": kernel_record.local(),
                   "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
