#!/usr/bin/env python
"""Decode and prefill attention kernel timings on the GPU against the bandwidth floor, with a
sweep of tile sizes. Checks the output against the torch reference first.

    python benchmarks/attention_kernel.py --batch 256 --context 768 --heads 16 --kv-heads 8
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402

from meshserve.kernels.paged_attention import block_q_for, paged_attention, plan_tiles  # noqa: E402
from meshserve.worker.cuda_graph import decode_num_splits  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--context", type=int, default=768)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--page", type=int, default=32)
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
    for splits in sorted({1, default_splits, max(1, default_splits * 2)}):
        for bn in (32, 64, 128):
            for warps in (2, 4, 8):
                for stages in (1, 2, 3):
                    try:
                        f = lambda: paged_attention(q, cache, bt, seq_lens, qsl, ts, st, 1, D ** -0.5, None, splits,  # noqa
                                                    block_n=bn, num_warps=warps, num_stages=stages, workspace={})
                        out = f()
                        if ref is None:
                            ref = out
                        assert (out.float() - ref.float()).abs().max() < 2e-2
                        ms = triton.testing.do_bench(f, warmup=20, rep=100, return_mode="median")
                        print(f"{bn:>8}{warps:>6}{stages:>7}{splits:>7}{ms * 1000:>9.1f}{bytes_moved / ms / 1e9:>7.2f}")
                    except Exception as e:  # a config that does not compile or fit
                        print(f"{bn:>8}{warps:>6}{stages:>7}{splits:>7}   failed: {type(e).__name__}")
    # prefill: one 8k sequence
    T = 8192
    nbp = T // P + 1
    cache_p = torch.randn(2, nbp, P, KVH, D, dtype=dt, device=dev)
    btp = torch.arange(1, nbp, dtype=torch.int32, device=dev)[None]
    qp = torch.randn(T, H, D, dtype=dt, device=dev)
    bq = block_q_for(T, H // KVH)
    tsp, stp = plan_tiles([T], bq, dev)
    sl = torch.tensor([T], dtype=torch.int32, device=dev)
    ql = torch.tensor([0, T], dtype=torch.int32, device=dev)
    flops = 4 * H * D * T * T / 2
    for bn in (32, 64):
        for warps in (4, 8):
            f = lambda: paged_attention(qp, cache_p, btp, sl, ql, tsp, stp, bq, D ** -0.5, None, 1, block_n=bn,  # noqa
                                        num_warps=warps)
            ms = triton.testing.do_bench(f, warmup=10, rep=50, return_mode="median")
            print(f"prefill 8k one layer: block_n={bn} warps={warps}: {ms:.3f} ms, {flops / ms / 1e9:.0f} TFLOP/s")


if __name__ == "__main__":
    main()
