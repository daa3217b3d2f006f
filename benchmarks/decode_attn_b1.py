#!/usr/bin/env python
"""Batch-1 (and small-batch) decode attention at a GQA shape (default Qwen3-30B-A3B's: 32 heads,
4 KV heads, head_dim 128, bf16): KV splits x tiles per split x KV tile x warps, as CUDA-graph
replays of 48 layers' worth of calls on distinct caches (a decode step's pattern). Prints a table.

    python benchmarks/decode_attn_b1.py --heads 32 --kv-heads 4 --contexts 128,256,384,1024
    python benchmarks/decode_attn_b1.py --model-splits --batches 1 --contexts 128,256,384 --write $OUT/attn.json

--model-splits: only the split count the engine uses at that batch (decode_num_splits), over KV tile
sizes x tiles per split x warps (what kernel_config can set); --write: the settings with the lowest
mean time over the contexts, as kernel_config fields (JSON), for the batch of the first --batches.
"""
import argparse
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from cuda_timing import graph_seconds  # noqa: E402
from meshserve.kernels.paged_attention import paged_attention, plan_tiles  # noqa: E402
from meshserve.layers.attention.backends.triton import decode_num_splits  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--page", type=int, default=32)
    p.add_argument("--batches", default="1,4")
    p.add_argument("--contexts", default="128,256,384,1024")
    p.add_argument("--layers", type=int, default=48)
    p.add_argument("--quick", action="store_true", help="1 or the default splits, 4 warps only")
    p.add_argument("--model-splits", action="store_true",
                   help="the engine's split count only; KV tiles 32..256 x tiles per split 1..8 x warps 4, 8")
    p.add_argument("--write", default=None, help="JSON of the best kernel_config fields (with --model-splits)")
    a = p.parse_args()
    means = {}  # (block_n, tiles, warps) -> [us per context] at the first batch
    dev, dt = torch.device("cuda"), torch.bfloat16
    H, KVH, D, P = a.heads, a.kv_heads, a.head_dim, a.page
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    for B, ctx in itertools.product(map(int, a.batches.split(",")), map(int, a.contexts.split(","))):
        nb = -(-ctx // P)
        caches = [torch.randn(2, B * nb + 1, P, KVH, D, dtype=dt, device=dev) for _ in range(a.layers)]
        bt = torch.arange(1, B * nb + 1, dtype=torch.int32, device=dev).view(B, nb)
        q = torch.randn(B, H, D, dtype=dt, device=dev)
        s = torch.full((B,), ctx, dtype=torch.int32, device=dev)
        ql = torch.arange(B + 1, dtype=torch.int32, device=dev)
        ts, st = plan_tiles([1] * B, 1, dev)
        ref = paged_attention(q, caches[0], bt, s, ql, ts, st, 1, D ** -0.5, None, 1, workspace={}).float()
        default = decode_num_splits(B, KVH, sms)
        rows = []
        if a.model_splits:
            grid = itertools.product((default,), (1, 2, 4, 8), (32, 64, 128, 256), (4, 8))
        elif a.quick:
            grid = itertools.product(sorted({1, default}), (1, 2, 4), (64,), (4,))
        else:
            grid = itertools.product(sorted({1, 8, default, 2 * default}), (1, 2, 4), (64,), (2, 4))
        for splits, tiles, bn, warps in grid:
            if splits == 1 and tiles == 2:
                continue
            ws = [{} for _ in caches]
            try:
                f = lambda: [paged_attention(q, c, bt, s, ql, ts, st, 1, D ** -0.5, None, splits, workspace=w,  # noqa
                                             block_n=bn, num_warps=warps, split_tiles=tiles)
                             for c, w in zip(caches, ws)]
                got = f()[0].float()
                err = ((got - ref).norm() / ref.norm()).item()
                us = graph_seconds(f, 20) / len(caches) * 1e6
            except Exception as e:  # noqa: BLE001
                print(f"B={B} ctx={ctx} splits={splits} tiles={tiles} bn={bn} warps={warps}: failed {type(e).__name__}")
                continue
            rows.append((us, splits, tiles, bn, warps, err))
            if B == int(a.batches.split(",")[0]) and err < 2e-2:
                means.setdefault((bn, tiles, warps), []).append(us)
        rows.sort()
        cur = [r for r in rows if r[1] == default and r[2] == 2 and r[3] == 64 and r[4] == (4 if B <= 8 else 2)]
        print(f"B={B} ctx={ctx} (default splits {default}): current {cur[0][0]:.2f} us" if cur else "", flush=True)
        for r in rows[:6]:
            print(f"   {r[0]:7.2f} us  splits={r[1]} tiles={r[2]} block_n={r[3]} warps={r[4]}  err={r[5]:.1e}", flush=True)
        del caches
        torch.cuda.empty_cache()
    n_ctx = len(a.contexts.split(","))
    whole = {k: sum(v) / len(v) for k, v in means.items() if len(v) == n_ctx}
    if whole:
        ranked = sorted(whole.items(), key=lambda kv: kv[1])
        print("mean over the contexts (block_n, tiles per split, warps):")
        for (bn, tiles, warps), us in ranked[:8]:
            print(f"   {us:7.2f} us  block_n={bn} tiles={tiles} warps={warps}")
        if a.write:
            (bn, tiles, warps), us = ranked[0]
            cur = whole.get((64, 2, 4))
            doc = {"attn_decode_block_n": bn, "attn_decode_split_tiles": tiles, "attn_decode_warps": warps,
                   "_mean_us": round(us, 2), "_current_mean_us": round(cur, 2) if cur else None,
                   "_contexts": a.contexts, "_batch": int(a.batches.split(",")[0])}
            with open(a.write, "w") as f:
                json.dump(doc, f, indent=1)
            print(f"wrote {a.write}: {doc}")


if __name__ == "__main__":
    main()
