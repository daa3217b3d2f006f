"""One token's MoE experts: the two-kernel decode path against the one-launch kernel
(kernel_config.fuse_experts_decode, kernels/moe.py experts_one_launch), on a GPU.

Qwen3-30B-A3B's experts by default (E=128, H=2048, I=768, top-8, bf16). A CUDA graph holds `--calls`
expert calls in a row, as a decode step's layers do, cycling over `--copies` copies of the layer's
weights (4 x 1.2 GB: nothing stays in L2 between calls) with a routing of its own per call; the figure
is the replay's time over the calls (median of `--reps` replays), next to the floor (the 8 experts'
bytes at `--bandwidth` TB/s). With `--pdl` every Triton kernel launches with programmatic dependent
launch (kernel_config.pdl). Prints a table and writes JSON to --out.

    python3 benchmarks/experts_one_launch.py [--pdl] [--out out/experts_one_launch.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--E", type=int, default=128)
    p.add_argument("--H", type=int, default=2048)
    p.add_argument("--I", type=int, default=768)
    p.add_argument("--K", type=int, default=8)
    p.add_argument("--calls", type=int, default=48)
    p.add_argument("--copies", type=int, default=4)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--bandwidth", type=float, default=4.3, help="TB/s for the floor")
    p.add_argument("--pdl", action="store_true")
    p.add_argument("--out", default="out/experts_one_launch.json")
    a = p.parse_args()

    from meshserve import kernels
    from meshserve.kernels.moe import GemmConfig, MoeKernelConfig, default_config, fused_experts
    kernels.PDL = a.pdl
    dev = torch.device("cuda")
    E, H, I, K = a.E, a.H, a.I, a.K
    g = torch.Generator(device="cuda").manual_seed(0)
    layers = [((torch.randn(E, 2 * I, H, device=dev, generator=g) * 0.02).bfloat16(),
               (torch.randn(E, H, I, device=dev, generator=g) * 0.02).bfloat16()) for _ in range(a.copies)]
    hidden = torch.randn(1, H, device=dev, generator=g).bfloat16()
    routes = []
    for _ in range(a.calls):
        w, ids = torch.rand(1, E, device=dev, generator=g).topk(K, -1)
        routes.append(((w / w.sum(-1, keepdim=True)).float(), ids))
    shipped = default_config(1, K, E, H, I, torch.bfloat16, torch.cuda.get_device_name())
    if shipped.gate_up_gemv is None or shipped.down_sum is None:
        raise SystemExit(f"the shipped T=1 config has no GEMV decode path here: {shipped}")
    base = MoeKernelConfig(shipped.block_m, shipped.gate_up, shipped.down, down_sum=shipped.down_sum,
                           gate_up_gemv=shipped.gate_up_gemv)
    gv = shipped.gate_up_gemv

    def with_down(bn, bk, gate=None):
        return MoeKernelConfig(base.block_m, base.gate_up, base.down, down_sum=GemmConfig(bn, bk, 1, gv.num_warps, 1),
                               gate_up_gemv=gate or gv)

    rows = [("two kernels (shipped T=1 config)", base, False),
            ("one launch, same tiles", base, True),
            ("one launch, down 1 x 1024 (whole I)", with_down(1, 1024), True),
            ("one launch, down 2 x 1024 (whole I)", with_down(2, 1024), True),
            ("one launch, down 2 x 512", with_down(2, 512), True),
            ("one launch, down 4 x 256", with_down(4, 256), True),
            ("one launch, gated 4 x 1024 w4", with_down(base.down_sum.block_n, base.down_sum.block_k,
                                                        GemmConfig(4, 1024, 1, 4, 1)), True)]
    floor_us = K * 3 * I * H * 2 / (a.bandwidth * 1e12) * 1e6
    counter = torch.zeros(3, dtype=torch.int32, device=dev)
    results = []
    for name, cfg, one in rows:
        graph = None

        def step(cfg=cfg, one=one):
            for i, (tw, ids) in enumerate(routes):
                w13, w2 = layers[i % a.copies]
                fused_experts(hidden, w13, w2, tw, ids, configs=cfg, one_launch=counter if one else None)
        try:
            step()
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
            for _ in range(3):
                graph.replay()
            times = []
            for _ in range(a.reps):
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                graph.replay()
                e.record()
                e.synchronize()
                times.append(s.elapsed_time(e) * 1e3 / a.calls)
            us = statistics.median(times)
            assert counter.tolist() == [0, 0, 0], counter.tolist()
            results.append({"variant": name, "us_per_call": round(us, 2), "floor_us": round(floor_us, 2),
                            "ratio": round(us / floor_us, 3)})
        except Exception as e:  # a variant that does not compile here: say so, go on
            results.append({"variant": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"})
        del graph
    print(f"experts of one token, {torch.cuda.get_device_name()}, E={E} H={H} I={I} K={K} bf16, pdl={a.pdl}")
    print(f"| variant | us per call | floor ({a.bandwidth} TB/s) | ratio |\n| --- | --- | --- | --- |")
    for r in results:
        if "error" in r:
            print(f"| {r['variant']} | {r['error']} | | |")
        else:
            print(f"| {r['variant']} | {r['us_per_call']:.2f} | {r['floor_us']:.2f} | {r['ratio']:.3f} |")
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "pdl": a.pdl, "calls": a.calls, "results": results}, f,
                  indent=1)


if __name__ == "__main__":
    main()
