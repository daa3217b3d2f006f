"""Triton decode kernel for multi-head latent attention (DeepSeek MLA) over the paged latent cache.

The absorbed form of a decode step is multi-query attention with one shared KV "head": each query
row is [q_lat (kv_lora_rank dims), q_pe (qk_rope_head_dim dims)], each cached token is one vector
[c_kv, k_pe] of the same width, the keys are the whole vector and the values its first kv_lora_rank
dims. One program takes BLOCK_H query heads of one sequence (the heads share every K/V load) over
one of `num_splits` ranges of the sequence's keys, with an online softmax in fp32 (flash-decoding);
a second kernel merges the splits by their log-sum-exp. The launch depends only on the batch shape
and device tensors (seq_lens, block_tables), so it can run inside a CUDA graph.

Layouts: q [B, H, L + R]; kv_cache [num_blocks, block_size, L + R]; block_tables [B, max_blocks]
int32; seq_lens [B] int32 (context including the step's token). Returns out [B, H, L] in q's dtype
(and with return_lse, lse [B, H] float32: ln sum_j exp(scale * q . k_j)).
The torch reference is layers/attention/mla.paged_latent_decode.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from meshserve import kernels
from meshserve.kernels.pdl import pdl_enter

LOG2E = 1.4426950408889634
_FITTED: dict = {}  # (device, dtype, tile shape) -> (block_n, num_stages) that fit this GPU


@triton.jit
def _mla_tile(q_nope, q_pe, c_kv, k_pe, valid, m_i, l_i, acc, qk_scale, PRECISION: tl.constexpr):
    """One KV tile of the online softmax: scores of the valid keys (log2 units), running max, sum and
    the value accumulator (values: the latent c_kv)."""
    s = tl.dot(q_nope, tl.trans(c_kv), input_precision=PRECISION)
    s += tl.dot(q_pe, tl.trans(k_pe), input_precision=PRECISION)
    s = tl.where(valid[None, :], s * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every tile has a valid key
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(c_kv.dtype), c_kv, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit(do_not_specialize=["stride_bt"])
def _mla_decode_split_kernel(
    q_ptr, cache_ptr, part_out_ptr, part_lse_ptr, block_tables_ptr, seq_lens_ptr,
    stride_qb, stride_qh, stride_cache_blk, stride_cache_tok, stride_bt, qk_scale,
    NUM_HEADS: tl.constexpr, LORA: tl.constexpr, ROPE: tl.constexpr, L_P2: tl.constexpr, R_P2: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr, NUM_SPLITS: tl.constexpr,
    PRECISION: tl.constexpr, PAGE_TILES: tl.constexpr = False, EVEN_L: tl.constexpr = False,
    EVEN_R: tl.constexpr = False, USE_PDL: tl.constexpr = False,
):
    """Program (sequence b, head block, split s): the split's normalised partial output
    [BLOCK_H, L] and its log-sum-exp (natural log; -inf for an empty split) into the workspace."""
    pdl_enter(USE_PDL)
    b = tl.program_id(0)
    hb = tl.program_id(1)
    split = tl.program_id(2)
    heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    h_valid = heads < NUM_HEADS
    dl = tl.arange(0, L_P2)
    dl_valid = dl < LORA
    dr = tl.arange(0, R_P2)
    dr_valid = dr < ROPE

    seq_len = tl.load(seq_lens_ptr + b)
    chunk = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, seq_len)

    q_row = q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh
    q_nope = tl.load(q_row + dl[None, :], mask=h_valid[:, None] & dl_valid[None, :], other=0.0)
    q_pe = tl.load(q_row + LORA + dr[None, :], mask=h_valid[:, None] & dr_valid[None, :], other=0.0)

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, L_P2], dtype=tl.float32)
    bt_row = block_tables_ptr + b.to(tl.int64) * stride_bt
    rows = tl.arange(0, BLOCK_N)
    tail_start = start
    if PAGE_TILES:
        # A tile of BLOCK_N keys lies in one page (PAGE % BLOCK_N == 0): one block-id load, one base
        # address, consecutive rows, no masks for the split's whole tiles; the last partial tile below.
        num_full = tl.maximum(end - start, 0) // BLOCK_N
        for i in range(num_full):
            n = start + i * BLOCK_N
            blk = tl.load(bt_row + n // PAGE).to(tl.int64)
            tile = cache_ptr + blk * stride_cache_blk + (n % PAGE) * stride_cache_tok + rows[:, None] * stride_cache_tok
            if EVEN_L:
                c_kv = tl.load(tile + dl[None, :])
            else:
                c_kv = tl.load(tile + dl[None, :], mask=dl_valid[None, :], other=0.0)
            if EVEN_R:
                k_pe = tl.load(tile + LORA + dr[None, :])
            else:
                k_pe = tl.load(tile + LORA + dr[None, :], mask=dr_valid[None, :], other=0.0)
            m_i, l_i, acc = _mla_tile(q_nope, q_pe, c_kv, k_pe, rows < BLOCK_N, m_i, l_i, acc, qk_scale, PRECISION)
        tail_start = start + num_full * BLOCK_N
    for n in range(tail_start, end, BLOCK_N):
        pos = n + rows
        pos_valid = pos < end
        blk = tl.load(bt_row + pos // PAGE, mask=pos_valid, other=0).to(tl.int64)
        tok = blk * stride_cache_blk + (pos % PAGE) * stride_cache_tok
        c_kv = tl.load(cache_ptr + tok[:, None] + dl[None, :], mask=pos_valid[:, None] & dl_valid[None, :],
                       other=0.0)
        k_pe = tl.load(cache_ptr + tok[:, None] + LORA + dr[None, :], mask=pos_valid[:, None] & dr_valid[None, :],
                       other=0.0)
        m_i, l_i, acc = _mla_tile(q_nope, q_pe, c_kv, k_pe, pos_valid, m_i, l_i, acc, qk_scale, PRECISION)

    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    row = (b * NUM_HEADS + heads).to(tl.int64) * NUM_SPLITS + split  # [BLOCK_H] rows of the workspace
    tl.store(part_out_ptr + row[:, None] * L_P2 + dl[None, :], out.to(part_out_ptr.dtype.element_ty),
             mask=h_valid[:, None])
    tl.store(part_lse_ptr + row, lse, mask=h_valid)


@triton.jit
def _mla_merge_kernel(part_out_ptr, part_lse_ptr, out_ptr, lse_ptr, stride_ob, stride_oh,
                      NUM_HEADS: tl.constexpr, LORA: tl.constexpr, L_P2: tl.constexpr,
                      NUM_SPLITS: tl.constexpr, S_P2: tl.constexpr, RETURN_LSE: tl.constexpr,
                      USE_PDL: tl.constexpr = False):
    """Program (sequence b, head h): out = sum_s exp(lse_s - lse) out_s, lse = ln sum_s exp(lse_s)."""
    pdl_enter(USE_PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    base = (b * NUM_HEADS + h).to(tl.int64) * NUM_SPLITS
    s = tl.arange(0, S_P2)
    s_valid = s < NUM_SPLITS
    lse_s = tl.load(part_lse_ptr + base + s, mask=s_valid, other=float("-inf"))
    m = tl.max(lse_s, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse_s - m_safe)  # 0 for empty splits
    total = tl.sum(w, 0)
    dl = tl.arange(0, L_P2)
    parts = tl.load(part_out_ptr + (base + s)[:, None] * L_P2 + dl[None, :], mask=s_valid[:, None],
                    other=0.0).to(tl.float32)
    out = tl.sum(w[:, None] * parts, 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + dl, out.to(out_ptr.dtype.element_ty),
             mask=dl < LORA)
    if RETURN_LSE:
        tl.store(lse_ptr + b * NUM_HEADS + h,
                 tl.where(total > 0, m_safe + tl.log(tl.where(total > 0, total, 1.0)), float("-inf")))


def mla_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
               kv_lora_rank: int, scale: float, num_splits: int = 1, return_lse: bool = False,
               block_h: int = 16, block_n: int = 32, num_warps: int = 4, num_stages: int = 2,
               part_dtype: torch.dtype = torch.float32, page_tiles: bool = True):
    """Latent attention of one query token per sequence; see the module docstring for layouts.
    part_dtype: the splits' partial outputs in the workspace (their log-sum-exps stay fp32).
    page_tiles: where a KV tile lies in one page, the unmasked one-block-id tile loop (False: every
    tile gathers its rows' block ids, as before; for A/B sweeps)."""
    B, H, width = q.shape
    rope = width - kv_lora_rank
    if kv_cache.shape[-1] != width or rope < 0:
        raise ValueError(f"mla_decode: q rows of {width} values and cache rows of {kv_cache.shape[-1]} must both be "
                         f"kv_lora_rank ({kv_lora_rank}) + rope dims")
    out = torch.empty(B, H, kv_lora_rank, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, dtype=torch.float32, device=q.device) if return_lse else out  # else a placeholder
    if B == 0:
        return (out, lse) if return_lse else out
    l_p2 = max(16, triton.next_power_of_2(kv_lora_rank))
    r_p2 = max(16, triton.next_power_of_2(max(rope, 1)))
    part_out = torch.empty(B * H * num_splits, l_p2, dtype=part_dtype, device=q.device)
    part_lse = torch.empty(B * H * num_splits, dtype=torch.float32, device=q.device)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    key = (q.device, q.dtype, l_p2, r_p2, block_h, block_n, num_stages)
    block_n, num_stages = _FITTED.get(key, (block_n, num_stages))
    while True:
        try:
            _mla_decode_split_kernel[(B, triton.cdiv(H, block_h), num_splits)](
                q, kv_cache, part_out, part_lse, block_tables, seq_lens,
                q.stride(0), q.stride(1), kv_cache.stride(0), kv_cache.stride(1), block_tables.stride(0),
                scale * LOG2E, NUM_HEADS=H, LORA=kv_lora_rank, ROPE=rope, L_P2=l_p2, R_P2=r_p2, BLOCK_H=block_h,
                BLOCK_N=block_n, PAGE=kv_cache.shape[1], NUM_SPLITS=num_splits, PRECISION=precision,
                PAGE_TILES=page_tiles and kv_cache.shape[1] % block_n == 0, EVEN_L=l_p2 == kv_lora_rank,
                EVEN_R=r_p2 == rope, num_warps=num_warps, num_stages=num_stages, **kernels.pdl_args())
            break
        except OutOfResources:  # e.g. fp32 tiles of 512 latent dims: fewer stages, then smaller KV tiles
            if num_stages > 1:
                num_stages -= 1
            elif block_n > 16:
                block_n //= 2
            else:
                raise
            _FITTED[key] = (block_n, num_stages)
    _mla_merge_kernel[(B, H)](
        part_out, part_lse, out, lse, out.stride(0), out.stride(1), NUM_HEADS=H, LORA=kv_lora_rank, L_P2=l_p2,
        NUM_SPLITS=num_splits, S_P2=max(2, triton.next_power_of_2(num_splits)), RETURN_LSE=return_lse,
        num_warps=4, **kernels.pdl_args())
    return (out, lse) if return_lse else out


def decode_num_splits(num_seqs: int, num_heads: int, max_seq_len: int, num_sms: int, block_n: int = 32,
                      block_h: int = 16, programs_per_sm: int = 4, max_splits: int = 64) -> int:
    """KV splits so a decode step has about `programs_per_sm` programs per SM, at most one per
    BLOCK_N keys of the longest context and at most `max_splits`. (At 2 per SM and at most 16, the
    H200 read an 8k latent cache at 1.54x its floor at batch 64 and 17x at batch 1, where 16 programs
    cannot draw the bandwidth; benchmarks/mla_kernel_sweep.py at batch 1, 8k, Moonlight's 16 heads:
    32 splits 23.2 us, 64 splits 16.5 us, merge included. Batch 64 stays at 8 splits.)"""
    programs = max(1, num_seqs * -(-num_heads // block_h))
    by_len = max(1, -(-max_seq_len // block_n))
    return max(1, min(max_splits, (programs_per_sm * num_sms) // programs, by_len))
