"""Skinny GEMM (y = x @ W^T with few rows of x) for decode steps at small batch.

At batch 1 a decode step is a chain of matrix-vector products that read every weight once; its
time is bytes / bandwidth. cuBLAS reaches ~82% of the H200's bandwidth on these shapes
(benchmarks/gemv.py). This kernel gives each program a few output rows over the whole K (no
split-K, so no second reduction kernel inside the CUDA graph) and lets many small programs per SM
keep enough loads in flight. The torch reference is `F.linear`; tests compare the two.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from meshserve import kernels
from meshserve.kernels.moe_router import route_constexprs, route_rows
from meshserve.kernels.pdl import pdl_enter
from meshserve.kernels import prefetch as pf
from meshserve.kernels.prefetch import l2_prefetch


@triton.jit
def _w_tile(w_rows, k, n_mask, m_mask, K, EVEN_K: tl.constexpr):
    """The weight tile of K columns `k` and the mask of x's tile there."""
    if EVEN_K:
        xm = m_mask[:, None]  # K is a multiple of the tile
        w = tl.load(w_rows + k[None, :], mask=n_mask[:, None], other=0.0)
    else:
        km = k < K
        xm = m_mask[:, None] & km[None, :]
        w = tl.load(w_rows + k[None, :], mask=n_mask[:, None] & km[None, :], other=0.0)
    return w, xm


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                 HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, K_ITERS: tl.constexpr, EVEN_K: tl.constexpr,
                 USE_PDL: tl.constexpr = False, pf_ptr=None, pf_bytes=0, PREFETCH: tl.constexpr = False):
    pid = tl.program_id(0)
    if PREFETCH:  # another kernel's weights into L2 (kernels/prefetch.py): no kernel writes them
        l2_prefetch(pf_ptr, pf_bytes, pid, tl.num_programs(0))
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    m_mask = offs_m < M
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
    # K's trip count is a constexpr: Triton's interpreter (CPU tests) cannot range() over a runtime
    # bound, and a model has only a few distinct K. The first K tile is peeled: with PDL its weights
    # load while the kernel before is finishing (no kernel writes weights), then x after the wait.
    w, xm = _w_tile(w_rows, offs_k, n_mask, m_mask, K, EVEN_K)
    pdl_enter(USE_PDL)
    x = tl.load(x_rows + offs_k[None, :], mask=xm, other=0.0)
    acc += x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
    for i in range(1, K_ITERS):
        k = i * BLOCK_K + offs_k
        w, xm = _w_tile(w_rows, k, n_mask, m_mask, K, EVEN_K)
        x = tl.load(x_rows + k[None, :], mask=xm, other=0.0)
        acc += x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
    y = tl.sum(acc, axis=2)  # [BLOCK_M, BLOCK_N]
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], y.to(y_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


def _config(m: int, n: int, k: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps), from the sweeps in benchmarks/gemv.py on the H200: 4 warps
    throughout. Weights of up to 12M elements at one row (the MoE models' attention projections
    and router gates): 2 output rows per program over 2048-wide K tiles (1024 past K = 2048), which
    keeps enough programs in flight (Qwen3-30B-A3B o_proj 7.4 -> 6.7 us, gate 3.1 -> 2.1; Moonlight
    kv_a 3.4 -> 2.7). Larger weights (the 8B's): 1024-wide K tiles, 8 rows when N <= 4096, else 4."""
    if m == 1 and n * k <= 12 * 2**20:
        return 2, min(2048 if k <= 2048 else 1024, triton.next_power_of_2(k)), 4
    block_k = min(1024 // max(1, m), triton.next_power_of_2(k))
    return (8 if n <= 4096 else 4), max(64, block_k), 4


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         config: tuple[int, int, int] | None = None, prefetch: torch.Tensor | None = None) -> torch.Tensor:
    """x: [M, K] (M small), weight: [N, K] contiguous rows. Returns [M, N] in x's dtype.
    prefetch: a weight another kernel reads soon; the programs first ask for it in L2."""
    m, k = x.shape
    n = weight.shape[0]
    if x.stride(-1) != 1:
        x = x.contiguous()
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    block_n, block_k, warps = config or _config(m, n, k)
    block_m = triton.next_power_of_2(m)
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, weight, bias if bias is not None else weight, y, m, n, k, x.stride(0), weight.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        K_ITERS=triton.cdiv(k, block_k), EVEN_K=k % block_k == 0, num_warps=warps, **kernels.pdl_args(),
        **pf.launch_args(prefetch))
    return y


# Above this many weight elements cuBLAS is as fast or faster at one row (8B gate_up: 55 vs 58 us;
# lm_head: equal); below it the kernel wins (8B qkv 14.8 vs 15.8 us, o 10.5 vs 12.4, down 29.5 vs
# 30.5; every Qwen3-0.6B shape by 10-30%). benchmarks/gemv.py, H200, 2026-12-01.
MAX_WEIGHT_ELEMENTS = 64 * 2**20


def use_gemv(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a linear of this input should take the kernel: CUDA, half precision, few rows,
    a weight small enough that the kernel beats cuBLAS."""
    return (x.is_cuda and x.dim() == 2 and 0 < x.shape[0] <= kernels.GEMV_MAX_M
            and x.dtype in (torch.bfloat16, torch.float16) and weight.dtype == x.dtype
            and weight.stride(-1) == 1 and weight.numel() <= MAX_WEIGHT_ELEMENTS)


# ---- RMSNorm fused into the GEMV that reads its output (one decode row) ---------------------------
# At batch 1 a decoder layer's two norms are kernels of their own, each a launch and a gap in the
# step's chain for 2048 numbers. `norm_gemv` computes the residual add and the norm in every program
# of the skinny GEMM that consumes them (the vector is 4-8 KB, read from L2), and program 0 writes
# the new residual (and the normed vector when another op needs it: the experts). With `route`, the
# GEMM is the MoE router's gate and the program that finishes last (a counter, reset by it) runs the
# router's top-k on the finished logits (kernels/moe_router.py route_rows): norm, gate and router in
# one launch instead of three.
MAX_NORM_K = 4096  # the whole row in one K tile


@triton.jit
def _norm_gemv_kernel(x_ptr, res_ptr, nw_ptr, w_ptr, b_ptr, y_ptr, res_out_ptr, h_ptr, N, K, stride_wn, eps,
                      cnt_ptr, rbias_ptr, rw_ptr, rids_ptr, rscale,
                      HAS_RES: tl.constexpr, WRITE_H: tl.constexpr, HAS_BIAS: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ROUTE: tl.constexpr,
                      E_P2: tl.constexpr, TOPK: tl.constexpr, K_P2: tl.constexpr, SIGMOID: tl.constexpr,
                      R_HAS_BIAS: tl.constexpr, RENORM: tl.constexpr, SCALE: tl.constexpr,
                      N_GROUP: tl.constexpr, NG_P2: tl.constexpr, TOPK_GROUP: tl.constexpr,
                      GROUP_SIZE: tl.constexpr, USE_PDL: tl.constexpr = False, pf_ptr=None, pf_bytes=0,
                      PREFETCH: tl.constexpr = False):
    pid = tl.program_id(0)
    if PREFETCH:  # another kernel's weights into L2 (kernels/prefetch.py): no kernel writes them
        l2_prefetch(pf_ptr, pf_bytes, pid, tl.num_programs(0))
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    k_mask = offs_k < K
    # weights first (no kernel writes them: with PDL this load overlaps the kernel before), then the row
    w = tl.load(w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn + offs_k[None, :],
                mask=n_mask[:, None] & k_mask[None, :], other=0.0)
    pdl_enter(USE_PDL)
    x = tl.load(x_ptr + offs_k, mask=k_mask, other=0.0)
    if HAS_RES:  # as kernels/fused.py's RMSNorm: the sum rounded as a torch add, the norm in fp32
        r = tl.load(res_ptr + offs_k, mask=k_mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        if pid == 0:
            tl.store(res_out_ptr + offs_k, x, mask=k_mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / K + eps)
    nw = tl.load(nw_ptr + offs_k, mask=k_mask, other=0.0)
    h = ((xf * rstd).to(x.dtype).to(tl.float32) * nw.to(tl.float32)).to(x.dtype)
    if WRITE_H:
        if pid == 0:
            tl.store(h_ptr + offs_k, h, mask=k_mask)
    y = tl.sum(h.to(tl.float32)[None, :] * w.to(tl.float32), axis=1)
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=n_mask)
    if ROUTE:
        # the last program to finish routes: every thread's stores before the barrier, the counter's
        # release after it (the CUTLASS semaphore's order); the winner's acquire before its loads
        tl.debug_barrier()
        done = tl.atomic_add(cnt_ptr, 1, sem="acq_rel")
        if done == tl.num_programs(0) - 1:
            e = tl.arange(0, E_P2)
            e_ok = e < N
            logits = tl.load(y_ptr + e, mask=e_ok, other=0.0, volatile=True).to(tl.float32)[None, :]
            rw, rids = route_rows(logits, rbias_ptr, rscale, e, e_ok, 1, E_P2, TOPK, K_P2, SIGMOID, R_HAS_BIAS,
                                  RENORM, SCALE, N_GROUP, NG_P2, TOPK_GROUP, GROUP_SIZE)
            kk = tl.arange(0, K_P2)[None, :]
            tl.store(rw_ptr + kk, rw, mask=kk < TOPK)
            tl.store(rids_ptr + kk, rids.to(tl.int64), mask=kk < TOPK)
            tl.atomic_xchg(cnt_ptr, 0)  # ready for the next launch (CUDA-graph replays)


_NO_ROUTE = route_constexprs(1, 1, sigmoid=False, renormalize=False, has_bias=False, n_group=None, topk_group=None,
                             scale=1.0)


def norm_gemv_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """One row of K <= MAX_NORM_K, a weight the skinny GEMM takes, both in x's half precision (or fp32
    under the interpreter)."""
    return (x.dim() == 2 and x.shape[0] == 1 and x.shape[1] <= MAX_NORM_K and weight.dim() == 2
            and weight.shape[1] == x.shape[1] and weight.dtype == x.dtype and weight.stride(-1) == 1
            and weight.numel() <= MAX_WEIGHT_ELEMENTS)


def norm_gemv(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
              weight: torch.Tensor, bias: torch.Tensor | None = None, *, want_h: bool = False, route=None,
              config: tuple[int, int] | None = None, prefetch: torch.Tensor | None = None):
    """For one row x [1, K]: s = x + residual (x without one), h = RMSNorm(s) * norm_weight, y = h @ W^T.

    Returns (y [1, N], s, h or None): s in a new tensor (`residual` is not written), h only with
    `want_h`. `route`: (counter int32 [1] zeroed, RouterConfig-derived constexprs from
    moe_router.route_constexprs, bias or None, scale, ids_out or None): y are router logits and the
    result's y is (weights fp32 [1, K], ids int64 [1, K]) instead. `config`: (BLOCK_N, num_warps), for
    sweeps (benchmarks/norm_gemv.py); by default the skinny GEMM's rule. `prefetch`: as gemv's."""
    k = x.shape[1]
    n = weight.shape[0]
    if x.stride(-1) != 1:
        x = x.contiguous()
    if residual is not None and residual.stride(-1) != 1:
        residual = residual.contiguous()
    y = torch.empty((1, n), dtype=x.dtype, device=x.device)
    res_out = torch.empty_like(x) if residual is not None else x
    h = torch.empty_like(x) if want_h else x
    block_k = triton.next_power_of_2(k)
    if config is not None:
        block_n, warps = config
    else:
        block_n, _, warps = _config(1, n, k)
        block_n = max(1, min(block_n, 8192 // block_k))  # the whole row's tile stays in registers
    meta = _NO_ROUTE  # placeholders: the routing epilogue is not compiled
    counter, rbias, rscale, rw, rids = x, x, 1.0, y, y
    if route is not None:
        counter, meta, rbias, rscale, ids_out = route
        rw = torch.empty((1, meta["TOPK"]), dtype=torch.float32, device=x.device)
        rids = ids_out if ids_out is not None else torch.empty((1, meta["TOPK"]), dtype=torch.int64,
                                                               device=x.device)
        rbias = rbias if rbias is not None else x
    meta = dict(meta)
    meta["R_HAS_BIAS"] = meta.pop("HAS_BIAS")
    _norm_gemv_kernel[(triton.cdiv(n, block_n),)](
        x, residual if residual is not None else x, norm_weight, weight, bias if bias is not None else weight, y,
        res_out, h, n, k, weight.stride(0), eps, counter, rbias, rw, rids, float(rscale),
        HAS_RES=residual is not None, WRITE_H=want_h, HAS_BIAS=bias is not None, BLOCK_N=block_n,
        BLOCK_K=block_k, ROUTE=route is not None, num_warps=warps, **meta, **kernels.pdl_args(),
        **pf.launch_args(prefetch))
    out = (rw, rids) if route is not None else y
    return out, res_out, (h if want_h else None)
