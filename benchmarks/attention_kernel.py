#!/usr/bin/env python
"""Decode and prefill attention kernel timings on the GPU against the bandwidth floor, with a
sweep of tile sizes. Checks the output against the torch reference first. --json writes the
fastest shapes as `suggested_kernel_config` (KernelConfig fields: pass them to the engine as
`kernel_config`, e.g. in a `meshserve serve --config` YAML) next to this GPU's current settings.

    python benchmarks/attention_kernel.py --batch 256 --context 768 --heads 16 --kv-heads 8
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402

from meshserve.kernels import settings as kernel_settings  # noqa: E402
from meshserve.kernels.paged_attention import paged_attention, plan_tiles  # noqa: E402
from meshserve.layers.attention.backends.triton import decode_num_splits  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--context", type=int, default=768)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--page", type=int, default=32)
    p.add_argument("--quick", action="store_true", help="a smaller prefill sweep (block_n 64/128, stages 2/3)")
    p.add_argument("--prefill-only", action="store_true", help="only the 8k prefill sweep")
    p.add_argument("--rows", default="64,128", help="prefill tile rows (query token x head) to sweep")
    p.add_argument("--json", help="write the fastest prefill tile shape and decode split_tiles here")
    a = p.parse_args()
    dev, dt = "cuda", torch.bfloat16
    B, L, H, KVH, D, P = a.batch, a.context, a.heads, a.kv_heads, a.head_dim, a.page
    nb = B * (-(-L // P)) + 1
    cache = torch.randn(2, nb, P, KVH, D, dtype=dt, device=dev)
    bt = (torch.randperm(nb - 1, device=dev)[: B * (-(-L // P))] + 1).view(B, -1).int()
    seq_lens = torch.full((B,), L, dtype=torch.int32, device=dev)
    qsl = torch.arange(B + 1, dtype=torch.int32, device=dev)
    q = torch.randn(B, H, D, dtype=dt, device=dev)
    ts, st = plan_tiles([1] * B, 1, dev)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    bytes_moved = B * L * KVH * D * 2 * 2
    print(f"decode: B={B} ctx={L} H={H} KVH={KVH} D={D} page={P}: {bytes_moved / 1e9:.2f} GB of KV, "
          f"floor {bytes_moved / 4.3e12 * 1e6:.0f} us at 4.3 TB/s")
    ref = None
    print(f"{'block_n':>8}{'warps':>6}{'stages':>7}{'splits':>7}{'us':>9}{'TB/s':>7}")
    default_splits = decode_num_splits(B, KVH, sms)
    for splits in ([] if a.prefill_only else sorted({1, default_splits, max(1, default_splits * 2)})):
        for bn in (64,):
            for warps in (2, 4):
                for stages in (2, 3):
                    try:
                        f = lambda: paged_attention(q, cache, bt, seq_lens, qsl, ts, st, 1, D ** -0.5, None, splits,  # noqa
                                                    block_n=bn, num_warps=warps, num_stages=stages, workspace={},
                                                    exact_tiles=True)
                        out = f()
                        if ref is None:
                            ref = out
                        assert (out.float() - ref.float()).abs().max() < 2e-2
                        ms = triton.testing.do_bench(f, warmup=20, rep=100, return_mode="median")
                        print(f"{bn:>8}{warps:>6}{stages:>7}{splits:>7}{ms * 1000:>9.1f}{bytes_moved / ms / 1e9:>7.2f}")
                    except Exception as e:  # a config that does not compile or fit
                        print(f"{bn:>8}{warps:>6}{stages:>7}{splits:>7}   failed: {type(e).__name__}")
    # prefill: one 8k sequence, the 8B shape (32 query heads, 8 kv heads), every tile shape
    T, H8, KVH8 = 8192, 32, 8
    nbp = T // P + 1
    cache_p = torch.randn(2, nbp, P, KVH8, D, dtype=dt, device=dev)
    btp = torch.arange(1, nbp, dtype=torch.int32, device=dev)[None]
    qp = torch.randn(T, H8, D, dtype=dt, device=dev)
    sl = torch.tensor([T], dtype=torch.int32, device=dev)
    ql = torch.tensor([0, T], dtype=torch.int32, device=dev)
    flops = 4 * H8 * D * T * T / 2
    ref = None
    best_prefill = None
    configs = [(rows, bn, warps, stages, heavy) for rows in map(int, a.rows.split(","))
               for bn in ((64, 128) if a.quick else (32, 64, 128)) for warps in (4, 8)
               for stages in ((2, 3) if a.quick else (2, 3, 4)) for heavy in (False, True)]
    for rows, bn, warps, stages, heavy in configs:
        bq = max(1, rows // (H8 // KVH8))
        tsp, stp = plan_tiles([T], bq, dev)
        try:
            f = lambda: paged_attention(qp, cache_p, btp, sl, ql, tsp, stp, bq, D ** -0.5, None, 1,  # noqa
                                        block_n=bn, num_warps=warps, num_stages=stages,
                                        exact_tiles=True, heavy_first=heavy)
            out = f()
            ref = out if ref is None else ref
            assert (out.float() - ref.float()).abs().max() < 3e-2
            ms = triton.testing.do_bench(f, warmup=5, rep=30, return_mode="median")
            if best_prefill is None or ms < best_prefill["ms"]:
                best_prefill = dict(rows=rows, block_n=bn, warps=warps, stages=stages, heavy_first=heavy,
                                    ms=ms, tflops=flops / ms / 1e9)
            print(f"prefill 8k, 8B layer: rows={rows} block_n={bn} warps={warps} stages={stages} "
                  f"heavy_first={int(heavy)}: "
                  f"{ms:.3f} ms, {flops / ms / 1e9:.0f} TFLOP/s", flush=True)
        except Exception as e:  # noqa: BLE001 - a config that does not compile or fit
            print(f"prefill rows={rows} block_n={bn} warps={warps} stages={stages} heavy={int(heavy)}: failed "
                  f"{type(e).__name__}", flush=True)
    # batch-1 decode on the 8B shape: KV splits and how many tiles a split covers
    tiles_total = {}
    if a.prefill_only:
        print(f"fastest prefill tile shape: {best_prefill}")
        return
    for ctx in (128, 384, 640, 2048, 8192):
        nb1 = -(-ctx // P) + 1
        c1 = torch.randn(2, nb1, P, KVH8, D, dtype=dt, device=dev)
        bt1 = torch.arange(1, nb1, dtype=torch.int32, device=dev)[None]
        q1 = torch.randn(1, H8, D, dtype=dt, device=dev)
        s1 = torch.tensor([ctx], dtype=torch.int32, device=dev)
        ql1 = torch.tensor([0, 1], dtype=torch.int32, device=dev)
        ts1, st1 = plan_tiles([1], 1, dev)
        splits8 = decode_num_splits(1, KVH8, sms)
        line = []
        for splits, tiles in [(1, 1)] + [(splits8, t) for t in (1, 2, 4, 8)]:
            f = lambda: paged_attention(q1, c1, bt1, s1, ql1, ts1, st1, 1, D ** -0.5, None, splits,  # noqa
                                        split_tiles=tiles, workspace={})
            g = torch.cuda.CUDAGraph()  # in a graph, as the engine runs it: launch cost as in a step
            f()
            torch.cuda.synchronize()
            with torch.cuda.graph(g):
                for _ in range(32):
                    f()
            g.replay()
            torch.cuda.synchronize()
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            for _ in range(10):
                g.replay()
            e1.record()
            torch.cuda.synchronize()
            us = e0.elapsed_time(e1) / 320 * 1000
            if splits > 1:
                tiles_total[tiles] = tiles_total.get(tiles, 0.0) + us
            line.append(f"splits={splits} tiles={tiles}: {us:.1f} us")
        print(f"decode b1 8B ctx={ctx}: " + "; ".join(line), flush=True)
    best_tiles = min(tiles_total, key=tiles_total.get)
    print(f"fastest prefill tile shape: {best_prefill}; decode split_tiles with the least total time over the "
          f"contexts: {best_tiles} ({ {t: round(v, 1) for t, v in tiles_total.items()} } us)")
    if a.json:
        # the sweep times one 8k prompt: its rows and stages are the tiles of large steps only
        suggested = {"attn_prefill_rows": best_prefill["rows"], "attn_prefill_block_n": best_prefill["block_n"],
                     "attn_prefill_warps": best_prefill["warps"], "attn_prefill_stages": best_prefill["stages"],
                     "attn_decode_split_tiles": best_tiles}
        current = kernel_settings.for_device(None, dev)
        with open(a.json, "w") as f:
            json.dump({"prefill": best_prefill, "decode_split_tiles": best_tiles, "decode_tiles_total_us": tiles_total,
                       "gpu": torch.cuda.get_device_name(0), "suggested_kernel_config": suggested,
                       "kernel_config": kernel_settings.describe(current, dev)}, f, indent=2)


if __name__ == "__main__":
    main()
