"""Triton paged attention for prefill, chunked prefill and decode in one kernel, plus the KV write.

One program handles a tile of BLOCK_Q query tokens of one sequence for one kv head, with all the
query heads that share that kv head stacked into the tile's rows (GQA-aware: K/V are read once
per group). It walks the sequence's KV through its block table with an online softmax (fp32).
For long decode contexts the KV range is split over `num_splits` programs whose partial results
are merged by log-sum-exp (flash-decoding) by whichever split finishes last, so a batch of one
still fills the GPU in a single launch. Everything the launch needs is on the device or fixed by the batch shape, so decode steps
can be captured in CUDA graphs. The torch reference (layers/attention/backends/torch.py) is the oracle;
the Triton attention backend (layers/attention/backends/triton.py) plans the tiles and launches it.

With RETURN_LSE it also stores each query row's log-sum-exp (for merging partial attentions).

Layouts: q/out [T, H, D]; kv_cache [2, num_blocks, block_size, KVH, D]; block_tables [B, max_blocks];
query_start_loc [B+1]; seq_lens [B] (context incl. this step's tokens); lse [T, H] float32.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from meshserve import kernels
from meshserve.kernels.fp8_gemm import to_cache
from meshserve.kernels.fused import _rotate, _rotate_operands
from meshserve.kernels.pdl import pdl_enter
from meshserve.kernels import prefetch as pf
from meshserve.kernels.prefetch import l2_prefetch
from meshserve.kernels.settings import H200, KernelSettings


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, cache_ptr, slot_ptr, stride_kt, stride_vt, stride_cache_kv, k_mul, v_mul,
                     ROW: tl.constexpr, ROW_P2: tl.constexpr, USE_PDL: tl.constexpr = False):
    pdl_enter(USE_PDL)
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    offs = tl.arange(0, ROW_P2)
    mask = offs < ROW
    k = tl.load(k_ptr + t * stride_kt + offs, mask=mask)
    v = tl.load(v_ptr + t * stride_vt + offs, mask=mask)
    dst = cache_ptr + slot * ROW + offs
    tl.store(dst, to_cache(k.to(tl.float32) * k_mul, cache_ptr), mask=mask)
    tl.store(dst + stride_cache_kv, to_cache(v.to(tl.float32) * v_mul, cache_ptr), mask=mask)


def store_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
             k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """k, v: [T, KVH, D] -> kv_cache[0/1] at the slots (block * block_size + offset), divided by
    k_scale / v_scale (an FP8 cache's calibrated scales; 1 otherwise)."""
    T = slot_mapping.shape[0]
    if T == 0:
        return
    row = k.shape[1] * k.shape[2]
    k2, v2 = k.reshape(k.shape[0], row), v.reshape(v.shape[0], row)
    _store_kv_kernel[(T,)](k2, v2, kv_cache, slot_mapping, k2.stride(0), v2.stride(0), kv_cache.stride(0),
                           1.0 / k_scale, 1.0 / v_scale, ROW=row, ROW_P2=triton.next_power_of_2(row), **kernels.pdl_args())


@triton.jit
def _attn_tile(q, m_i, l_i, acc, start, kv_end, q_pos, k_base, v_base, bt_row_ptr, stride_cache_blk,
               stride_cache_tok, qk_scale, d, d_valid,
               BLOCK_N: tl.constexpr, PAGE: tl.constexpr, WINDOW: tl.constexpr, MASK: tl.constexpr,
               EVEN_D: tl.constexpr, PRECISION: tl.constexpr):
    """One KV tile of the online softmax. MASK=False: every key is visible to every row (tiles
    wholly before the causal diagonal), so no bounds or causal mask is computed."""
    pos = start + tl.arange(0, BLOCK_N)
    if MASK:
        pos_valid = pos < kv_end
        blk = tl.load(bt_row_ptr + pos // PAGE, mask=pos_valid, other=0).to(tl.int64)
        kv_mask = pos_valid[:, None] & d_valid[None, :]
    else:
        blk = tl.load(bt_row_ptr + pos // PAGE).to(tl.int64)
        kv_mask = d_valid[None, :]
    tok_off = blk * stride_cache_blk + (pos % PAGE) * stride_cache_tok
    if EVEN_D and not MASK:
        k = tl.load(k_base + tok_off[:, None] + d[None, :])
    else:
        k = tl.load(k_base + tok_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
    k = k.to(q.dtype)  # an FP8 cache (kv_cache_config.dtype fp8): upcast in registers
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
    if MASK:
        allowed = pos_valid[None, :] & (pos[None, :] <= q_pos[:, None])
        if WINDOW > 0:
            allowed &= pos[None, :] > (q_pos[:, None] - WINDOW)
        s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if EVEN_D and not MASK:
        v = tl.load(v_base + tok_off[:, None] + d[None, :])
    else:
        v = tl.load(v_base + tok_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
    v = v.to(q.dtype)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _rope_rows(q_rows, pos, row_valid, d, cos_ptr, sin_ptr, stride_cos, qw_ptr, eps, HEAD_DIM: tl.constexpr,
               HALF: tl.constexpr, QK_NORM: tl.constexpr):
    """A decode tile's q rows [BLOCK_M, D_P2] (q_rows: each row's head start), rotated at each
    row's position `pos` (its token's; 0 for invalid rows), normalised first when QK_NORM."""
    dd = d[None, :]
    first, rot, pidx, cos, sin, wx, wp = _rotate_operands(pos[:, None], dd, cos_ptr, sin_ptr, stride_cos, qw_ptr,
                                                          HEAD_DIM, HALF, QK_NORM)
    m = row_valid[:, None] & (dd < HEAD_DIM)
    return _rotate(tl.load(q_rows + dd, mask=m, other=0.0), tl.load(q_rows + pidx, mask=m & rot, other=0.0), cos,
                   sin, wx, wp, rot, first, eps, 1, HEAD_DIM, QK_NORM)


@triton.jit
def _rope_store_new(k_row, v_row, head_cache, slot, pos, d, cos_ptr, sin_ptr, stride_cos, kw_ptr, eps,
                    stride_cache_kv, stride_cache_blk, stride_cache_tok, k_mul, v_mul, PAGE: tl.constexpr,
                    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, QK_NORM: tl.constexpr):
    """This step's token of one kv head: k normalised (QK_NORM) and rotated, v as is, both into the
    paged cache at `slot` (scaled by k_mul / v_mul and cast as kernels/fused.py writes them)."""
    first, rot, pidx, cos, sin, wx, wp = _rotate_operands(pos, d, cos_ptr, sin_ptr, stride_cos, kw_ptr, HEAD_DIM,
                                                          HALF, QK_NORM)
    dm = d < HEAD_DIM
    y = _rotate(tl.load(k_row + d, mask=dm, other=0.0), tl.load(k_row + pidx, mask=dm & rot, other=0.0), cos, sin,
                wx, wp, rot, first, eps, 0, HEAD_DIM, QK_NORM)
    dst = head_cache + (slot // PAGE) * stride_cache_blk + (slot % PAGE) * stride_cache_tok + d
    v = tl.load(v_row + d, mask=dm, other=0.0)
    tl.store(dst + stride_cache_kv, to_cache(v.to(tl.float32) * v_mul, head_cache), mask=dm)
    tl.store(dst, to_cache(y.to(tl.float32) * k_mul, head_cache), mask=dm)


# Integer arguments that change from step to step are not specialized (Triton would otherwise
# compile a variant per "divisible by 16" / "equal to 1" pattern, ~0.5 s each, mid-serving).
@triton.jit(do_not_specialize=["stride_bt"])
def _attn_kernel(
    q_ptr, cache_ptr, out_ptr, lse_ptr, part_acc_ptr, part_ml_ptr, counter_ptr,
    block_tables_ptr, seq_lens_ptr, query_start_loc_ptr, tile_seq_ptr, tile_start_ptr, qpos_ptr,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cache_kv, stride_cache_blk, stride_cache_tok, stride_cache_head,
    stride_bt, scale,
    GROUP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PAGE: tl.constexpr, HEAD_DIM: tl.constexpr, D_P2: tl.constexpr, WINDOW: tl.constexpr,
    NUM_SPLITS: tl.constexpr, SPLIT_TILES: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
    EVEN_D: tl.constexpr, HEAVY_FIRST: tl.constexpr, RETURN_LSE: tl.constexpr,
    USE_PDL: tl.constexpr = False, HAS_QPOS: tl.constexpr = False,
    # ROPE (decode tiles): q and this step's k / v arrive raw; see _rope_rows / _rope_store_new
    rk_ptr=None, rv_ptr=None, slot_ptr=None, cos_ptr=None, sin_ptr=None, pos_ptr=None, qw_ptr=None, kw_ptr=None,
    eps=0.0, stride_kt=0, stride_kh=0, stride_vt=0, stride_vh=0, stride_cos=0, k_mul=1.0, v_mul=1.0,
    ROPE: tl.constexpr = False, QK_NORM: tl.constexpr = False, HALF: tl.constexpr = 1,
    # PREFETCH (decode tiles, GPU): every program first asks for its share of pf_bytes at pf_ptr in L2
    pf_ptr=None, pf_bytes=0, PREFETCH: tl.constexpr = False,
):
    if PREFETCH:  # the next kernel's weights (no kernel writes them): before any wait, even in idle splits
        l2_prefetch(pf_ptr, pf_bytes,
                    (tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(2) + tl.program_id(2),
                    tl.num_programs(0) * tl.num_programs(1) * tl.num_programs(2))
    # With PDL the step's metadata (tile plan, sequence lengths: step inputs no kernel writes) loads
    # before the wait; q and the newest keys come from the kernel just before (the rotary + KV write).
    # Query positions given as a tensor may be a kernel's output: then the wait comes first.
    if HAS_QPOS:
        pdl_enter(USE_PDL)
    tile = tl.program_id(0)
    if HEAVY_FIRST:  # causal prefill: the last query tiles see the most keys; start them first
        tile = tl.num_programs(0) - 1 - tile
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq = tl.load(tile_seq_ptr + tile)
    q_start_in_seq = tl.load(tile_start_ptr + tile)
    q_begin = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_begin
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx_len = seq_len - q_len  # tokens before this step's queries

    # KV range this program covers: causal end of the tile, window start, and this split's share.
    # A split covers at least SPLIT_TILES KV tiles, so short contexts use fewer splits (the rest
    # exit at once) and a context of one split's length needs no merge at all.
    last_q = tl.minimum(q_start_in_seq + BLOCK_Q, q_len) - 1
    if HAS_QPOS:  # each query row's last visible key is given (qpos, nondecreasing within a sequence)
        kv_end = tl.minimum(seq_len, tl.load(qpos_ptr + q_begin + last_q) + 1)
    else:
        kv_end = tl.minimum(seq_len, ctx_len + last_q + 1)
    kv_begin = 0
    if WINDOW > 0:
        kv_begin = tl.maximum(0, ctx_len + q_start_in_seq - WINDOW + 1)
        kv_begin = (kv_begin // BLOCK_N) * BLOCK_N
    active = 1
    if NUM_SPLITS > 1:
        n_tiles = tl.cdiv(kv_end - kv_begin, BLOCK_N)
        per_split = tl.maximum(tl.cdiv(n_tiles, NUM_SPLITS), SPLIT_TILES)
        active = tl.maximum(tl.cdiv(n_tiles, per_split), 1)
        split_begin = kv_begin + split * per_split * BLOCK_N
        kv_end = tl.minimum(kv_end, split_begin + per_split * BLOCK_N)
        kv_begin = split_begin
    if split < active:
        if not HAS_QPOS:
            pdl_enter(USE_PDL)
        rows = tl.arange(0, BLOCK_M)
        q_idx = q_start_in_seq + rows // GROUP  # query token within the sequence
        head = kv_head * GROUP + rows % GROUP
        row_valid = (q_idx < q_len) & (rows < BLOCK_Q * GROUP)
        d = tl.arange(0, D_P2)
        d_valid = d < HEAD_DIM
        q_tok = q_begin + q_idx
        if ROPE:  # decode: q normalised and rotated here, and the last split writes this token's k / v
            q = _rope_rows(q_ptr + q_tok[:, None] * stride_qt + head[:, None] * stride_qh,
                           tl.load(pos_ptr + q_tok, mask=row_valid, other=0).to(tl.int64), row_valid, d, cos_ptr,
                           sin_ptr, stride_cos, qw_ptr, eps, HEAD_DIM, HALF, QK_NORM)
            if split == active - 1:
                t_new = q_begin.to(tl.int64)
                _rope_store_new(rk_ptr + t_new * stride_kt + kv_head * stride_kh,
                                rv_ptr + t_new * stride_vt + kv_head * stride_vh,
                                cache_ptr + kv_head * stride_cache_head, tl.load(slot_ptr + t_new).to(tl.int64),
                                tl.load(pos_ptr + t_new).to(tl.int64), d, cos_ptr, sin_ptr, stride_cos, kw_ptr, eps,
                                stride_cache_kv, stride_cache_blk, stride_cache_tok, k_mul, v_mul, PAGE, HEAD_DIM, HALF,
                                QK_NORM)
                tl.debug_barrier()  # the tile loop below reads this token's k / v back from the cache
        else:
            q = tl.load(q_ptr + q_tok[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                        mask=row_valid[:, None] & d_valid[None, :], other=0.0)
        if HAS_QPOS:
            q_pos = tl.load(qpos_ptr + q_tok, mask=row_valid, other=-1)
        else:
            q_pos = ctx_len + q_idx  # absolute position of each row's query
        # Keys before the tile's first query are visible to every row: those tiles skip the mask.
        full_end = kv_begin
        if WINDOW == 0:
            if HAS_QPOS:
                full_end = tl.minimum(kv_end, tl.load(qpos_ptr + q_begin + q_start_in_seq) + 1)
            else:
                full_end = tl.minimum(kv_end, ctx_len + q_start_in_seq + 1)
            full_end = kv_begin + tl.maximum(full_end - kv_begin, 0) // BLOCK_N * BLOCK_N

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, D_P2], dtype=tl.float32)
        qk_scale = scale * 1.4426950408889634  # exp2
        k_base = cache_ptr + kv_head * stride_cache_head
        v_base = k_base + stride_cache_kv
        bt_row = block_tables_ptr + seq * stride_bt
        if INTERPRET:  # the interpreter cannot range() over loaded bounds: the same two loops as whiles
            start = kv_begin
            while start < full_end:
                m_i, l_i, acc = _attn_tile(q, m_i, l_i, acc, start, kv_end, q_pos, k_base, v_base, bt_row,
                                           stride_cache_blk, stride_cache_tok, qk_scale, d, d_valid,
                                           BLOCK_N, PAGE, WINDOW, False, EVEN_D, PRECISION)
                start += BLOCK_N
            while start < kv_end:
                m_i, l_i, acc = _attn_tile(q, m_i, l_i, acc, start, kv_end, q_pos, k_base, v_base, bt_row,
                                           stride_cache_blk, stride_cache_tok, qk_scale, d, d_valid,
                                           BLOCK_N, PAGE, WINDOW, True, EVEN_D, PRECISION)
                start += BLOCK_N
        else:  # for loops, so Triton pipelines the KV loads
            for start in range(kv_begin, full_end, BLOCK_N):
                m_i, l_i, acc = _attn_tile(q, m_i, l_i, acc, start, kv_end, q_pos, k_base, v_base, bt_row,
                                           stride_cache_blk, stride_cache_tok, qk_scale, d, d_valid,
                                           BLOCK_N, PAGE, WINDOW, False, EVEN_D, PRECISION)
            for start in range(full_end, kv_end, BLOCK_N):
                m_i, l_i, acc = _attn_tile(q, m_i, l_i, acc, start, kv_end, q_pos, k_base, v_base, bt_row,
                                           stride_cache_blk, stride_cache_tok, qk_scale, d, d_valid,
                                           BLOCK_N, PAGE, WINDOW, True, EVEN_D, PRECISION)
        _finish(acc, m_i, l_i, out_ptr, lse_ptr, part_acc_ptr, part_ml_ptr, counter_ptr, tile, kv_head, split,
                active, rows, q_tok, head, row_valid, d, d_valid, stride_ot, stride_oh, GROUP, BLOCK_M, D_P2,
                NUM_SPLITS, RETURN_LSE)


@triton.jit
def _store_out(acc, l_i, out_ptr, q_tok, head, row_valid, d, d_valid, stride_ot, stride_oh):
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(out_ptr + q_tok[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & d_valid[None, :])


@triton.jit
def _store_lse(m_i, l_i, lse_ptr, q_tok, head, row_valid, num_heads):
    """lse [T, H] of the rows: ln(sum_j exp(scale * q.k_j)) = ln 2 * (m + log2(l)), as m and l are kept
    in base 2 (scores times scale * log2(e)); -inf for a row that saw no key (l == 0, its output is 0)."""
    lse = tl.where(l_i > 0.0, (m_i + tl.log2(tl.where(l_i > 0.0, l_i, 1.0))) * 0.6931471805599453,
                   float("-inf"))
    tl.store(lse_ptr + q_tok * num_heads + head, lse, mask=row_valid)


@triton.jit
def _finish(acc, m_i, l_i, out_ptr, lse_ptr, part_acc_ptr, part_ml_ptr, counter_ptr, tile, kv_head, split, active,
            rows, q_tok, head, row_valid, d, d_valid, stride_ot, stride_oh, GROUP: tl.constexpr,
            BLOCK_M: tl.constexpr, D_P2: tl.constexpr, NUM_SPLITS: tl.constexpr, RETURN_LSE: tl.constexpr):
    # RETURN_LSE (constexpr): also store each row's log-sum-exp; off, lse_ptr is a placeholder never read
    # or written and every variant compiles as it did before the flag existed
    if NUM_SPLITS == 1:  # constexpr: the unsplit variant never compiles the merge (its buffers are placeholders)
        _store_out(acc, l_i, out_ptr, q_tok, head, row_valid, d, d_valid, stride_ot, stride_oh)
        if RETURN_LSE:
            _store_lse(m_i, l_i, lse_ptr, q_tok, head, row_valid, tl.num_programs(1) * GROUP)
    elif active == 1:
        _store_out(acc, l_i, out_ptr, q_tok, head, row_valid, d, d_valid, stride_ot, stride_oh)
        if RETURN_LSE:
            _store_lse(m_i, l_i, lse_ptr, q_tok, head, row_valid, tl.num_programs(1) * GROUP)
    else:
        # partials: acc [tiles, kvh, splits, BLOCK_M, D_P2]; (m, l) [tiles, kvh, splits, BLOCK_M, 2]
        base = ((tile * tl.num_programs(1) + kv_head) * NUM_SPLITS + split) * BLOCK_M
        tl.store(part_acc_ptr + (base + rows)[:, None] * D_P2 + d[None, :], acc)
        tl.store(part_ml_ptr + (base + rows) * 2, m_i)
        tl.store(part_ml_ptr + (base + rows) * 2 + 1, l_i)
        # The last split of this (tile, kv head) to finish merges them all (log-sum-exp), so a
        # split decode costs one launch, not two. Every thread's partial stores happen before the
        # barrier; one thread's release-acquire counter increment then publishes them at GPU scope
        # (CUTLASS's semaphore pattern). The merger resets the counter for the next launch/replay.
        tl.debug_barrier()
        slot = counter_ptr + tile * tl.num_programs(1) + kv_head
        if tl.atomic_add(slot, 1, sem="acq_rel") == active - 1:
            first = ((tile * tl.num_programs(1) + kv_head) * NUM_SPLITS) * BLOCK_M
            # Unrolled (static_range): the splits' loads are independent, so they are in flight
            # together instead of one L2 round trip after another (a rolled loop cost ~0.4 us per
            # split at batch 1). Inactive splits are masked.
            m_all = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
            for sp in tl.static_range(NUM_SPLITS):
                live = (rows * 0 + sp) < active  # [BLOCK_M] bool, as a tensor compare (interpreter-safe)
                m_all = tl.maximum(m_all, tl.load(part_ml_ptr + (first + sp * BLOCK_M + rows) * 2, mask=live,
                                                  other=float("-inf"), cache_modifier=".cg"))
            m_all_safe = tl.where(m_all == float("-inf"), 0.0, m_all)
            l_all = tl.zeros([BLOCK_M], dtype=tl.float32)
            acc_all = tl.zeros([BLOCK_M, D_P2], dtype=tl.float32)
            for sp in tl.static_range(NUM_SPLITS):
                live = (rows * 0 + sp) < active  # [BLOCK_M] bool, as a tensor compare (interpreter-safe)
                r = first + sp * BLOCK_M + rows
                w = tl.exp2(tl.load(part_ml_ptr + r * 2, mask=live, other=float("-inf"), cache_modifier=".cg")
                            - m_all_safe)
                l_all += w * tl.load(part_ml_ptr + r * 2 + 1, mask=live, other=0.0, cache_modifier=".cg")
                acc_all += w[:, None] * tl.load(part_acc_ptr + r[:, None] * D_P2 + d[None, :], mask=live[:, None],
                                                other=0.0, cache_modifier=".cg")
            _store_out(acc_all, l_all, out_ptr, q_tok, head, row_valid, d, d_valid, stride_ot, stride_oh)
            if RETURN_LSE:  # the whole row's: l_all is relative to m_all, as each split's l to its m
                _store_lse(m_all, l_all, lse_ptr, q_tok, head, row_valid, tl.num_programs(1) * GROUP)
            tl.atomic_xchg(slot, 0)


# Tile shapes and the split-KV floor come from KernelSettings (kernels/settings.py: the H200's
# tuned values unless the rank's kernel_config says otherwise); the attention backend passes them.
_INTERPRET = kernels.interpreting()


class RopeInputs(NamedTuple):
    """What paged_attention(rope=...) needs to rotate q and write this step's k / v itself: k, v
    [T, KVH, D] (strided views allowed), positions [T], the rotary cos / sin caches [max_pos, HALF],
    slot_mapping [T], qk_norm (q weight [D], k weight [D], eps) or None, and the cache's 1 / scale
    for k and v (an FP8 cache; 1.0 otherwise)."""
    k: torch.Tensor
    v: torch.Tensor
    positions: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    slot_mapping: torch.Tensor
    qk_norm: Optional[tuple] = None
    k_mul: float = 1.0
    v_mul: float = 1.0


_FITTED: dict = {}  # (device, dtype, decode, block_m, block_n, d_p2, stages) -> (block_n, stages) used
_SMEM: dict = {}


def _smem_limit(device: torch.device) -> int:
    """Shared memory one block may use on `device` (opt-in maximum); unbounded under the interpreter."""
    if _INTERPRET or device.type != "cuda":
        return 1 << 40
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SMEM:
        try:
            from triton.runtime import driver
            _SMEM[idx] = int(driver.active.utils.get_device_properties(idx)["max_shared_mem"])
        except Exception:  # noqa: BLE001 - an older Triton: torch's figure, else Hopper's
            props = torch.cuda.get_device_properties(idx)
            _SMEM[idx] = int(getattr(props, "shared_memory_per_block_optin", 227 * 1024))
    return _SMEM[idx]


def shrink_tiles(block_n: int, num_stages: int) -> Optional[tuple[int, int]]:
    """The next smaller (block_n, stages): fewer pipeline stages down to 2, then halve the KV tile
    down to 32 tokens, then no pipelining, then 16-token tiles; None below that."""
    if num_stages > 2:
        return block_n, num_stages - 1
    if block_n > 32:
        return block_n // 2, num_stages
    if num_stages > 1:
        return block_n, 1
    if block_n > 16:
        return block_n // 2, num_stages
    return None


def fit_tiles(block_m: int, block_n: int, d_p2: int, elt: int, num_stages: int, limit: int) -> tuple[int, int]:
    """Shrink (block_n, stages) until the pipelined K and V tiles plus the Q tile fit in `limit` bytes."""
    while num_stages * 2 * block_n * d_p2 * elt + block_m * d_p2 * elt > limit:
        smaller = shrink_tiles(block_n, num_stages)
        if smaller is None:
            break
        block_n, num_stages = smaller
    return block_n, num_stages


def plan_tiles(query_lens: list[int], block_q: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Host-side: (sequence, first query index) of every query tile."""
    from meshserve.utils import to_device
    if block_q == 1 and all(n == 1 for n in query_lens):  # decode: tile i is sequence i
        n = len(query_lens)
        return (to_device(torch.arange(n, dtype=torch.int32), device),
                to_device(torch.zeros(n, dtype=torch.int32), device))
    seqs, starts = [], []
    for i, n in enumerate(query_lens):
        for s in range(0, max(n, 1), block_q):
            seqs.append(i)
            starts.append(s)
    return (to_device(torch.tensor(seqs, dtype=torch.int32), device),
            to_device(torch.tensor(starts, dtype=torch.int32), device))


def block_q_for(max_query_len: int, group: int, num_tokens: Optional[int] = None,
                settings: KernelSettings = H200) -> int:
    """Query tokens per tile: 1 for pure decode (the rows are the GQA group), else
    attn_prefill_rows-row tiles for a step of more than attn_prefill_large_tokens tokens (or
    num_tokens None) and attn_prefill_rows_small-row tiles for a smaller one, so a whole run
    compiles three variants."""
    if max_query_len <= 1:
        return 1
    small = num_tokens is not None and num_tokens <= settings.attn_prefill_large_tokens
    return max(1, (settings.attn_prefill_rows_small if small else settings.attn_prefill_rows) // group)


SMALL_DECODE = 8  # decode steps of up to this many sequences take the latency-bound tiles


def decode_tiles(num_seqs: int) -> tuple[int, int, int]:
    """Decode tiles' (keys per KV tile, fewest tiles per KV split, warps) for a step of `num_seqs`
    sequences, where kernel_config leaves them unset. Up to SMALL_DECODE sequences each program is
    latency-bound: 128-key tiles, one per split, 4 warps (batch 1, Qwen3-30B-A3B's GQA at 128 / 256 / 384
    keys, H200: 6.50 us mean against 7.36 with the large batches' tiles; H100 likewise;
    benchmarks/decode_attn_b1.py); larger batches fill the GPU with programs: 64-key tiles, two per
    split, 2 warps."""
    return (128, 1, 4) if num_seqs <= SMALL_DECODE else (64, 2, 2)


def paged_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                    query_start_loc: torch.Tensor, tile_seq: torch.Tensor, tile_start: torch.Tensor, block_q: int,
                    scale: float, sliding_window: Optional[int] = None, num_splits: int = 1,
                    out: Optional[torch.Tensor] = None, workspace: Optional[dict] = None,
                    block_n: Optional[int] = None, num_warps: Optional[int] = None,
                    num_stages: Optional[int] = None, split_tiles: Optional[int] = None,
                    exact_tiles: bool = False, heavy_first: Optional[bool] = None,
                    settings: KernelSettings = H200, return_lse: bool = False,
                    query_positions: Optional[torch.Tensor] = None, rope: Optional[RopeInputs] = None,
                    prefetch: Optional[torch.Tensor] = None):
    """Returns out [T, H, D]; with return_lse, (out, lse) where lse [T, H] float32 is each row's
    ln sum_j exp(scale * q . k_j) over the keys it sees (-inf for a row that sees none; out is 0 there).
    block_n, num_warps, num_stages, split_tiles, heavy_first: None takes `settings`' value
    (decode tiles: settings' attn_decode_* where set, else decode_tiles(T); 2 stages).
    exact_tiles: launch block_n / num_stages as given, never shrunk to fit (for sweeps).
    heavy_first: launch query tiles last to first (default settings.attn_heavy_first for prefill).
    query_positions: [T] int32, the index of the last key each query row sees (-1: none), for rows
    whose keys are not the causal shape (context parallelism RING); nondecreasing within a sequence,
    no sliding window. None: causal (row i of a sequence of q_len queries sees seq_len - q_len + i + 1).
    rope (decode tiles, block_q 1, no query_positions): q and this step's k / v are raw; the kernel
    rotates (and with qk_norm normalises) q itself, and each sequence's last KV split writes its
    token's k / v into the cache before reading it (kernels/fused.py rotary_store_kv, fused in).
    prefetch (decode tiles): a weight the next kernel reads (the layer's o_proj); the programs ask for
    it in L2 first (kernels/prefetch.py). A hint: skipped under the interpreter, results unchanged."""
    T, H, D = q.shape
    KVH = kv_cache.shape[3]
    group = H // KVH
    page = kv_cache.shape[2]
    block_m = max(16, triton.next_power_of_2(block_q * group))
    decode = block_q == 1
    if decode:
        auto_n, auto_tiles, auto_warps = decode_tiles(T)
        block_n = block_n or settings.attn_decode_block_n or auto_n
        num_warps = num_warps or settings.attn_decode_warps or auto_warps
        split_tiles = split_tiles or settings.attn_decode_split_tiles or auto_tiles
    else:
        block_n = block_n or settings.attn_prefill_block_n
        num_warps = num_warps or settings.attn_prefill_warps
        split_tiles = 1  # prefill tiles are never split over the KV
    num_stages = num_stages or (2 if decode else settings.attn_prefill_stages if block_m >= settings.attn_prefill_rows
                                else settings.attn_prefill_stages_small)
    heavy_first = (not decode and settings.attn_heavy_first) if heavy_first is None else heavy_first
    d_p2 = triton.next_power_of_2(D)
    # Tile shapes that would not fit in this GPU's shared memory (fp32, head_dim 256, or the
    # Hopper-tuned prefill tiles on an A100 / L40S) shrink before launch; a compile that still
    # runs out (the estimate is Triton's lower bound) shrinks further and is remembered.
    fit_key = (q.device, q.dtype, decode, block_m, block_n, d_p2, num_stages)
    if not exact_tiles:
        if fit_key not in _FITTED:
            _FITTED[fit_key] = fit_tiles(block_m, block_n, d_p2, q.element_size(), num_stages,
                                         _smem_limit(q.device))
        block_n, num_stages = _FITTED[fit_key]
    out = torch.empty_like(q) if out is None else out
    lse = torch.empty(T, H, dtype=torch.float32, device=q.device) if return_lse else out  # else a placeholder
    num_tiles = tile_seq.shape[0]
    part_acc = part_ml = counter = out  # unused placeholders when not splitting
    if num_splits > 1:
        shape = (num_tiles, KVH, num_splits, block_m)
        ws = workspace if workspace is not None else {}
        key = (shape, d_p2)
        if ws.get("key") != key:
            ws["key"] = key
            ws["acc"] = torch.empty(*shape, d_p2, dtype=torch.float32, device=q.device)
            ws["ml"] = torch.empty(*shape, 2, dtype=torch.float32, device=q.device)
            ws["counter"] = torch.zeros(num_tiles * KVH, dtype=torch.int32, device=q.device)  # left at 0
        part_acc, part_ml, counter = ws["acc"], ws["ml"], ws["counter"]
    grid = (num_tiles, KVH, num_splits)
    extra = {}
    if rope is not None:
        if block_q != 1 or query_positions is not None:
            raise ValueError(f"paged_attention(rope=...) fuses the rotary into decode tiles only (block_q 1, no "
                             f"query_positions); got block_q {block_q}")
        qw, kw, eps = rope.qk_norm if rope.qk_norm is not None else (q, q, 0.0)
        extra = dict(rk_ptr=rope.k, rv_ptr=rope.v, slot_ptr=rope.slot_mapping, cos_ptr=rope.cos, sin_ptr=rope.sin,
                     pos_ptr=rope.positions, qw_ptr=qw, kw_ptr=kw, eps=float(eps), stride_kt=rope.k.stride(0),
                     stride_kh=rope.k.stride(1), stride_vt=rope.v.stride(0), stride_vh=rope.v.stride(1),
                     stride_cos=rope.cos.stride(0), k_mul=float(rope.k_mul), v_mul=float(rope.v_mul), ROPE=True,
                     QK_NORM=rope.qk_norm is not None, HALF=rope.cos.shape[1])
    if decode:
        extra.update(pf.launch_args(prefetch))
    while True:
        try:
            _attn_kernel[grid](
                q, kv_cache, out, lse, part_acc, part_ml, counter, block_tables, seq_lens, query_start_loc, tile_seq,
                tile_start, seq_lens if query_positions is None else query_positions,
                q.stride(0), q.stride(1), out.stride(0), out.stride(1),
                kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
                block_tables.stride(0), scale,
                GROUP=group, BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_N=block_n, PAGE=page, HEAD_DIM=D, D_P2=d_p2,
                WINDOW=sliding_window or 0, NUM_SPLITS=num_splits,
                SPLIT_TILES=split_tiles,
                PRECISION="ieee" if q.dtype == torch.float32 else "tf32", INTERPRET=_INTERPRET, EVEN_D=d_p2 == D,
                HEAVY_FIRST=heavy_first, RETURN_LSE=return_lse, num_warps=num_warps, num_stages=num_stages,
                HAS_QPOS=query_positions is not None, **extra, **kernels.pdl_args())
            return (out, lse) if return_lse else out
        except OutOfResources:
            smaller = None if exact_tiles else shrink_tiles(block_n, num_stages)
            if smaller is None:
                raise
            block_n, num_stages = _FITTED[fit_key] = smaller
