#!/usr/bin/env python
"""The batch-1 decode fusions against the kernels they replace, on the GPU, 8B shapes (bf16):
  - rotary in place + KV-cache store     vs  rotary_store_kv (kernels/fused.py)
  - torch.argmax over the 128k-vocabulary logits  vs  kernels/fused.argmax_rows
Each timing replays a CUDA graph of 32 layers' worth of calls on distinct weights / caches (as a
decode step does: nothing stays in L2). Prints a table, writes JSON.

  python benchmarks/decode_fusions.py --out out/decode_fusions
"""
import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kernel_record  # noqa: E402
from cuda_timing import graph_seconds as time_graph  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/decode_fusions")
    p.add_argument("--layers", type=int, default=32)
    args = p.parse_args()
    import torch

    from meshserve.kernels.fused import argmax_rows, rotary_, rotary_store_kv
    from meshserve.kernels.paged_attention import store_kv
    from meshserve.layers.rotary import RotaryEmbedding

    dev, dt, L = "cuda", torch.bfloat16, args.layers
    rows = []
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

    rows.append({"what": "rotary + KV store (per layer)", "separate_us": time_graph(separate) / L * 1e6,
                 "fused_us": time_graph(fused) / L * 1e6, "per_step": 32})
    logits = [torch.randn(1, 128256, device=dev, dtype=dt) for _ in range(L)]
    same = all(torch.equal(argmax_rows(x), x.argmax(dim=-1)) for x in logits)
    rows.append({"what": "argmax, 1 x 128256 (per step)", "separate_us": time_graph(
        lambda: [x.argmax(dim=-1) for x in logits]) / L * 1e6,
        "fused_us": time_graph(lambda: [argmax_rows(x) for x in logits]) / L * 1e6, "bitwise_equal": same,
        "per_step": 1})
    print(f"{'batch 1, 8B shape':>30} {'before us':>10} {'now us':>8} {'saved us':>9} {'per step us':>12}")
    for r in rows:
        saved = r["separate_us"] - r["fused_us"]
        print(f"{r['what']:>30} {r['separate_us']:>10.2f} {r['fused_us']:>8.2f} {saved:>9.2f} "
              f"{saved * r['per_step']:>12.1f}"
              + ("" if r.get("bitwise_equal", True) else "  (NOT bitwise equal)"))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "decode_fusions.json"), "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "kernel_config": kernel_record.local(), "rows": rows}, f,
                  indent=1)


if __name__ == "__main__":
    main()
