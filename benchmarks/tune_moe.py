#!/usr/bin/env python
"""Tune kernels/moe.py's block sizes per token count on this GPU and write the table that
`fused_experts` then loads by itself (kernels/moe.py `find_config_table`).

For each T, at one shape (default Qwen3-30B-A3B's: H 2048, I 768, 128 experts, top-8, bf16) with
uniform random routing: for each row block BLOCK_M that suits T (16 up to ~2 assignments per
expert, growing to 64/128 for prefill sizes), the two grouped GEMMs are timed separately over a
short candidate list of (block_n, block_k, group_m, num_warps, num_stages) (they share only
BLOCK_M, the sorted layout), the best of each is kept, then group_m variations of the winners; the
best (BLOCK_M, gate_up, down) is timed end to end (alignment + GEMMs + sum over k). Up to 64
assignments (T <= 8 at top-8) the two-kernel decode path is tuned too (its self-sorting gated GEMM
over the BLOCK_M=16 tiles, then _down_sum_kernel over DOWN_SUM) and timed end to end against it;
the faster is kept (a config with "down_sum" selects that path). Every timing is
a CUDA-graph replay (benchmarks/cuda_timing.py) of several calls with different routings (so the
experts' weights come from HBM, not L2, as in a model's 48 layers). Configs that do not fit
(OutOfResources) are skipped. The built-in table's config is always a finalist, so the result is
never worse than the default on the tuned T.

Compiles dominate: the candidates are a fixed union over all T (a compiled kernel is reused for
every T: the batch-dependent integers are not specialised), pre-compiled in parallel by --jobs
worker processes (Triton's disk cache then serves the main process). --budget-s stops trying new
candidates once spent (the best so far per T is kept).

    python benchmarks/tune_moe.py --out $OUT/moe_configs          # writes moe_E128_H2048_I768_bf16_H200.json there
    MESHSERVE_MOE_CONFIG_DIR=$OUT/moe_configs python benchmarks/moe_kernel.py --out $OUT/moe_kernel
    cp $OUT/moe_configs/moe_*.json meshserve/kernels/configs/     # to make it the default for this GPU
"""
import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

DEVICE = "cuda"  # --device cpu: a dry run of the script's logic under TRITON_INTERPRET=1 (tiny shapes)
TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
HBM_BPS = 4.8e12 * 0.9  # H200: 4.8 TB/s spec; ~4.3 reachable
PEAK_FLOPS = 790e12  # dense bf16 reachable on an H200 (the figure)

# (block_n, block_k, num_warps, num_stages) per row block; each GEMM (gate_up, down) picks its own.
# gate_up's block_n counts intermediate columns (the program reads block_n gate rows and as many up
# rows). Small row blocks: memory-bound, many narrow programs with deep pipelines; large: GEMM tiles.
CANDIDATES = {
    16: [(16, 256, 4, 3), (32, 128, 4, 4), (32, 256, 4, 3), (64, 128, 4, 4), (64, 256, 4, 3), (128, 128, 4, 3),
         (32, 128, 2, 5)],
    32: [(32, 128, 4, 4), (64, 128, 4, 3), (64, 64, 4, 4), (128, 64, 4, 3), (128, 128, 8, 3)],
    64: [(64, 64, 4, 4), (64, 128, 4, 3), (128, 64, 4, 3), (128, 64, 8, 4), (256, 64, 8, 3)],
    128: [(64, 64, 4, 4), (128, 64, 8, 3), (128, 64, 8, 4), (256, 64, 8, 3), (128, 128, 8, 3)],
}
GROUP_M = (1, 8)  # tried on the winner when there are several row blocks per expert
# The two-kernel decode path (up to kernels/moe.py DIRECT_MAX assignments): the gated GEMM sorting
# its own rows (row block 16, the CANDIDATES[16] tiles), then _down_sum_kernel with (block_n,
# block_k, num_warps): block_n * block_k * K weights per load.
DOWN_SUM = [(8, 128, 4), (4, 256, 4), (8, 256, 8), (4, 512, 8), (2, 256, 2), (8, 256, 4), (2, 128, 2),
            (1, 256, 2), (2, 256, 4), (4, 128, 4), (2, 512, 4), (1, 512, 4)]
# Its gated product as matrix-vector programs (MoeKernelConfig.gate_up_gemv): (block_n intermediate
# columns per program, block_k wide steps over H, num_warps).
GATE_UP_GEMV = [(2, 1024, 4), (4, 512, 4), (4, 1024, 4), (8, 512, 4), (8, 256, 4), (2, 2048, 4), (4, 2048, 8),
                (8, 1024, 8), (16, 256, 4), (1, 2048, 4), (4, 256, 2), (16, 512, 8)]


def block_ms_for(T: int, K: int, E: int) -> list[int]:
    """Row blocks worth trying: around the assignments a typical expert sees."""
    per_expert = T * K / E
    if per_expert <= 2:
        return [16]
    if per_expert <= 8:
        return [16, 32]
    if per_expert <= 16:
        return [16, 32, 64]
    if per_expert <= 48:
        return [32, 64, 128]
    return [64, 128]


def routing(T, E, K, g):
    ids = torch.rand(T, E, device=DEVICE, generator=g).topk(K, dim=-1)[1]
    w = torch.rand(T, K, device=DEVICE, generator=g)
    return w / w.sum(-1, keepdim=True), ids


def PRECISION() -> str:  # noqa: N802 (moot for bf16 on a GPU; the interpreter wants IEEE)
    return "ieee" if DEVICE == "cpu" else "tf32"


def copies_for(T: int) -> int:
    """Routings per graph: enough that the replays touch more weights than fit in L2 (the CPU dry run
    has no L2 to defeat: one)."""
    if DEVICE == "cpu":
        return 1
    return 16 if T <= 2 else 8 if T <= 8 else 4 if T <= 64 else 1


def reps_for(T: int) -> int:
    return 50 if T <= 256 else 20 if T <= 2048 else 8


class Problem:
    """Inputs of one T: hidden rows, R routings, and per row block their alignment and buffers."""

    def __init__(self, T, H, I, E, K, dtype, w13, w2, seed):
        g = torch.Generator(device=DEVICE).manual_seed(seed)
        self.T, self.H, self.I, self.E, self.K = T, H, I, E, K
        self.w13, self.w2 = w13, w2
        self.R = copies_for(T)
        self.x = [torch.randn(T, H, device=DEVICE, dtype=dtype, generator=g) for _ in range(self.R)]
        self.routes = [routing(T, E, K, g) for _ in range(self.R)]
        self.touched = sum(r[1].unique().numel() for r in self.routes) / self.R
        self._aligned = {}

    def aligned(self, bm):
        from meshserve.kernels.moe_align import align_block_size
        if bm not in self._aligned:
            out = []
            for (w, ids) in self.routes:
                sorted_ids, block_expert = align_block_size(ids, self.E, bm)
                inter = torch.empty(sorted_ids.shape[0], self.I, dtype=self.x[0].dtype, device=DEVICE)
                per = torch.empty(self.T * self.K, self.H, dtype=self.x[0].dtype, device=DEVICE)
                out.append((sorted_ids, block_expert, inter, per))
            self._aligned[bm] = out
        return self._aligned[bm]

    def direct_inputs(self, r):
        """(flat ids, gated rows in assignment order, output) of routing r for _down_sum timings."""
        from meshserve.kernels.moe import _table_config, direct_gate_up
        if not hasattr(self, "_direct"):
            self._direct = []
            g = _table_config(1, 1, 1 << 30).gate_up
            for (w, ids), x in zip(self.routes, self.x):
                flat = ids.reshape(-1)
                inter = direct_gate_up(x, self.w13, w, flat, self.T, self.K, self.E, self.I, 16, g, PRECISION())
                self._direct.append((flat, inter, torch.empty_like(x)))
        return self._direct[r]

    def floor_us(self) -> float:
        mem = self.touched * 3 * self.H * self.I * 2 / HBM_BPS
        flops = self.T * self.K * 6 * self.H * self.I / PEAK_FLOPS
        return max(mem, flops) * 1e6


def gemm_call(p: Problem, kind: str, bm: int, g, r: int):
    """A closure launching one kernel of routing r: "gate_up" / "down" (grouped GEMMs after the
    alignment, GemmConfig g), "gate_up_direct" (the two-kernel path's gated GEMM) or "down_sum"."""
    from meshserve.kernels.moe import _down_sum, _fit, _gemm, direct_gate_up
    w, ids = p.routes[r]
    n = p.T * p.K
    if kind == "gate_up_direct":
        g = _fit(g, p.I, p.H)
        flat = ids.reshape(-1)
        return lambda: direct_gate_up(p.x[r], p.w13, w, flat, p.T, p.K, p.E, p.I, bm, g, PRECISION())
    if kind == "gate_up_gemv":
        from meshserve.kernels.moe import gemv_gate_up
        flat = ids.reshape(-1)
        return lambda: gemv_gate_up(p.x[r], p.w13, flat, p.T, p.K, p.I, g)
    if kind == "down_sum":
        flat, inter, out = p.direct_inputs(r)
        return lambda: _down_sum(inter, p.w2, w, flat, out, p.T, p.K, p.H, p.I, g)
    sorted_ids, block_expert, inter, per = p.aligned(bm)[r]
    if kind == "gate_up":
        g = _fit(g, p.I, p.H)
        return lambda: _gemm(p.x[r], p.w13, inter, w, sorted_ids, block_expert, p.I, p.H, n, p.I * p.w13.stride(1),
                             g, bm, gated=True, gather_a=True, scatter_c=False, mul_weight=False, topk=p.K,
                             precision=PRECISION())
    g = _fit(g, p.H, p.I)
    return lambda: _gemm(inter, p.w2, per, w, sorted_ids, block_expert, p.H, p.I, n, 0, g, bm, gated=False,
                         gather_a=False, scatter_c=True, mul_weight=True, topk=p.K, precision=PRECISION())


def time_us(p: Problem, calls) -> float:
    if DEVICE == "cpu":  # dry run: wall time of one eager pass
        t0 = time.perf_counter()
        for c in calls:
            c()
        return (time.perf_counter() - t0) / len(calls) * 1e6
    from cuda_timing import graph_seconds
    return graph_seconds(lambda: [c() for c in calls], reps_for(p.T)) / len(calls) * 1e6


def try_gemm(p, kind, bm, g):
    """us per call, or None if the config does not compile / fit."""
    try:
        return time_us(p, [gemm_call(p, kind, bm, g, r) for r in range(p.R)])
    except Exception as e:  # OutOfResources, compile errors of exotic tiles
        if "out of resource" not in str(e).lower() and "OutOfResources" not in type(e).__name__:
            print(f"    skip {kind} bm={bm} {g}: {type(e).__name__}: {str(e)[:120]}", flush=True)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return None


MAX_CANDIDATES = None  # --max-candidates: the first N of each list (a quicker, coarser sweep)


def candidate_gemms(bm):
    from meshserve.kernels.moe import GemmConfig
    return [GemmConfig(bn, bk, 1, w, s) for bn, bk, w, s in CANDIDATES[bm]][:MAX_CANDIDATES]


def candidate_down_sums():
    from meshserve.kernels.moe import GemmConfig
    return [GemmConfig(bn, bk, 1, w, 1) for bn, bk, w in DOWN_SUM][:MAX_CANDIDATES]


def candidate_gate_up_gemvs():
    from meshserve.kernels.moe import GemmConfig
    return [GemmConfig(bn, bk, 1, w, 1) for bn, bk, w in GATE_UP_GEMV][:MAX_CANDIDATES]


def best_of(p, kind, bm, cands, over):
    """[(us, GemmConfig)] ascending over the distinct candidates that run; stops early past the budget."""
    results, seen = [], set()
    for c in cands:
        if c in seen or (results and over()):
            continue
        seen.add(c)
        us = try_gemm(p, kind, bm, c)
        if us is not None:
            results.append((us, c))
    return sorted(results, key=lambda r: r[0])


# ---- parallel pre-compilation ---------------------------------------------------------------------

def _warm_worker(args):
    """In a fresh process: run each (kind, T, bm, GemmConfig) once at the tuning shape, so Triton's
    disk cache holds the binaries the main process asks for."""
    global DEVICE
    H, I, E, K, dtype_name, items, DEVICE = args
    import torch as t
    from meshserve.kernels.moe import GemmConfig
    dtype = getattr(t, dtype_name)
    w13 = t.zeros(E, 2 * I, H, device=DEVICE, dtype=dtype)
    w2 = t.zeros(E, H, I, device=DEVICE, dtype=dtype)
    done = 0
    probs = {}
    for kind, T, bm, g in items:
        if T not in probs:
            probs[T] = Problem(T, H, I, E, K, dtype, w13, w2, 0)
        try:
            gemm_call(probs[T], kind, bm, GemmConfig(*g), 0)()
            done += 1
        except Exception:
            pass
    if DEVICE == "cuda":
        t.cuda.synchronize()
    return done


def precompile(items, a, dtype):
    if a.jobs <= 1 or not items or DEVICE == "cpu":  # the interpreter (dry run) compiles nothing to cache
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    from dataclasses import astuple
    t0 = time.perf_counter()
    plain = [(kind, T, bm, astuple(g)) for kind, T, bm, g in items]
    chunks = [plain[i::a.jobs] for i in range(a.jobs)]
    dtype_name = str(dtype).replace("torch.", "")
    try:  # an executor, not a Pool: a worker that dies raises here instead of hanging the map
        with ProcessPoolExecutor(a.jobs, mp_context=mp.get_context("spawn")) as pool:
            futures = [pool.submit(_warm_worker, (a.H, a.I, a.E, a.K, dtype_name, c, DEVICE)) for c in chunks if c]
            done = sum(f.result(timeout=max(10.0, a.budget_s * 0.6)) for f in futures)
        print(f"pre-compiled {done}/{len(items)} kernel variants in {a.jobs} processes: "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
    except Exception as e:  # the sweep compiles whatever is missing itself
        print(f"pre-compilation failed ({type(e).__name__}: {e}); compiling in the sweep", flush=True)


# ---- the sweep -------------------------------------------------------------------------------------

def tune(a):
    from meshserve.kernels.moe import (DIRECT_MAX, MoeKernelConfig, config_file_name, config_to_dict,
                                       fused_experts, _table_config)
    import triton
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype]
    H, I, E, K = a.H, a.I, a.E, a.K
    tokens = [int(t) for t in a.tokens.split(",")]
    g = torch.Generator(device=DEVICE).manual_seed(0)
    w13 = (torch.randn(E, 2 * I, H, device=DEVICE, generator=g) * 0.02).to(dtype)
    w2 = (torch.randn(E, H, I, device=DEVICE, generator=g) * 0.02).to(dtype)
    start = time.perf_counter()

    # every kernel variant the sweep may run (kind, a T that compiles it, row block, config):
    # candidates, group_m variants, the built-in table's; the two-kernel path's gated GEMM compiles
    # once per power of two of assignments
    items = []
    for bm in sorted({bm for T in tokens for bm in block_ms_for(T, K, E)}):
        spans = any(T * K / E > bm and bm in block_ms_for(T, K, E) for T in tokens)  # group_m tried
        for cand in candidate_gemms(bm):
            for gm in (GROUP_M if spans else (1,)):
                v = replace(cand, group_m=gm)
                items += [("gate_up", 16, bm, v), ("down", 16, bm, v)]
    direct_ts = {}
    for T in tokens:
        if T * K <= DIRECT_MAX:
            direct_ts.setdefault(max(16, triton.next_power_of_2(T * K)), T)
    for T in direct_ts.values():
        items += [("gate_up_direct", T, 16, c) for c in candidate_gemms(16)]
    if direct_ts:
        items += [("down_sum", 1, 16, c) for c in candidate_down_sums()]
        items += [("gate_up_gemv", 1, 16, c) for c in candidate_gate_up_gemvs()]
    for T in tokens:
        d = _table_config(T, K, E)
        items += [("gate_up", 16, d.block_m, d.gate_up), ("down", 16, d.block_m, d.down)]
    items = list(dict.fromkeys(items))
    precompile(items, a, dtype)

    rows, table = [], {}
    for T in tokens:
        t_start = time.perf_counter()
        p = Problem(T, H, I, E, K, dtype, w13, w2, seed=T)
        default = _table_config(T, K, E)
        over = lambda: time.perf_counter() - start > a.budget_s  # noqa: E731
        best = {}  # bm -> (gate_up (us, cfg), down (us, cfg))
        for bm in sorted(set(block_ms_for(T, K, E)) | {default.block_m}):
            per_kind = {}
            for kind in ("gate_up", "down"):
                own = default.gate_up if kind == "gate_up" else default.down
                cands = [own] if bm == default.block_m else []
                prev = table.get(tokens[tokens.index(T) - 1]) if tokens.index(T) else None
                if prev is not None and prev.block_m == bm:
                    cands.append(prev.gate_up if kind == "gate_up" else prev.down)
                cands += candidate_gemms(bm)
                results = []
                seen = set()
                for c in cands:
                    if c in seen or (results and over()):
                        continue
                    seen.add(c)
                    us = try_gemm(p, kind, bm, c)
                    if us is not None:
                        results.append((us, c))
                if not results:
                    continue
                results.sort(key=lambda r: r[0])
                # group_m matters once an expert spans several row blocks: try it on the best
                if T * K / E > bm and not over():
                    for _, c in results[:1]:
                        for gm in GROUP_M:
                            v = replace(c, group_m=gm)
                            if v not in seen:
                                seen.add(v)
                                us = try_gemm(p, kind, bm, v)
                                if us is not None:
                                    results.append((us, v))
                    results.sort(key=lambda r: r[0])
                per_kind[kind] = results[0]
            if len(per_kind) == 2:
                best[bm] = (per_kind["gate_up"], per_kind["down"])
        if best:
            bm = min(best, key=lambda b: best[b][0][0] + best[b][1][0])
            cfg = MoeKernelConfig(bm, best[bm][0][1], best[bm][1][1])
        else:  # nothing ran (cannot happen with the built-in config among the candidates)
            cfg = default
        finalists = [cfg]
        two = None
        if T * K <= DIRECT_MAX:  # the two-kernel path: its gated GEMM and _down_sum_kernel
            gu = best_of(p, "gate_up_direct", 16, ([default.gate_up] if default.down_sum else [])
                         + candidate_gemms(16), over)
            ds = best_of(p, "down_sum", 16, ([default.down_sum] if default.down_sum else [])
                         + candidate_down_sums(), over)
            gv = best_of(p, "gate_up_gemv", 16, ([default.gate_up_gemv] if default.gate_up_gemv else [])
                         + candidate_gate_up_gemvs(), over)
            if gu and ds:
                two = (gu[0][0], ds[0][0], gv[0][0] if gv else None)
                finalists.append(MoeKernelConfig(16, gu[0][1], cfg.down if cfg.block_m == 16 else default.down,
                                                 down_sum=ds[0][1]))
                if gv:  # the same with the gated product as GEMVs
                    finalists.append(replace(finalists[-1], gate_up_gemv=gv[0][1]))
        if default not in finalists:
            finalists.append(default)

        def whole(c):
            return time_us(p, [(lambda r=r: fused_experts(p.x[r], w13, w2, p.routes[r][0], p.routes[r][1],
                                                          configs=c)) for r in range(p.R)])
        timed = [(whole(c), i, c) for i, c in enumerate(finalists)]
        us_default = next(t for t, _, c in timed if c == default)
        us, _, cfg = min(timed)  # end to end: alignment and the sum over k count too
        table[T] = cfg
        floor = p.floor_us()
        rows.append({"T": T, "us": us, "default_us": us_default, "floor_us": floor,
                     "gemm_us": {str(b): [v[0][0], v[1][0]] for b, v in best.items()}, "two_kernel_us": two,
                     "finalists_us": [[round(t, 2), describe(c)] for t, _, c in timed],
                     "config": config_to_dict(cfg), "seconds": time.perf_counter() - t_start})
        print(f"T={T:>5}  {us:8.1f} us (default {us_default:8.1f}, floor {floor:7.1f}, x{us / floor:4.2f})  "
              f"{describe(cfg)}  [{time.perf_counter() - t_start:.1f} s]", flush=True)

    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    out = a.out if a.out.endswith(".json") else os.path.join(a.out, config_file_name(E, H, I, dtype, name))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    doc = {"format": "meshserve-moe-configs", "version": 1, "E": E, "H": H, "I": I, "K": K,
           "dtype": str(dtype).replace("torch.", ""), "device": name, "tuned_s": time.perf_counter() - start,
           "configs": {str(r["T"]): dict(r["config"], us=round(r["us"], 2), default_us=round(r["default_us"], 2),
                                         floor_us=round(r["floor_us"], 2), finalists_us=r["finalists_us"])
                       for r in rows}}
    if a.merge:  # keep the other token counts' entries of an existing table (e.g. the checked-in one)
        with open(a.merge) as f:
            old = json.load(f)
        if (old.get("E"), old.get("H"), old.get("I")) != (E, H, I):
            raise SystemExit(f"--merge {a.merge}: shape E{old.get('E')} H{old.get('H')} I{old.get('I')} is not "
                             f"the tuned E{E} H{H} I{I}")
        doc["configs"] = dict(old["configs"], **doc["configs"])
        doc["configs"] = {t: doc["configs"][t] for t in sorted(doc["configs"], key=int)}
        doc["merged_from"] = a.merge
    with open(out, "w") as f:
        json.dump(doc, f, indent=1)
    print()
    print(f"{'T':>6} {'best config':<62} {'us':>9} {'default':>9} {'floor':>8}")
    for r in rows:
        from meshserve.kernels.moe import config_from_dict
        print(f"{r['T']:>6} {describe(config_from_dict(r['config'])):<62} {r['us']:9.1f} {r['default_us']:9.1f} "
              f"{r['floor_us']:8.1f}")
    print(f"\nwrote {out} ({time.perf_counter() - start:.0f} s)")
    # check: the file loads and picks these configs
    from meshserve.kernels.moe import load_config_table
    t = load_config_table(out)
    assert all(t(T, K) == table[T] for T in table), "config file does not round-trip"
    return out


def describe(cfg) -> str:
    def one(g):
        return f"{g.block_n}x{g.block_k} g{g.group_m} w{g.num_warps} s{g.num_stages}"
    if cfg.down_sum is not None:  # the two-kernel path (where it applies)
        g = cfg.gate_up_gemv
        gated = f"gu_gemv[{g.block_n}x{g.block_k} w{g.num_warps}]" if g else f"gu[{one(cfg.gate_up)}]"
        return f"bm{cfg.block_m} {gated} down_sum[{cfg.down_sum.block_n}x{cfg.down_sum.block_k} " \
               f"w{cfg.down_sum.num_warps}]"
    return f"bm{cfg.block_m} gu[{one(cfg.gate_up)}] dn[{one(cfg.down)}]"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/moe_configs", help="a .json path, or a directory (canonical file name)")
    p.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    p.add_argument("--H", type=int, default=2048)
    p.add_argument("--I", type=int, default=768)
    p.add_argument("--E", type=int, default=128)
    p.add_argument("--K", type=int, default=8)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--merge", default=None,
                   help="an existing table of this shape: its entries for the token counts not tuned here are kept")
    p.add_argument("--jobs", type=int, default=8, help="processes pre-compiling the candidates (0: none)")
    p.add_argument("--budget-s", type=float, default=140.0, help="stop trying new candidates after this")
    p.add_argument("--max-candidates", type=int, default=None, help="the first N tiles of each candidate list")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help=argparse.SUPPRESS)
    a = p.parse_args()
    global DEVICE, MAX_CANDIDATES
    DEVICE, MAX_CANDIDATES = a.device, a.max_candidates
    if DEVICE == "cuda" and not torch.cuda.is_available():
        sys.exit("tune_moe.py needs a CUDA GPU")
    if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("--device cpu is a dry run under Triton's interpreter: set TRITON_INTERPRET=1")
    if DEVICE == "cpu":
        a.jobs = 0
    tune(a)


if __name__ == "__main__":
    main()
