#!/usr/bin/env python
"""The L2 prefetches of batch-1 decode (kernels/prefetch.py) on the GPU, Qwen3-30B-A3B's shapes, bf16,
as CUDA-graph replays of 48 layers' worth of calls on distinct weights (a decode step's pattern:
nothing stays in L2 from the step before), us per layer, with and without PDL:

1. kernel_config.decode_l2_prefetch: decode attention (32 / 4 heads of 128) -> o_proj (4096 -> 2048),
   attention prefetching the o_proj weight; also each kernel alone.
2. kernel_config.l2_prefetch_next_layer: router gate GEMV (2048 -> 128) + top-8 -> the experts at one
   token (gated product + down + sum, the tuned table) -> the next layer's q/k/v GEMV (2048 -> 5120),
   the gate prefetching the q/k/v weight and the experts loading theirs evict-first (experts' weights
   cycle over 8 distinct sets: 8 x 75 MB far exceed L2).

Prints tables, writes JSON.

    python benchmarks/l2_prefetch.py --contexts 128,256,384 --out $OUT/l2_prefetch
"""
import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import kernel_record  # noqa: E402
from cuda_timing import graph_seconds  # noqa: E402
from meshserve import kernels  # noqa: E402
from meshserve.kernels import settings as ks  # noqa: E402
from meshserve.kernels.gemv import gemv  # noqa: E402
from meshserve.kernels.paged_attention import paged_attention, plan_tiles  # noqa: E402
from meshserve.layers.attention.backends.triton import decode_num_splits  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--page", type=int, default=32)
    p.add_argument("--contexts", default="128,256,384")
    p.add_argument("--layers", type=int, default=48)
    p.add_argument("--out", default="out/l2_prefetch")
    a = p.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    H, KVH, D, P, L = a.heads, a.kv_heads, a.head_dim, a.page, a.layers
    splits = decode_num_splits(1, KVH, torch.cuda.get_device_properties(dev).multi_processor_count)
    weights = [torch.randn(a.hidden, H * D, dtype=dt, device=dev) / (H * D) ** 0.5 for _ in range(L)]
    mb = weights[0].numel() * weights[0].element_size() / 1e6
    rows = []
    for ctx in map(int, a.contexts.split(",")):
        nb = -(-ctx // P)
        caches = [torch.randn(2, nb + 1, P, KVH, D, dtype=dt, device=dev) for _ in range(L)]
        bt = torch.arange(1, nb + 1, dtype=torch.int32, device=dev).view(1, nb)
        q = torch.randn(1, H, D, dtype=dt, device=dev)
        s = torch.full((1,), ctx, dtype=torch.int32, device=dev)
        ql = torch.arange(2, dtype=torch.int32, device=dev)
        ts, st = plan_tiles([1], 1, dev)
        ws = [{} for _ in range(L)]

        def attn(i, prefetch):
            return paged_attention(q, caches[i], bt, s, ql, ts, st, 1, D ** -0.5, None, splits, workspace=ws[i],
                                   prefetch=weights[i] if prefetch else None)

        def pair(prefetch):
            return lambda: [gemv(attn(i, prefetch).view(1, H * D), weights[i]) for i in range(L)]

        row = {"context": ctx, "splits": splits, "o_proj_mb": round(mb, 1)}
        row["attention_us"] = graph_seconds(lambda: [attn(i, False) for i in range(L)]) / L * 1e6
        row["attention_prefetching_us"] = graph_seconds(lambda: [attn(i, True) for i in range(L)]) / L * 1e6
        x = torch.randn(1, H * D, dtype=dt, device=dev)
        row["o_proj_us"] = graph_seconds(lambda: [gemv(x, w) for w in weights]) / L * 1e6
        for pdl in (False, True):
            kernels.configure(dataclasses.replace(ks.H200, pdl=pdl))
            try:
                tag = "_pdl" if pdl else ""
                ref, got = pair(False)()[-1], pair(True)()[-1]
                assert torch.equal(ref, got), "the prefetch changed the result"
                row[f"pair{tag}_us"] = graph_seconds(pair(False)) / L * 1e6
                row[f"pair_prefetch{tag}_us"] = graph_seconds(pair(True)) / L * 1e6
            finally:
                kernels.configure(ks.H200)
        rows.append(row)
        print(f"ctx {ctx}: attention {row['attention_us']:.2f} us (prefetching {row['attention_prefetching_us']:.2f}), "
              f"o_proj alone {row['o_proj_us']:.2f}; attention + o_proj {row['pair_us']:.2f} -> "
              f"{row['pair_prefetch_us']:.2f} with the prefetch; under PDL {row['pair_pdl_us']:.2f} -> "
              f"{row['pair_prefetch_pdl_us']:.2f}", flush=True)
        del caches
        torch.cuda.empty_cache()
    router = router_chain(L, a.hidden, H * D + 2 * KVH * D)
    os.makedirs(a.out, exist_ok=True)
    doc = {"rows": rows, "router_chain": router, "layers": L, "kernel_record": kernel_record.local()}
    with open(os.path.join(a.out, "l2_prefetch.json"), "w") as f:
        json.dump(doc, f, indent=1)
    print(f"{'ctx':>5}{'attn':>8}{'attn+pf':>9}{'o_proj':>8}{'pair':>8}{'pair+pf':>9}{'pdl':>8}{'pdl+pf':>8}   us/layer")
    for r in rows:
        print(f"{r['context']:>5}{r['attention_us']:>8.2f}{r['attention_prefetching_us']:>9.2f}{r['o_proj_us']:>8.2f}"
              f"{r['pair_us']:>8.2f}{r['pair_prefetch_us']:>9.2f}{r['pair_pdl_us']:>8.2f}{r['pair_prefetch_pdl_us']:>8.2f}")


def router_chain(L: int, hidden: int, qkv_out: int, E: int = 128, K: int = 8, inter: int = 768,
                 expert_sets: int = 8) -> dict:
    """Part 2: per layer gate GEMV -> router top-k -> experts (one token) -> next q/k/v GEMV, us per layer,
    without and with l2_prefetch_next_layer, without and with PDL."""
    from meshserve.kernels.moe import fused_experts
    from meshserve.kernels.moe_router import router_topk

    dev, dt = torch.device("cuda"), torch.bfloat16
    gates = [torch.randn(E, hidden, dtype=dt, device=dev) / hidden ** 0.5 for _ in range(L)]
    qkvs = [torch.randn(qkv_out, hidden, dtype=dt, device=dev) / hidden ** 0.5 for _ in range(L)]
    w13s = [torch.randn(E, 2 * inter, hidden, dtype=dt, device=dev) / hidden ** 0.5 for _ in range(expert_sets)]
    w2s = [torch.randn(E, hidden, inter, dtype=dt, device=dev) / inter ** 0.5 for _ in range(expert_sets)]
    x = torch.randn(1, hidden, dtype=dt, device=dev)

    def chain(prefetch):
        def run():
            outs = []
            for i in range(L):
                logits = gemv(x, gates[i], prefetch=qkvs[i] if prefetch else None)
                weights, ids = router_topk(logits, K)
                h = fused_experts(x, w13s[i % expert_sets], w2s[i % expert_sets], weights, ids)
                outs.append(gemv(h, qkvs[i]))
            return outs
        return run

    out = {}
    for pdl in (False, True):
        for switch in (False, True):
            kernels.configure(dataclasses.replace(ks.H200, pdl=pdl, l2_prefetch_next_layer=switch))
            try:
                if switch:
                    assert all(torch.equal(p, q) for p, q in zip(chain(True)(), ref)), "the prefetch changed results"
                else:
                    ref = chain(False)()
                out[f"{'pdl_' if pdl else ''}{'prefetch' if switch else 'base'}_us"] = \
                    graph_seconds(chain(switch)) / L * 1e6
            finally:
                kernels.configure(ks.H200)
    alone = {"gate": lambda: [gemv(x, w) for w in gates], "qkv": lambda: [gemv(x, w) for w in qkvs]}
    for name, fn in alone.items():
        out[f"{name}_alone_us"] = graph_seconds(fn) / L * 1e6
    print("router -> experts -> next q/k/v, us per layer: " + ", ".join(f"{k[:-3]} {v:.2f}" for k, v in out.items()),
          flush=True)
    return out


if __name__ == "__main__":
    main()
