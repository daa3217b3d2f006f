#!/usr/bin/env python
"""The MoE block of a decode step at Qwen3-30B-A3B's shape (H 2048, I 768, 128 experts, top-8, bf16),
before and after the decode work of issue 21, per token count T, as CUDA-graph replays over 8
layers' distinct weights (each layer's experts come from HBM, as in the 48-layer model):

- router: select_experts' torch ops (softmax, topk, renormalise) vs the fused kernel
  (kernels/moe_router.py);
- alignment at BLOCK_M 16: the multi-program kernels (small_max=0) vs the one-program
  _align_small_kernel;
- experts: fused_experts with the four-kernel path (alignment, two grouped GEMMs, sum over k) vs
  the built-in choice (the two-kernel path up to T=4) vs a tuned file (if $MESHSERVE_MOE_CONFIG_DIR
  or meshserve/kernels/configs/ has one for this GPU);
- block: gate linear + router + experts, old (torch router, four kernels) vs new (defaults).

    python benchmarks/moe_decode.py --out $OUT/moe_decode
"""
import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from cuda_timing import graph_seconds  # noqa: E402

H, I, E, K = 2048, 768, 128, 8
LAYERS = 8
DEVICE = "cuda"  # --device cpu: a dry run under TRITON_INTERPRET=1 (--small shapes), eager wall clock


def per_call_us(calls, reps=50) -> float:
    if DEVICE == "cpu":
        import time
        t0 = time.perf_counter()
        for c in calls:
            c()
        return (time.perf_counter() - t0) / len(calls) * 1e6
    return graph_seconds(lambda: [c() for c in calls], reps) / len(calls) * 1e6


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/moe_decode")
    p.add_argument("--tokens", default="1,2,4,8,16,32,64")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help=argparse.SUPPRESS)
    a = p.parse_args()
    global DEVICE, H, I, E, K, LAYERS
    DEVICE = a.device
    if DEVICE == "cpu":
        H, I, E, K, LAYERS = 64, 32, 16, 4, 2
    os.makedirs(a.out, exist_ok=True)
    from meshserve.kernels import moe
    from meshserve.kernels.moe_align import align_block_size
    from meshserve.kernels.gemv import gemv
    from meshserve.layers.moe.router import RouterConfig, select_experts

    g = torch.Generator(device=DEVICE).manual_seed(0)
    w13 = [(torch.randn(E, 2 * I, H, device=DEVICE, generator=g) * 0.02).bfloat16() for _ in range(LAYERS)]
    w2 = [(torch.randn(E, H, I, device=DEVICE, generator=g) * 0.02).bfloat16() for _ in range(LAYERS)]
    gate = [(torch.randn(E, H, device=DEVICE, generator=g) * 0.02).bfloat16() for _ in range(LAYERS)]
    rcfg = RouterConfig(K, renormalize=True)
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    tuned = moe.find_config_table(E, H, I, torch.bfloat16, name)
    print(f"tuned config file: {tuned.source if tuned else 'none'}", flush=True)
    rows = []
    for T in [int(t) for t in a.tokens.split(",")]:
        x = [torch.randn(T, H, device=DEVICE, generator=g).bfloat16() for _ in range(LAYERS)]
        logits = [torch.randn(T, E, device=DEVICE, generator=g).bfloat16() for _ in range(LAYERS)]
        routes = [select_experts(lg, rcfg, kernel=False) for lg in logits]
        builtin = moe._table_config(T, K, E)
        four = moe.MoeKernelConfig(builtin.block_m, builtin.gate_up, builtin.down)  # same tiles, no down_sum
        r = {"T": T}
        r["router_torch_us"] = per_call_us([lambda i=i: select_experts(logits[i], rcfg, kernel=False)
                                            for i in range(LAYERS)])
        r["router_kernel_us"] = per_call_us([lambda i=i: select_experts(logits[i], rcfg, kernel=True)
                                             for i in range(LAYERS)])
        r["align_multi_us"] = per_call_us([lambda i=i: align_block_size(routes[i][1], E, 16, small_max=0)
                                           for i in range(LAYERS)])
        r["align_small_us"] = per_call_us([lambda i=i: align_block_size(routes[i][1], E, 16)
                                           for i in range(LAYERS)])

        def experts(cfg):
            return per_call_us([lambda i=i: moe.fused_experts(x[i], w13[i], w2[i], routes[i][0], routes[i][1],
                                                              configs=cfg) for i in range(LAYERS)])
        r["experts_four_kernel_us"] = experts(four)
        r["experts_builtin_us"] = experts(lambda *s: moe._table_config(*s[:3]))
        r["experts_default_us"] = experts(None)  # the tuned file when there is one
        r["builtin_two_kernel"] = moe._table_config(T, K, E).down_sum is not None and T * K <= moe.DIRECT_MAX

        def block_old(i):
            w, ids = select_experts(gemv(x[i], gate[i]), rcfg, kernel=False)
            return moe.fused_experts(x[i], w13[i], w2[i], w, ids, configs=four)

        def block_new(i):
            w, ids = select_experts(gemv(x[i], gate[i]), rcfg)
            return moe.fused_experts(x[i], w13[i], w2[i], w, ids)
        r["block_old_us"] = per_call_us([lambda i=i: block_old(i) for i in range(LAYERS)])
        r["block_new_us"] = per_call_us([lambda i=i: block_new(i) for i in range(LAYERS)])
        touched = sum(rt[1].unique().numel() for rt in routes) / LAYERS
        r["floor_us"] = touched * 3 * H * I * 2 / 4.3e12 * 1e6
        rows.append(r)
        print(f"T={T:>3}: router {r['router_torch_us']:6.1f} -> {r['router_kernel_us']:5.1f} us | align "
              f"{r['align_multi_us']:5.1f} -> {r['align_small_us']:5.1f} | experts four-kernel "
              f"{r['experts_four_kernel_us']:6.1f}, built-in {r['experts_builtin_us']:6.1f}"
              f"{' (two-kernel)' if r['builtin_two_kernel'] else ''}, default {r['experts_default_us']:6.1f} "
              f"(floor {r['floor_us']:5.1f}) | block {r['block_old_us']:6.1f} -> {r['block_new_us']:6.1f} us",
              flush=True)
    with open(os.path.join(a.out, "moe_decode.json"), "w") as f:
        json.dump({"device": name, "tuned_file": tuned.source if tuned else None,
                   "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
