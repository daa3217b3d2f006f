"""Fused elementwise kernels for the decoder layer (Triton), each with a torch reference in
layers/ that it is tested against: RMSNorm (optionally fused with the residual add), rotary
embedding applied in place to q and k, and SiLU-and-mul. In a CUDA-graph decode step, kernel count
is what costs: these turn ~20 small launches per layer into 4.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from meshserve import kernels
from meshserve.kernels.fp8_gemm import to_cache
from meshserve.kernels.pdl import pdl_enter


@triton.jit
def _rmsnorm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, stride_x, stride_r, stride_o, N, eps,
                    HAS_RES: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr = False):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)  # a weight: before the PDL wait
    pdl_enter(USE_PDL)
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)  # the sum, rounded as a torch add would
        tl.store(res_ptr + row * stride_r + offs, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / N + eps)
    y = (xf * rstd).to(x.dtype).to(tl.float32) * w.to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """x: [..., N]. With `residual`, computes x + residual into `residual` (in place) and returns
    (norm(x + residual), residual); otherwise returns norm(x)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    rows, n = x2.shape
    if rows:
        res2 = residual.view(-1, n) if residual is not None else x2
        _rmsnorm_kernel[(rows,)](x2, res2, weight, out, x2.stride(0), res2.stride(0), out.stride(0), n, eps,
                                 HAS_RES=residual is not None, BLOCK=triton.next_power_of_2(n),
                                 num_warps=4 if n <= 2048 else 8, **kernels.pdl_args())
    out = out.view(shape)
    return (out, residual) if residual is not None else out


@triton.jit
def _rope_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, pos_ptr, stride_qt, stride_qh, stride_kt, stride_kh,
                 stride_cos, NUM_Q: tl.constexpr, NUM_K: tl.constexpr, H_P2: tl.constexpr,
                 HALF: tl.constexpr, HALF_P2: tl.constexpr, USE_PDL: tl.constexpr = False):
    pdl_enter(USE_PDL)
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    j = tl.arange(0, HALF_P2)
    jm = j < HALF
    cos = tl.load(cos_ptr + pos * stride_cos + j, mask=jm, other=0.0)[None, :]
    sin = tl.load(sin_ptr + pos * stride_cos + j, mask=jm, other=0.0)[None, :]
    h = tl.arange(0, H_P2)[:, None]
    for which in tl.static_range(2):
        if which == 0:
            base, sh, nh = q_ptr + t * stride_qt, stride_qh, NUM_Q
        else:
            base, sh, nh = k_ptr + t * stride_kt, stride_kh, NUM_K
        m = (h < nh) & jm[None, :]
        p1 = base + h * sh + j[None, :]
        x1 = tl.load(p1, mask=m, other=0.0)
        x2 = tl.load(p1 + HALF, mask=m, other=0.0)
        a, b = x1.to(tl.float32), x2.to(tl.float32)
        tl.store(p1, (a * cos - b * sin).to(x1.dtype), mask=m)
        tl.store(p1 + HALF, (b * cos + a * sin).to(x1.dtype), mask=m)


def rotary_(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """In place: q [T, H, D], k [T, KVH, D] (rows may be strided views); cos/sin [max_pos, rot/2]
    fp32; rotates the first 2 * rot/2 dims of each head (rotate-half layout)."""
    T = q.shape[0]
    if T == 0:
        return
    half = cos.shape[1]
    _rope_kernel[(T,)](q, k, cos, sin, positions, q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0),
                       NUM_Q=q.shape[1], NUM_K=k.shape[1], H_P2=triton.next_power_of_2(max(q.shape[1], k.shape[1])),
                       HALF=half, HALF_P2=triton.next_power_of_2(half), num_warps=4, **kernels.pdl_args())


@triton.jit
def _rotate(x, partner, cos, sin, wx, wp, rot, first, eps, row_axis: tl.constexpr, HEAD_DIM: tl.constexpr,
            QK_NORM: tl.constexpr):
    """Rotary of loaded head rows x (the first HALF dims with the next HALF, each value with its
    partner's; dims past 2 * HALF pass through), after the per-head RMSNorm (weights wx at the
    dims, wp at the partners' dims; reduced along `row_axis`) when QK_NORM, rounded to x's dtype at
    the points the separate RMSNorm and rotary would round. first / rot: the masks d < HALF and
    d < 2 * HALF. Shared by _rope_store_kernel and the fused decode attention (paged_attention)."""
    partner = partner.to(tl.float32)
    xf = x.to(tl.float32)
    if QK_NORM:  # every dim rotated: the partners are the same row's values, the same rstd
        rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=row_axis) / HEAD_DIM + eps)
        if row_axis == 1:
            rstd = rstd[:, None]
        xf = ((xf * rstd).to(x.dtype).to(tl.float32) * wx).to(x.dtype).to(tl.float32)
        partner = ((partner * rstd).to(x.dtype).to(tl.float32) * wp).to(x.dtype).to(tl.float32)
        x = xf.to(x.dtype)
    # first half: a*cos - b*sin with a = x, b = partner; second: b*cos + a*sin with b = x, a = partner
    y = tl.where(first, xf * cos - partner * sin, xf * cos + partner * sin).to(x.dtype)
    return tl.where(rot, y, x)


@triton.jit
def _rotate_operands(pos, d, cos_ptr, sin_ptr, stride_cos, w_ptr, HEAD_DIM: tl.constexpr, HALF: tl.constexpr,
                     QK_NORM: tl.constexpr):
    """What _rotate needs besides the rows, for head dims `d` at positions `pos` (broadcastable to
    d: a scalar, or [rows, 1] against [1, D_P2]): the masks first / rot, each dim's partner index,
    its cos / sin, and the norm weights at the dims and at the partners (w_ptr; placeholders
    without QK_NORM). Step inputs and constants only: loadable before a PDL wait."""
    first = d < HALF
    rot = d < 2 * HALF
    jj = tl.where(first, d, d - HALF)
    pidx = tl.where(first, d + HALF, d - HALF)
    cos = tl.load(cos_ptr + pos * stride_cos + jj, mask=rot, other=0.0)
    sin = tl.load(sin_ptr + pos * stride_cos + jj, mask=rot, other=0.0)
    wx = cos  # placeholders without QK_NORM (never read)
    wp = cos
    if QK_NORM:
        wx = tl.load(w_ptr + d, mask=d < HEAD_DIM, other=0.0).to(tl.float32)
        wp = tl.load(w_ptr + pidx, mask=rot, other=0.0).to(tl.float32)
    return first, rot, pidx, cos, sin, wx, wp


@triton.jit
def _rope_store_kernel(q_ptr, k_ptr, v_ptr, cache_ptr, slot_ptr, cos_ptr, sin_ptr, pos_ptr, qw_ptr, kw_ptr, eps,
                       stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cache_kv, stride_cos,
                       k_mul, v_mul,
                       NUM_Q: tl.constexpr, NUM_K: tl.constexpr, QH_P2: tl.constexpr, KH_P2: tl.constexpr,
                       D: tl.constexpr, D_P2: tl.constexpr, HALF: tl.constexpr, HALF_P2: tl.constexpr,
                       QK_NORM: tl.constexpr, USE_PDL: tl.constexpr = False):
    """One token: rotate q in place (as _rope_kernel does), rotate k and write it with v into the
    paged cache at the token's slot. k itself is left as it was: the attention reads the cache.
    QK_NORM (Qwen3's per-head RMSNorm of q and k, every dim rotated: D == 2 * HALF): each head row
    is normalised first, rounded as the separate RMSNorm kernel would (q's normalised values are
    what is stored back, rotated)."""
    # With PDL, what no kernel of the step writes loads before the wait: the position, slot, rotary
    # rows and norm weights (step inputs and constants); q, k and v come from the GEMM just before.
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    j = tl.arange(0, HALF_P2)
    jm = j < HALF
    cos = tl.load(cos_ptr + pos * stride_cos + j, mask=jm, other=0.0)[None, :]
    sin = tl.load(sin_ptr + pos * stride_cos + j, mask=jm, other=0.0)[None, :]
    hk = tl.arange(0, KH_P2)[:, None]
    d = tl.arange(0, D_P2)[None, :]
    row_m = (hk < NUM_K) & (d < D)
    first, rot, pidx, kc, ks, wx, wp = _rotate_operands(pos, d, cos_ptr, sin_ptr, stride_cos, kw_ptr, D, HALF, QK_NORM)
    w1 = cos  # placeholders without QK_NORM (never read)
    w2 = cos
    if QK_NORM:
        w1 = tl.load(qw_ptr + j, mask=jm, other=0.0).to(tl.float32)[None, :]
        w2 = tl.load(qw_ptr + HALF + j, mask=jm, other=0.0).to(tl.float32)[None, :]
    pdl_enter(USE_PDL)
    # q: the two halves of the rotated dims, in place.
    hq = tl.arange(0, QH_P2)[:, None]
    m = (hq < NUM_Q) & jm[None, :]
    p1 = q_ptr + t * stride_qt + hq * stride_qh + j[None, :]
    x1 = tl.load(p1, mask=m, other=0.0)
    x2 = tl.load(p1 + HALF, mask=m, other=0.0)
    a, b = x1.to(tl.float32), x2.to(tl.float32)
    if QK_NORM:
        rstd = 1.0 / tl.sqrt((tl.sum(a * a, axis=1) + tl.sum(b * b, axis=1)) / D + eps)[:, None]
        a = ((a * rstd).to(x1.dtype).to(tl.float32) * w1).to(x1.dtype).to(tl.float32)
        b = ((b * rstd).to(x1.dtype).to(tl.float32) * w2).to(x1.dtype).to(tl.float32)
    tl.store(p1, (a * cos - b * sin).to(x1.dtype), mask=m)
    tl.store(p1 + HALF, (b * cos + a * sin).to(x1.dtype), mask=m)
    # k and v: whole head rows [KVH, D] into the cache; k's first 2 * HALF dims rotated.
    dst = cache_ptr + slot * (NUM_K * D) + hk * D + d
    v = tl.load(v_ptr + t * stride_vt + hk * stride_vh + d, mask=row_m, other=0.0)
    tl.store(dst + stride_cache_kv, to_cache(v.to(tl.float32) * v_mul, cache_ptr), mask=row_m)
    k_row = k_ptr + t * stride_kt + hk * stride_kh
    y = _rotate(tl.load(k_row + d, mask=row_m, other=0.0), tl.load(k_row + pidx, mask=row_m & rot, other=0.0),
                kc, ks, wx, wp, rot, first, eps, 1, D, QK_NORM)
    tl.store(dst, to_cache(y.to(tl.float32) * k_mul, cache_ptr), mask=row_m)


def rotary_store_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                    sin: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                    qk_norm: tuple[torch.Tensor, torch.Tensor, float] | None = None,
                    k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """rotary_(q, k, ...) then store_kv(k, v, kv_cache, slot_mapping) in one kernel, except that k
    is not rotated in place. q: [T, H, D]; k, v: [T, KVH, D] (strided views allowed); kv_cache:
    [2, num_blocks, block_size, KVH, D] contiguous. qk_norm: (q_weight [D], k_weight [D], eps): the
    per-head RMSNorm of q and k first (as RMSNorm on q and k would), when every dim is rotated."""
    T = slot_mapping.shape[0]
    if T == 0:
        return
    half = cos.shape[1]
    nk, d = k.shape[1], k.shape[2]
    if qk_norm is not None and 2 * half != d:
        raise ValueError(f"rotary_store_kv: qk_norm needs every dim rotated (2 * {half} != head_dim {d})")
    qw, kw, eps = qk_norm if qk_norm is not None else (q, k, 0.0)
    _rope_store_kernel[(T,)](q, k, v, kv_cache, slot_mapping, cos, sin, positions, qw, kw, float(eps),
                             q.stride(0), q.stride(1),
                             k.stride(0), k.stride(1), v.stride(0), v.stride(1), kv_cache.stride(0), cos.stride(0),
                             1.0 / k_scale, 1.0 / v_scale, NUM_Q=q.shape[1], NUM_K=nk, QH_P2=triton.next_power_of_2(q.shape[1]),
                             KH_P2=triton.next_power_of_2(nk), D=d, D_P2=triton.next_power_of_2(d),
                             HALF=half, HALF_P2=triton.next_power_of_2(half), QK_NORM=qk_norm is not None,
                             num_warps=4, **kernels.pdl_args())


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, D, BLOCK: tl.constexpr, USE_PDL: tl.constexpr = False):
    pdl_enter(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = offs < D
    g = tl.load(x_ptr + row * stride_x + offs, mask=m, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * stride_x + D + offs, mask=m, other=0.0)
    s = (g / (1.0 + tl.exp(-g))).to(u.dtype)  # silu rounded to the input dtype, as torch does
    tl.store(out_ptr + row * stride_o + offs, (s.to(tl.float32) * u.to(tl.float32)).to(u.dtype), mask=m)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * d)
    out = torch.empty(x2.shape[0], d, dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        block = min(1024, triton.next_power_of_2(d))
        _silu_mul_kernel[(x2.shape[0], triton.cdiv(d, block))](x2, out, x2.stride(0), out.stride(0), d, BLOCK=block,
                                                                **kernels.pdl_args())
    return out.view(*x.shape[:-1], d)


_ARGMAX_BLOCK = 4096


@triton.jit
def _argmax_partial_kernel(x_ptr, val_ptr, idx_ptr, stride_x, V, NB, BLOCK: tl.constexpr,
                           USE_PDL: tl.constexpr = False):
    pdl_enter(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * stride_x + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
    m, i = tl.max(x, axis=0, return_indices=True, return_indices_tie_break_left=True)
    tl.store(val_ptr + row * NB + blk, m)
    tl.store(idx_ptr + row * NB + blk, (blk * BLOCK + i).to(tl.int64))


@triton.jit
def _argmax_final_kernel(val_ptr, idx_ptr, out_ptr, NB, NB_P2: tl.constexpr, USE_PDL: tl.constexpr = False):
    pdl_enter(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, NB_P2)
    ok = j < NB
    v = tl.load(val_ptr + row * NB + j, mask=ok, other=float("-inf"))
    i = tl.load(idx_ptr + row * NB + j, mask=ok, other=0)
    m = tl.max(v, axis=0)
    big = tl.full((NB_P2,), 2**62, tl.int64)
    tl.store(out_ptr + row, tl.min(tl.where(ok & (v == m), i, big), axis=0))


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """x: [B, V] -> int64 [B], the first index of each row's maximum (as torch.argmax), in two
    short kernels: blocks of 4096 in parallel, then one program per row over the block winners.
    torch's single-row reduction took ~36 us for the 128k-vocabulary logits of a batch-1 decode
    step (benchmarks/kernel_profile.py, H200)."""
    b, v = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    nb = triton.cdiv(v, _ARGMAX_BLOCK)
    vals = torch.empty((b, nb), dtype=torch.float32, device=x.device)
    idxs = torch.empty((b, nb), dtype=torch.int64, device=x.device)
    out = torch.empty(b, dtype=torch.int64, device=x.device)
    if b:
        _argmax_partial_kernel[(b, nb)](x, vals, idxs, x.stride(0), v, nb, BLOCK=_ARGMAX_BLOCK, num_warps=8,
                                        **kernels.pdl_args())
        _argmax_final_kernel[(b,)](vals, idxs, out, nb, NB_P2=triton.next_power_of_2(nb), **kernels.pdl_args())
    return out
