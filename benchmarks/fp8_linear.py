"""FP8 block-scaled linears against bf16 on the GPU: per projection shape of Llama-3.1-8B (and the
MoE models' attention), rows 1 / 8 / 64 / 512 / 4096, the FP8 kernel (kernels/fp8_gemm.py) and the
bf16 path the engine takes (the skinny-GEMM kernel or cuBLAS), CUDA-graph replays of 50 calls, weights
from HBM (a rotating set larger than L2). Floor at few rows: FP8 weight bytes / 4.8 TB/s.

    python3 benchmarks/fp8_linear.py --out $OUT/fp8_linear
"""
import argparse
import json
import os

import torch

from meshserve.kernels.fp8 import quantize
from meshserve.kernels.fp8_gemm import fp8_gemm, fp8_gemv
from meshserve.layers.linear import linear

SHAPES = {"8b.qkv": (4096, 6144), "8b.o": (4096, 4096), "8b.gate_up": (4096, 28672), "8b.down": (14336, 4096),
          "30b.qkv": (2048, 5120), "30b.o": (4096, 2048)}
BW = 4.8e12


def timed(fn, reps=50):
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    g.replay()
    torch.cuda.synchronize()
    start.record()
    g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / reps  # us


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="out/fp8_linear")
    p.add_argument("--rows", default="1,8,64,512,4096")
    args = p.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    results = []
    print(f"{'shape':12} {'rows':>5} {'bf16 us':>9} {'fp8 us':>9} {'fp8 floor':>9} {'fp8/bf16':>8}")
    for name, (k, n) in SHAPES.items():
        copies = max(1, int(200e6 // (n * k)))  # > L2: each call reads its weights from HBM
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        qs = [quantize(w.float(), (128, 128)) for w in ws]
        for m in rows:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            i = [0]

            def bf16():
                i[0] = (i[0] + 1) % copies
                linear(x, ws[i[0]])

            def fp8():
                i[0] = (i[0] + 1) % copies
                q, s = qs[i[0]]
                (fp8_gemv if m <= 8 else fp8_gemm)(x, q, s, (128, 128))
            t_bf, t_f8 = timed(bf16), timed(fp8)
            floor = n * k / BW * 1e6
            print(f"{name:12} {m:5d} {t_bf:9.1f} {t_f8:9.1f} {floor:9.1f} {t_f8 / t_bf:8.2f}", flush=True)
            results.append({"shape": name, "k": k, "n": n, "rows": m, "bf16_us": t_bf, "fp8_us": t_f8,
                            "fp8_floor_us": floor})
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "fp8_linear.json"), "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
