#!/usr/bin/env python
"""The batch-1 decode fusions against the kernels they replace, on the GPU, 8B shapes (bf16):
  - SiLU-and-mul + down-projection GEMV  vs  the gated GEMV (kernels/gemv.py, gated=True)
  - rotary in place + KV-cache store     vs  rotary_store_kv (kernels/fused.py)
Each timing replays a CUDA graph of 32 layers' worth of calls on distinct weights / caches (as a
decode step does: nothing stays in L2). Prints a table, writes JSON.

  python benchmarks/decode_fusions.py --out out/decode_fusions
"""
import argparse
import json
import os


def time_graph(fn, reps: int = 50) -> float:
    import torch
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / reps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/decode_fusions")
    p.add_argument("--layers", type=int, default=32)
    args = p.parse_args()
    import torch

    from meshserve.kernels.fused import rotary_, rotary_store_kv, silu_and_mul
    from meshserve.kernels.gemv import gemv
    from meshserve.kernels.paged_attention import store_kv
    from meshserve.layers.rotary import RotaryEmbedding

    dev, dt, L = "cuda", torch.bfloat16, args.layers
    rows = []
    # MLP tail: gate_up output [1, 2 * 14336] -> down [4096, 14336]
    xs = [torch.randn(1, 2 * 14336, device=dev, dtype=dt) for _ in range(L)]
    ws = [torch.randn(4096, 14336, device=dev, dtype=dt) * 0.02 for _ in range(L)]
    two = time_graph(lambda: [gemv(silu_and_mul(x), w) for x, w in zip(xs, ws)])
    one = time_graph(lambda: [gemv(x, w, gated=True) for x, w in zip(xs, ws)])
    same = all(torch.equal(gemv(silu_and_mul(x), w), gemv(x, w, gated=True)) for x, w in zip(xs[:2], ws[:2]))
    rows.append({"what": "silu_and_mul + down gemv", "separate_us": two / L * 1e6, "fused_us": one / L * 1e6,
                 "bitwise_equal": same})
    del ws
    # attention head: qkv [1, (32 + 16) * 128] -> rotary + store into a 16-token-block cache
    rope = RotaryEmbedding(128, 8192, {"rope_type": "default", "rope_theta": 500000.0}).to(dev)
    qkvs = [torch.randn(1, 48 * 128, device=dev, dtype=dt) for _ in range(L)]
    caches = [torch.zeros(2, 64, 16, 8, 128, device=dev, dtype=dt) for _ in range(L)]
    pos = torch.tensor([700], device=dev)
    slot = torch.tensor([700 % 1024], device=dev)

    def views(t):
        return t[:, :4096].view(1, 32, 128), t[:, 4096:5120].view(1, 8, 128), t[:, 5120:].view(1, 8, 128)

    def separate():
        for t, c in zip(qkvs, caches):
            q, k, v = views(t)
            rotary_(q, k, pos, rope.cos_cache, rope.sin_cache)
            store_kv(k, v, c, slot)

    def fused():
        for t, c in zip(qkvs, caches):
            q, k, v = views(t)
            rotary_store_kv(q, k, v, pos, rope.cos_cache, rope.sin_cache, c, slot)

    rows.append({"what": "rotary + KV store", "separate_us": time_graph(separate) / L * 1e6,
                 "fused_us": time_graph(fused) / L * 1e6})
    print(f"{'per layer, batch 1':>28} {'separate us':>12} {'fused us':>9} {'saved us':>9} {'x32 layers us':>14}")
    for r in rows:
        saved = r["separate_us"] - r["fused_us"]
        print(f"{r['what']:>28} {r['separate_us']:>12.2f} {r['fused_us']:>9.2f} {saved:>9.2f} {saved * 32:>14.1f}"
              + ("" if r.get("bitwise_equal", True) else "  (NOT bitwise equal)"))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "decode_fusions.json"), "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
