"""The Triton kernels of FP8 block-quantised linears (kernels/fp8.py says what they compute)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from meshserve import kernels as _kernels
from meshserve.kernels.fp8 import WHOLE, fp8_linear_ref
from meshserve.kernels.pdl import pdl_enter


@triton.jit
def to_cache(x, cache_ptr):
    """x in the KV cache's element type. Into an FP8 cache (kv_cache_config.dtype fp8, scale 1):
    saturated at +-448 and rounded to the nearest e4m3 value (ties to even) in fp32 arithmetic, so
    the final conversion is exact; this is torch's cast, and it does not depend on how a backend
    converts (Triton's interpreter truncates where a mantissa rounds over into the exponent)."""
    if cache_ptr.dtype.element_ty == tl.float8e4nv:
        xf = tl.minimum(tl.maximum(x.to(tl.float32), -448.0), 448.0)
        bits = xf.to(tl.int32, bitcast=True)
        e = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)  # subnormals: the smallest normal's step, 2^-9
        step = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)  # 3 mantissa bits
        r = ((tl.abs(xf) / step + 12582912.0) - 12582912.0) * step  # magnitude, half to even (1.5 * 2^23)
        signed = (r.to(tl.int32, bitcast=True) | (bits & -2147483648)).to(tl.float32, bitcast=True)
        return signed.to(cache_ptr.dtype.element_ty)
    return x.to(cache_ptr.dtype.element_ty)


@triton.jit
def _fp8_gemv_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_sn, stride_ym,
                     HAS_BIAS: tl.constexpr, BN_Q: tl.constexpr, BK_Q: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     K_ITERS: tl.constexpr, USE_PDL: tl.constexpr = False):
    # BLOCK_K a multiple of BK_Q (the scale block along K): a tile holds KB = BLOCK_K / BK_Q K blocks,
    # each summed and scaled on its own; or BK_Q a multiple of BLOCK_K (per-row scales, BK_Q = WHOLE):
    # one scale per row and tile
    KB: tl.constexpr = BLOCK_K // BK_Q if BLOCK_K >= BK_Q else 1
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    offs_kb = tl.arange(0, KB)
    n_mask = offs_n < N
    m_mask = offs_m < M
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    s_rows = s_ptr + (offs_n // BN_Q)[:, None] * stride_sn
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    pdl_enter(USE_PDL)
    for i in range(K_ITERS):
        k = i * BLOCK_K + offs_k
        km = k < K
        w = tl.load(w_rows + k[None, :], mask=n_mask[:, None] & km[None, :], other=0.0).to(tl.float32)
        x = tl.load(x_rows + k[None, :], mask=m_mask[:, None] & km[None, :], other=0.0).to(tl.float32)
        p = x[:, None, :] * w[None, :, :]  # [M, N, K]
        if BLOCK_K >= BK_Q:  # the tile's K blocks summed apart, then scaled per (row, K block)
            kb = i * KB + offs_kb
            s = tl.load(s_rows + kb[None, :], mask=n_mask[:, None] & (kb * BK_Q < K)[None, :], other=0.0)
            p = tl.sum(tl.reshape(p, (BLOCK_M, BLOCK_N, KB, BK_Q)), axis=3)
            acc += tl.sum(p * s[None, :, :], axis=2)
        else:
            s = tl.load(s_rows + (i * BLOCK_K) // BK_Q, mask=n_mask[:, None], other=0.0)  # [N, 1]
            acc += tl.sum(p, axis=2) * tl.reshape(s, (1, BLOCK_N))
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _fp8_gemm_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_sn, stride_ym,
                     HAS_BIAS: tl.constexpr, BN_Q: tl.constexpr, BK_Q: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     K_ITERS: tl.constexpr, GROUP_M: tl.constexpr, USE_PDL: tl.constexpr = False):
    # BLOCK_K divides BK_Q: every K tile lies in one K block (one scale per output column)
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    w_cols = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn
    s_cols = s_ptr + (offs_n // BN_Q) * stride_sn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    pdl_enter(USE_PDL)
    for i in range(K_ITERS):
        k = i * BLOCK_K + offs_k
        km = k < K
        a = tl.load(x_rows + k[None, :], mask=m_mask[:, None] & km[None, :], other=0.0)
        b = tl.load(w_cols + k[:, None], mask=km[:, None] & n_mask[None, :], other=0.0).to(a.dtype)
        s = tl.load(s_cols + (i * BLOCK_K) // BK_Q, mask=n_mask, other=0.0)
        acc += tl.dot(a, b, out_dtype=tl.float32) * s[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


def _gemv_config(m: int, n: int, k: int, bk: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps): the bf16 rule's tiles (kernels/gemv.py); BLOCK_K a multiple of
    a checkpoint's bk (per-row scales, bk = WHOLE: any). Not tuned on a GPU yet."""
    per_row = 2048 if m == 1 else 1 << (1024 // max(1, m)).bit_length() - 1  # a power of two
    block_k = min(per_row, triton.next_power_of_2(k))
    block_n = 2 if m == 1 and n * k <= 12 * 2**20 else (8 if n <= 4096 else 4)
    while block_n * block_k * triton.next_power_of_2(m) > 16384 and block_k > 16:
        block_k //= 2
    if block_k < bk < WHOLE:  # whole scale blocks per tile
        block_k = bk
    return block_n, block_k, 4


def _operands(x, q):
    """(x with unit stride along K, M, N, K, the output [M, N] in x's dtype)."""
    m, k = x.shape
    n = q.shape[0]
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x, m, n, k, torch.empty((m, n), dtype=x.dtype, device=x.device)


def fp8_gemv(x, q, scale, block, bias=None, config=None):
    x, m, n, k, y = _operands(x, q)
    bn, bk = block
    block_n, block_k, warps = config or _gemv_config(m, n, k, bk)
    _fp8_gemv_kernel[(triton.cdiv(n, block_n),)](
        x, q, scale, bias if bias is not None else scale, y, m, n, k, x.stride(0), q.stride(0), scale.stride(0),
        y.stride(0), HAS_BIAS=bias is not None, BN_Q=bn, BK_Q=bk, BLOCK_M=triton.next_power_of_2(m),
        BLOCK_N=block_n, BLOCK_K=block_k, K_ITERS=triton.cdiv(k, block_k), num_warps=warps,
        **_kernels.pdl_args())
    return y


def _gemm_config(m: int, n: int, k: int, bk: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). Not tuned on a GPU yet."""
    block_m = 64 if m <= 64 else 128
    return block_m, 128, min(bk, 128), 4 if block_m == 64 else 8, 3


def fp8_gemm(x, q, scale, block, bias=None, config=None):
    x, m, n, k, y = _operands(x, q)
    bn, bk = block
    block_m, block_n, block_k, warps, stages = config or _gemm_config(m, n, k, bk)
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    _fp8_gemm_kernel[grid](
        x, q, scale, bias if bias is not None else scale, y, m, n, k, x.stride(0), q.stride(0), scale.stride(0),
        y.stride(0), HAS_BIAS=bias is not None, BN_Q=bn, BK_Q=bk, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_K=block_k, K_ITERS=triton.cdiv(k, block_k), GROUP_M=8, num_warps=warps, num_stages=stages,
        **_kernels.pdl_args())
    return y


def fp8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int],
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] times FP8 weights q [N, K] with block scales: the GEMV up to
    kernel_config.gemv_max_m rows (at least 1), the GEMM above; the torch reference where Triton is
    off or the tensors are not on a GPU."""
    if not (_kernels.TRITON_AVAILABLE and x.is_cuda):
        return fp8_linear_ref(x, q, scale, block, bias)
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.shape[0] == 0:
        return x.new_empty(*shape[:-1], q.shape[0])
    if x2.shape[0] <= max(_kernels.GEMV_MAX_M, 1):
        y = fp8_gemv(x2, q, scale, block, bias)
    else:
        y = fp8_gemm(x2, q, scale, block, bias)
    return y.reshape(*shape[:-1], q.shape[0])
