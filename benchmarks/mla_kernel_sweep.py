#!/usr/bin/env python
"""Sweep the latent decode kernel's launch settings (KV splits, BLOCK_N, stages) at 8k context,
batch 1 and 64, Moonlight's shape (16 heads, 512 + 64 dims, bf16), as CUDA-graph replays; prints
us, GB/s and the ratio to the 4.3 TB/s floor for each, best last.

    python benchmarks/mla_kernel_sweep.py [--quick]
    python benchmarks/mla_kernel_sweep.py --ab   # default settings: page_tiles off / on x kernel_config.pdl off / on
"""
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from cuda_timing import graph_seconds  # noqa: E402
from meshserve.kernels.mla_decode import mla_decode  # noqa: E402


H, L, R, PAGE, CTX = 16, 512, 64, 32, 8192  # Moonlight's latent attention, 8k context


def time_us(fn, n=50):
    return graph_seconds(fn, n) * 1e6


def latent_inputs(B: int, ctx: int = CTX):
    """(q, cache, block tables, seq lens, floor us) for B sequences of ctx tokens, bf16, in distinct blocks."""
    blocks = ctx // PAGE
    cache = torch.randn(B * blocks + 1, PAGE, L + R, device="cuda", dtype=torch.bfloat16)
    tables = torch.arange(1, B * blocks + 1, device="cuda", dtype=torch.int32).view(B, blocks)
    lens = torch.full((B,), ctx, device="cuda", dtype=torch.int32)
    q = torch.randn(B, H, L + R, device="cuda", dtype=torch.bfloat16)
    return q, cache, tables, lens, B * ctx * (L + R) * 2 / 4.3e12 * 1e6


def ab():
    """Split + merge kernels at the default settings (decode_num_splits): the gathering tile loop
    (page_tiles=False, as before 2026-12-04's fourth session) and the one-block-id loop, each with
    PDL off and on; pages of 32 keys (the sweep's), so every 32-key tile lies in one page."""
    import dataclasses

    from meshserve import kernels
    from meshserve.kernels import settings as ks
    from meshserve.kernels.mla_decode import decode_num_splits

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for B in (1, 64):
        q, cache, tables, lens, floor = latent_inputs(B)
        splits = decode_num_splits(B, H, CTX, sms)
        outs = {}
        for page_tiles in (False, True):
            for pdl in (False, True):
                kernels.configure(dataclasses.replace(ks.H200, pdl=pdl))
                try:
                    f = lambda: mla_decode(q, cache, tables, lens, L, 0.07, splits, page_tiles=page_tiles)  # noqa
                    outs[page_tiles, pdl] = f().float()
                    us = time_us(f)
                finally:
                    kernels.configure(ks.H200)
                print(f"B={B} splits={splits} page_tiles={page_tiles} pdl={pdl}: {us:7.1f} us  "
                      f"ratio {us / floor:5.2f}", flush=True)
        ref = outs[False, False]
        print(f"  outputs equal to the first: {[torch.equal(ref, o) for o in outs.values()]}")


def main():
    if "--ab" in sys.argv:
        return ab()
    quick = "--quick" in sys.argv  # batch 64 only: split counts around the default and smaller KV tiles
    for B, splits_list in (((64, (6, 8, 12)),) if quick else ((1, (32, 64)), (64, (8, 16)))):
        q, cache, tables, lens, floor = latent_inputs(B)
        rows = []
        ref = mla_decode(q, cache, tables, lens, L, 0.07, 1).float()
        grid = (((sp, bn, st, 4, torch.float32) for sp in splits_list for bn, st in ((32, 2), (16, 3), (16, 4)))
                if quick else itertools.product(splits_list, (32, 64), (2, 3), (4, 8), (torch.float32, torch.bfloat16)))
        for splits, bn, st, warps, pdt in grid:
            try:
                f = lambda: mla_decode(q, cache, tables, lens, L, 0.07, splits, block_n=bn, num_stages=st,  # noqa
                                       num_warps=warps, part_dtype=pdt)
                err = ((f().float() - ref).norm() / ref.norm()).item()
                us = time_us(f)
            except Exception as e:  # a tile that does not fit
                print(f"B={B} splits={splits} block_n={bn} stages={st} warps={warps}: {type(e).__name__}")
                continue
            rows.append((us, splits, bn, st, warps, str(pdt)[6:], err))
        rows.sort()
        for r in rows[:8]:
            print(f"B={B} splits={r[1]:>2} block_n={r[2]} stages={r[3]} warps={r[4]} part={r[5]}: {r[0]:7.1f} us  "
                  f"ratio {r[0] / floor:5.2f}  err {r[6]:.1e}", flush=True)
        cur = [r for r in rows if r[2] == 32 and r[3] == 2 and r[4] == 4 and r[5] == "float32"]
        for r in cur:
            print(f"  current settings, splits={r[1]}: {r[0]:.1f} us ratio {r[0] / floor:.2f}")
        rows = [r[:4] for r in rows]
        us, splits, bn, st = min(rows)
        print(f"best B={B}: splits={splits} block_n={bn} stages={st}: {us:.1f} us, ratio {us / floor:.2f}")


if __name__ == "__main__":
    main()
