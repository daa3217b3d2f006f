"""Fused MoE expert compute in Triton: a grouped GEMM over the (token, k) assignments sorted by expert.

`fused_experts(hidden, w13, w2, topk_weights, topk_ids)` runs five kernels (four up to 256 assignments),
none of which needs the host to look at device data (no .item(), nonzero or data-dependent shape),
so a decode step can be captured in a CUDA graph:

1. Up to 256 assignments (decode): `_align_small_kernel`, one program that sorts them in
   assignment space: with same[i, j] = (id_i == id_j), assignment i's slot is its expert's padded
   start plus the same-expert assignments before it, from [n, n] compares (no per-expert arrays);
   each expert's first assignment writes its segment's padding and block experts.
   More: `_count_kernel` (per chunk of the T*K assignments, how many go to each local expert) then
2. `_place_kernel`: each expert's segment starts at a multiple of BLOCK_M (its count rounded up);
   every assignment gets its slot in `sorted_ids` (the flat index t*K+k, stable within an expert),
   the padding slots get the sentinel T*K, and every BLOCK_M rows get their expert in
   `block_expert` (-1 past the last used block, so those programs do nothing). Buffers are sized
   from the static bound T*K + min(E, T*K) * (BLOCK_M - 1). An id of -1 (an expert on another rank)
   is never placed (same contract for `_align_small_kernel`).
3. `_moe_gemm_kernel` (gated): per (row block, column block), gather the block's token rows of
   hidden and multiply by the block's expert's gate and up rows of w13 at once (two fp32
   accumulators), store silu(gate) * up, in sorted order.
4. `_moe_gemm_kernel` (down): the sorted intermediate rows times w2 of the block's expert, times the
   routing weight, stored at the assignment's row t*K+k.
5. `_sum_k_kernel`: out[t] = sum over k with id >= 0 of those rows, in fp32.

Decode (up to DIRECT_MAX = 64 assignments, when the config has `down_sum`): two kernels. The gated
GEMM runs with DIRECT set: each program sorts the assignments itself (_assignment_slots, the same
arithmetic as _align_small_kernel) and picks its block's rows, so no alignment kernel runs; it
writes the gated rows in assignment order. Then `_down_sum_kernel` multiplies each token's K rows
by their experts' w2 rows and sums them with the routing weights in fp32, writing the output (no
per-assignment rows, no `_sum_k_kernel`). A token's experts' weights are read per token, so this
pays off only while few tokens share an expert (the tuner decides where).

Block sizes come from a small table keyed by assignments per local expert (T*K/E_local: the rows
a typical expert sees; for Qwen3-30B-A3B, E=128 K=8, that is T/16): at batch 1 BLOCK_M=16 and long
K tiles, so each selected expert's weights stream once; from ~256 tokens up BLOCK_M grows to 32..128
and it is a real grouped GEMM. The built-in table (kernels/moe_config.py) is a starting point shaped
after published H200 sweeps of this kernel design for E=128, N=768: `fused_experts` takes a
`MoeKernelConfig` (or a function of the shapes) so a tuner can pass its own, and without one it
first looks for a tuned file for the shape, dtype and GPU (benchmarks/tune_moe.py writes them;
`moe_config.find_config_table`: $MESHSERVE_MOE_CONFIG_DIR, then meshserve/kernels/configs/, which
holds the H200 table for Qwen3-30B-A3B's experts).

The alignment kernels (steps 1-2, and the slot arithmetic the DIRECT GEMM shares) are in
kernels/moe_align.py.

The torch reference is VanillaExperts (layers/moe/experts.py); tests/unit/test_moe_experts.py runs
this under Triton's interpreter on CPU (fp32 with IEEE dots), tests/gpu/test_moe_kernel.py on a GPU.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch
import triton
import triton.language as tl

from meshserve.kernels.moe_config import (  # noqa: F401 - re-exported: callers import them from here
    CONFIG_DIR, CONFIG_DIR_ENV, CONFIG_TABLE, ConfigArg, ConfigTable, GemmConfig, MoeKernelConfig, config_file_name,
    config_from_dict, config_to_dict, default_config, find_config_table, gpu_tag, load_config_table, _table_config)
from meshserve import kernels
from meshserve.kernels.moe_align import _assignment_slots, align_block_size, padded_rows
from meshserve.kernels.pdl import pdl_enter

_INTERPRET = kernels.interpreting()


# ----------------------------------------------------------------------------------------------------
# The grouped GEMMs and the sum over k.

@triton.jit(do_not_specialize=["n_valid", "num_m_blocks"])
def _moe_gemm_kernel(a_ptr, b_ptr, c_ptr, w_ptr, sorted_ptr, block_expert_ptr,
                     N, K, n_valid, num_m_blocks, stride_am, stride_be, stride_bn, stride_cm, up_offset,
                     GATED: tl.constexpr, GATHER_A: tl.constexpr, SCATTER_C: tl.constexpr,
                     MUL_WEIGHT: tl.constexpr, TOPK: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     K_ITERS: tl.constexpr, EVEN_K: tl.constexpr, GROUP_M: tl.constexpr,
                     PRECISION: tl.constexpr, INTERPRET: tl.constexpr, DIRECT: tl.constexpr = 0,
                     USE_PDL: tl.constexpr = False, bs_ptr=None, stride_bse=0, stride_bsn=0,
                     FP8: tl.constexpr = False, BN_Q: tl.constexpr = 128, BK_Q: tl.constexpr = 128):
    """C = A @ B[expert]^T per BLOCK_M rows of the sorted assignments. A rows: the token of each
    assignment (GATHER_A: sorted id // TOPK) or the sorted row itself; C rows: the assignment (SCATTER_C:
    the sorted id, padding rows skipped) or the sorted row. GATED: columns n of B's rows [0, N) (gate)
    and [N, 2N) (up, at up_offset), stored as silu(gate) * up. MUL_WEIGHT: times the routing weight.
    DIRECT (a power of two >= n_valid, or 0): no alignment kernel ran; `sorted_ptr` holds the flat
    expert ids and each program finds its block's rows itself (_assignment_slots, then the
    assignments whose slot falls in the block: [BLOCK_M, DIRECT] compares); decode sizes only.
    FP8: B is float8_e4m3fn with one fp32 scale per [BN_Q, BK_Q] block at bs_ptr ([E, rows / BN_Q,
    K / BK_Q]); BLOCK_K divides BK_Q, so each K tile's product is scaled per output column."""
    pdl_enter(USE_PDL)
    pid = tl.program_id(0)
    num_n_blocks = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n_blocks
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_m_blocks - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if DIRECT > 0:
        id_i, cnt, rank, start, used = _assignment_slots(sorted_ptr, n_valid, DIRECT, DIRECT, BLOCK_M)
        slot = tl.where(id_i >= 0, start + rank, -1)
        match = slot[None, :] == offs_m[:, None]  # [BLOCK_M, DIRECT]: at most one per row
        ii = tl.arange(0, DIRECT)
        found = tl.sum(match.to(tl.int32), axis=1)
        tok = tl.sum(tl.where(match, ii[None, :], 0), axis=1) + tl.where(found > 0, 0, n_valid)
        # every block of a segment holds at least one assignment (padding < BLOCK_M): -1 = unused block
        expert = tl.max(tl.max(tl.where(match, id_i[None, :], -1), axis=1), axis=0)
    else:
        expert = tl.load(block_expert_ptr + pid_m)
        tok = tl.load(sorted_ptr + offs_m)
    if expert >= 0:
        tok_mask = tok < n_valid
        if GATHER_A:
            a_rows = tok // TOPK
        else:
            a_rows = offs_m
        offs_k = tl.arange(0, BLOCK_K)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        a_ptrs = a_ptr + a_rows.to(tl.int64)[:, None] * stride_am + offs_k[None, :]
        b_ptrs = b_ptr + expert.to(tl.int64) * stride_be + offs_n.to(tl.int64)[None, :] * stride_bn + offs_k[:, None]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if FP8:
            s_rows = bs_ptr + expert.to(tl.int64) * stride_bse + (offs_n // BN_Q) * stride_bsn
            s_up_rows = bs_ptr + expert.to(tl.int64) * stride_bse + ((offs_n + N) // BN_Q) * stride_bsn
        # K's trip count is a constexpr: the interpreter cannot range() over a runtime bound.
        for i in range(K_ITERS):
            if EVEN_K:
                a_mask = tok_mask[:, None]
                b_mask = n_mask[None, :]
            else:
                k_ok = offs_k < K - i * BLOCK_K
                a_mask = tok_mask[:, None] & k_ok[None, :]
                b_mask = n_mask[None, :] & k_ok[:, None]
            a = tl.load(a_ptrs, mask=a_mask, other=0.0)
            b = tl.load(b_ptrs, mask=b_mask, other=0.0)
            if INTERPRET:  # the interpreter's dot multiplies bf16's raw bits: give it fp32
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            if FP8:
                kb = (i * BLOCK_K) // BK_Q
                sc = tl.load(s_rows + kb, mask=n_mask, other=0.0)
                acc += tl.dot(a, b.to(a.dtype), input_precision=PRECISION) * sc[None, :]
            else:
                acc = tl.dot(a, b, acc, input_precision=PRECISION)
            if GATED:
                bu = tl.load(b_ptrs + up_offset, mask=b_mask, other=0.0)
                if INTERPRET:
                    bu = bu.to(tl.float32)
                if FP8:
                    sc_up = tl.load(s_up_rows + kb, mask=n_mask, other=0.0)
                    acc_up += tl.dot(a, bu.to(a.dtype), input_precision=PRECISION) * sc_up[None, :]
                else:
                    acc_up = tl.dot(a, bu, acc_up, input_precision=PRECISION)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        if GATED:
            acc = acc / (1.0 + tl.exp(-acc)) * acc_up
        if MUL_WEIGHT:
            acc = acc * tl.load(w_ptr + tok, mask=tok_mask, other=0.0).to(tl.float32)[:, None]
        if SCATTER_C:
            c_rows = tok
            c_mask = tok_mask[:, None] & n_mask[None, :]
        else:
            c_rows = offs_m
            c_mask = n_mask[None, :]
        tl.store(c_ptr + c_rows.to(tl.int64)[:, None] * stride_cm + offs_n[None, :],
                 acc.to(c_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def _sum_k_kernel(c_ptr, ids_ptr, out_ptr, H, stride_cm, stride_om, TOPK: tl.constexpr, BLOCK_H: tl.constexpr,
                  USE_PDL: tl.constexpr = False):
    pdl_enter(USE_PDL)
    t = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = offs < H
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for k in range(TOPK):
        row = t * TOPK + k
        live = (offs * 0 + tl.load(ids_ptr + row)) >= 0  # as a tensor compare (interpreter-safe)
        acc += tl.load(c_ptr + row.to(tl.int64) * stride_cm + offs, mask=h_mask & live, other=0.0).to(tl.float32)
    tl.store(out_ptr + t.to(tl.int64) * stride_om + offs, acc.to(out_ptr.dtype.element_ty), mask=h_mask)


@triton.jit
def _down_sum_step(acc, a, b, s_rows, i, live, n_mask, BLOCK_K: tl.constexpr, FP8: tl.constexpr,
                   BK_Q: tl.constexpr):
    """acc [K_P2, BLOCK_N] += the K tile i's products: b [K_P2, BLOCK_N, BLOCK_K] . a [K_P2, BLOCK_K]."""
    part = tl.sum(b.to(tl.float32) * a[:, None, :], axis=2)
    if FP8:
        part = part * tl.load(s_rows + (i * BLOCK_K) // BK_Q, mask=live[:, None] & n_mask[None, :], other=0.0)
    return acc + part


@triton.jit
def _down_sum_kernel(inter_ptr, w2_ptr, w_ptr, ids_ptr, out_ptr, H, I, stride_im, stride_we, stride_wn, stride_om,
                     TOPK: tl.constexpr, K_P2: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     K_ITERS: tl.constexpr, EVEN_K: tl.constexpr, USE_PDL: tl.constexpr = False,
                     s_ptr=None, stride_se=0, stride_sn=0, FP8: tl.constexpr = False, BN_Q: tl.constexpr = 128,
                     BK_Q: tl.constexpr = 128, EVICT: tl.constexpr = ""):
    """Decode form of the down GEMM and the sum over k at once: out[t, n-block] = sum over k with
    id >= 0 of weight_k * (w2[id_k] rows of the n-block) . inter[t*K+k], in fp32 (inter holds the
    gated rows in assignment order). One program per (token, BLOCK_N output columns); each step
    loads all its experts' [BLOCK_N, BLOCK_K] weight tiles at once ([K_P2, BLOCK_N, BLOCK_K]), so
    enough bytes are in flight for a matrix-vector product to run at bandwidth. EVICT: the weights'
    L2 eviction priority ("evict_first" with kernel_config.l2_prefetch_next_layer: they stream past a
    prefetched weight that must stay)."""
    # With PDL the wait comes first: the ids are the router's output. (The tenth session loaded the ids
    # and the first weight tile before the wait, reasoning that the router had finished before the
    # gated product let this kernel launch; one run of tests/gpu/test_pdl.py on an H100 then hit an
    # illegal memory access in a Qwen3-MoE graph warm-up, which 8 reruns of the same code did not repeat. An address
    # computed from another kernel's output is not loaded early until that is understood.)
    pdl_enter(USE_PDL)
    t = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < H
    kk = tl.arange(0, K_P2)
    rows = t * TOPK + kk
    e = tl.load(ids_ptr + rows, mask=kk < TOPK, other=-1).to(tl.int64)
    wk = tl.load(w_ptr + rows, mask=kk < TOPK, other=0.0).to(tl.float32)
    live = e >= 0
    e = tl.maximum(e, 0)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = inter_ptr + rows.to(tl.int64)[:, None] * stride_im + offs_k[None, :]
    b_ptrs = (w2_ptr + e[:, None, None] * stride_we + offs_n.to(tl.int64)[None, :, None] * stride_wn
              + offs_k[None, None, :])
    acc = tl.zeros([K_P2, BLOCK_N], dtype=tl.float32)
    s_rows = s_ptr
    if FP8:  # [K_P2, BLOCK_N] scale rows of each k's expert (BLOCK_K divides BK_Q)
        s_rows = s_ptr + e[:, None] * stride_se + (offs_n // BN_Q)[None, :] * stride_sn
    if EVEN_K:
        a_mask = live[:, None] & (offs_k < BLOCK_K)[None, :]
    else:
        a_mask = live[:, None] & (offs_k < I)[None, :]
    b = tl.load(b_ptrs, mask=a_mask[:, None, :] & n_mask[None, :, None], other=0.0, eviction_policy=EVICT)
    a = tl.load(a_ptrs, mask=a_mask, other=0.0).to(tl.float32)  # [K_P2, BLOCK_K]
    acc = _down_sum_step(acc, a, b, s_rows, 0, live, n_mask, BLOCK_K, FP8, BK_Q)
    for i in range(1, K_ITERS):
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
        if EVEN_K:
            a_mask = live[:, None] & (offs_k < BLOCK_K)[None, :]
        else:
            a_mask = live[:, None] & (offs_k < I - i * BLOCK_K)[None, :]
        a = tl.load(a_ptrs, mask=a_mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptrs, mask=a_mask[:, None, :] & n_mask[None, :, None], other=0.0, eviction_policy=EVICT)
        acc = _down_sum_step(acc, a, b, s_rows, i, live, n_mask, BLOCK_K, FP8, BK_Q)
    out = tl.sum(acc * wk[:, None], axis=0)
    tl.store(out_ptr + t.to(tl.int64) * stride_om + offs_n, out.to(out_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _gate_up_gemv_kernel(x_ptr, w13_ptr, ids_ptr, out_ptr, H, I, stride_xm, stride_we, stride_wn, stride_om, up_offset,
                         TOPK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_ITERS: tl.constexpr,
                         EVEN_K: tl.constexpr, USE_PDL: tl.constexpr = False, EVICT: tl.constexpr = ""):
    """The gated GEMM of the decode path as matrix-vector products: one program per (assignment a,
    BLOCK_N intermediate columns) multiplies token a // TOPK's hidden row by expert ids[a]'s gate and
    up rows of those columns and writes silu(gate) * up to out[a] (assignment order, as
    direct_gate_up does). No row padding to a dot tile and no sort: while few tokens share an expert
    (batch 1 to ~4) each expert's rows are read once either way, and this reads nothing else.
    Assignments of id -1 (another rank's experts) write nothing (_down_sum_kernel skips them).
    EVICT: the weights' L2 eviction priority, as _down_sum_kernel's."""
    pdl_enter(USE_PDL)  # the ids are the router's, the kernel just before
    a = tl.program_id(0)
    e = tl.load(ids_ptr + a).to(tl.int64)
    if e >= 0:
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < I
        offs_k = tl.arange(0, BLOCK_K)
        x_row = x_ptr + (a // TOPK).to(tl.int64) * stride_xm
        g_rows = w13_ptr + e * stride_we + offs_n.to(tl.int64)[:, None] * stride_wn
        acc_g = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for i in range(K_ITERS):
            k = i * BLOCK_K + offs_k
            if EVEN_K:
                x = tl.load(x_row + k).to(tl.float32)
                wm = n_mask[:, None]
            else:
                x = tl.load(x_row + k, mask=k < H, other=0.0).to(tl.float32)
                wm = n_mask[:, None] & (k < H)[None, :]
            wg = tl.load(g_rows + k[None, :], mask=wm, other=0.0, eviction_policy=EVICT)
            wu = tl.load(g_rows + up_offset + k[None, :], mask=wm, other=0.0, eviction_policy=EVICT)
            acc_g += wg.to(tl.float32) * x[None, :]
            acc_u += wu.to(tl.float32) * x[None, :]
        g = tl.sum(acc_g, axis=1)
        u = tl.sum(acc_u, axis=1)
        y = g / (1.0 + tl.exp(-g)) * u
        tl.store(out_ptr + a.to(tl.int64) * stride_om + offs_n, y.to(out_ptr.dtype.element_ty), mask=n_mask)


def gemv_gate_up(hidden, w13, ids_flat, T, K, I, g: GemmConfig) -> torch.Tensor:
    """The decode path's gated rows [T*K, I] in assignment order by _gate_up_gemv_kernel (g: block_n
    intermediate columns per program, block_k wide steps over H, num_warps)."""
    H = hidden.shape[1]
    inter = torch.empty(T * K, I, dtype=hidden.dtype, device=hidden.device)
    bn = max(1, min(g.block_n, triton.next_power_of_2(I)))
    bk = max(16, min(g.block_k, triton.next_power_of_2(H)))
    extra = {} if _INTERPRET else {"num_warps": g.num_warps}
    _gate_up_gemv_kernel[(T * K, triton.cdiv(I, bn))](
        hidden, w13, ids_flat, inter, H, I, hidden.stride(0), w13.stride(0), w13.stride(1), inter.stride(0),
        I * w13.stride(1), TOPK=K, BLOCK_N=bn, BLOCK_K=bk, K_ITERS=triton.cdiv(H, bk), EVEN_K=H % bk == 0,
        EVICT=kernels.expert_eviction(T), **extra, **kernels.pdl_args())
    return inter


# ----------------------------------------------------------------------------------------------------
# The entry point (its configs and the tuned tables: kernels/moe_config.py).

_DEVICE_NAMES: dict[int, str] = {}


def _device_name(device: torch.device) -> Optional[str]:
    if device.type != "cuda":
        return None
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _DEVICE_NAMES:
        _DEVICE_NAMES[idx] = torch.cuda.get_device_name(idx)
    return _DEVICE_NAMES[idx]


def _fit(g: GemmConfig, n: int, k: int) -> GemmConfig:
    """Tiles no larger than the problem (>= 16, tl.dot's minimum)."""
    return replace(g, block_n=max(16, min(g.block_n, triton.next_power_of_2(n))),
                   block_k=max(16, min(g.block_k, triton.next_power_of_2(k))))


def _fp8_args(scale, block) -> dict:
    if scale is None:
        return {}
    return {"bs_ptr": scale, "stride_bse": scale.stride(0), "stride_bsn": scale.stride(1), "FP8": True,
            "BN_Q": block[0], "BK_Q": block[1]}


def _gemm(a, b, c, weights, sorted_ids, block_expert, n_out, k_in, n_valid, up_offset, g: GemmConfig,
          block_m, gated, gather_a, scatter_c, mul_weight, topk, precision, num_m=None, direct=0,
          scale=None, block=None):
    """direct: see _moe_gemm_kernel (then sorted_ids holds the flat ids and num_m is given);
    scale, block: FP8 weights' block scales [E, rows / bn, K / bk] and (bn, bk)."""
    if num_m is None:
        num_m = block_expert.shape[0]
    if scale is not None:  # each K tile inside one scale block
        g = replace(g, block_k=min(g.block_k, block[1]))
    grid = (num_m * triton.cdiv(n_out, g.block_n),)
    extra = {} if _INTERPRET else {"num_warps": g.num_warps, "num_stages": g.num_stages}
    extra.update(_fp8_args(scale, block))
    _moe_gemm_kernel[grid](
        a, b, c, weights, sorted_ids, block_expert, n_out, k_in, n_valid, num_m,
        a.stride(0), b.stride(0), b.stride(1), c.stride(0), up_offset,
        GATED=gated, GATHER_A=gather_a, SCATTER_C=scatter_c, MUL_WEIGHT=mul_weight, TOPK=topk,
        BLOCK_M=block_m, BLOCK_N=g.block_n, BLOCK_K=g.block_k, K_ITERS=triton.cdiv(k_in, g.block_k),
        EVEN_K=k_in % g.block_k == 0, GROUP_M=g.group_m, PRECISION=precision, INTERPRET=_INTERPRET, DIRECT=direct,
        **extra, **kernels.pdl_args())


DIRECT_MAX = 64  # most assignments of the two-kernel decode path (each GEMM program sorts them all)


def _down_sum(inter, w2, weights, ids, out, T, K, H, I, g: GemmConfig, scale=None, block=None) -> None:
    bn = min(g.block_n, triton.next_power_of_2(H))
    bk = max(16, min(g.block_k, triton.next_power_of_2(I)))
    extra = {} if _INTERPRET else {"num_warps": g.num_warps}
    if scale is not None:
        bk = min(bk, block[1])
        extra.update(s_ptr=scale, stride_se=scale.stride(0), stride_sn=scale.stride(1), FP8=True,
                     BN_Q=block[0], BK_Q=block[1])
    _down_sum_kernel[(T, triton.cdiv(H, bn))](
        inter, w2, weights, ids, out, H, I, inter.stride(0), w2.stride(0), w2.stride(1), out.stride(0),
        TOPK=K, K_P2=triton.next_power_of_2(K), BLOCK_N=bn, BLOCK_K=bk, K_ITERS=triton.cdiv(I, bk),
        EVEN_K=I % bk == 0, EVICT=kernels.expert_eviction(T), **extra, **kernels.pdl_args())


def direct_gate_up(hidden, w13, weights, ids_flat, T, K, E, I, block_m, g: GemmConfig, precision,
                   scale=None, block=None) -> torch.Tensor:
    """The gated GEMM of the two-kernel path: [T*K, I] rows in assignment order (rows of -1 ids unset)."""
    n = T * K
    inter = torch.empty(n, I, dtype=hidden.dtype, device=hidden.device)
    num_m = padded_rows(n, E, block_m) // block_m
    _gemm(hidden, w13, inter, weights, ids_flat, ids_flat, I, hidden.shape[1], n, I * w13.stride(1), g, block_m,
          gated=True, gather_a=True, scatter_c=True, mul_weight=False, topk=K, precision=precision, num_m=num_m,
          direct=max(16, triton.next_power_of_2(n)), scale=scale, block=block)
    return inter


def fused_experts(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, configs: ConfigArg = None, fp8=None) -> torch.Tensor:
    """hidden [T, H]; w13 [E, 2I, H]; w2 [E, H, I] (same dtype as hidden); topk_weights [T, K]
    (float32); topk_ids [T, K] int32/int64 in [0, E) or -1 (skipped). Returns [T, H] in hidden's
    dtype. `configs`: a MoeKernelConfig, or a function (T, K, E, H, I) -> MoeKernelConfig;
    None: default_config. `fp8`: (w13 scales [E, 2I / bn, H / bk], w2 scales [E, H / bn, I / bk],
    (bn, bk)) when w13 and w2 are float8_e4m3fn block-quantised (I a multiple of bn)."""
    T, H = hidden.shape
    E, two_i, _ = w13.shape
    I = two_i // 2
    K = topk_ids.shape[1]
    s13 = s2 = block = None
    if fp8 is not None:
        s13, s2, block = fp8
        if w13.dtype != torch.float8_e4m3fn or w2.dtype != torch.float8_e4m3fn:
            raise ValueError(f"FP8 MoE experts: w13 {w13.dtype}, w2 {w2.dtype}; want float8_e4m3fn")
    elif w13.dtype != hidden.dtype or w2.dtype != hidden.dtype:
        raise ValueError(f"TRITON MoE experts need the weights in the activations' dtype ({hidden.dtype}); "
                         f"got w13 {w13.dtype}, w2 {w2.dtype}")
    out = torch.empty(T, H, dtype=hidden.dtype, device=hidden.device)
    if T == 0 or K == 0:
        return out.zero_()
    if hidden.stride(-1) != 1:
        hidden = hidden.contiguous()
    if w13.stride(-1) != 1:
        w13 = w13.contiguous()
    if w2.stride(-1) != 1:
        w2 = w2.contiguous()
    topk_ids = topk_ids.contiguous()
    weights = topk_weights.to(torch.float32).contiguous()
    if configs is None:
        cfg = default_config(T, K, E, H, I, hidden.dtype, _device_name(hidden.device))
    elif isinstance(configs, MoeKernelConfig):
        cfg = configs
    else:
        cfg = configs(T, K, E, H, I)
    block_m = cfg.block_m
    gate_up, down = _fit(cfg.gate_up, I, H), _fit(cfg.down, H, I)
    if hidden.element_size() >= 4:  # fp32 tiles take twice the shared memory: shorter K tiles, 2 stages
        gate_up, down = (replace(g, block_k=min(g.block_k, 32), num_stages=min(g.num_stages, 2))
                         for g in (gate_up, down))
    # IEEE fp32 dots for fp32 (the CPU tests' exactness); the setting is moot for bf16/fp16 inputs.
    precision = "ieee" if hidden.dtype == torch.float32 or _INTERPRET else "tf32"
    n = T * K

    if cfg.down_sum is not None and n <= DIRECT_MAX:  # decode: two kernels
        ids_flat = topk_ids.view(-1)
        if cfg.gate_up_gemv is not None and s13 is None:
            inter = gemv_gate_up(hidden, w13, ids_flat, T, K, I, cfg.gate_up_gemv)
        else:
            inter = direct_gate_up(hidden, w13, weights, ids_flat, T, K, E, I, block_m, gate_up, precision, s13,
                                   block)
        _down_sum(inter, w2, weights, ids_flat, out, T, K, H, I, cfg.down_sum, s2, block)
        return out

    sorted_ids, block_expert = align_block_size(topk_ids, E, block_m)
    inter = torch.empty(sorted_ids.shape[0], I, dtype=hidden.dtype, device=hidden.device)
    _gemm(hidden, w13, inter, weights, sorted_ids, block_expert, I, H, n, I * w13.stride(1), gate_up,
          block_m, gated=True, gather_a=True, scatter_c=False, mul_weight=False, topk=K, precision=precision,
          scale=s13, block=block)
    per_assignment = torch.empty(n, H, dtype=hidden.dtype, device=hidden.device)
    _gemm(inter, w2, per_assignment, weights, sorted_ids, block_expert, H, I, n, 0, down,
          block_m, gated=False, gather_a=False, scatter_c=True, mul_weight=True, topk=K, precision=precision,
          scale=s2, block=block)
    block_h = min(1024, triton.next_power_of_2(H))
    _sum_k_kernel[(T, triton.cdiv(H, block_h))](per_assignment, topk_ids, out, H, per_assignment.stride(0),
                                                out.stride(0), TOPK=K, BLOCK_H=block_h, **kernels.pdl_args())
    return out
