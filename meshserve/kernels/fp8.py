"""FP8 (e4m3) block-quantised weights: y = x @ dequant(W)^T with W in float8_e4m3fn and one fp32
scale per [bn, bk] block of W (`weight_scale_inv`, the format DeepSeek-V3 and the Hub's *-FP8
checkpoints ship: W_real[n, k] = W[n, k] * scale[n // bn, k // bk]; edge blocks may be partial).

Activations stay in the model's dtype (weight-only, "w8a16"): each kernel loads FP8 weight tiles,
converts them in registers and applies the block scale to the partial products of each K block, so
a decode step reads half the weight bytes of bf16. Two kernels, as for bf16 weights:

- `_fp8_gemv_kernel` (few rows: decode): programs of BLOCK_N output rows over the whole K, the K tile
  a multiple of bk reshaped to [BLOCK_N, BLOCK_K / bk, bk] so that each K block's sum gets its scale.
- `_fp8_gemm_kernel` (more rows): tiles of [BLOCK_M, BLOCK_N], K tiles of at most bk (one scale per
  output column per K tile), `tl.dot` in the activations' dtype, the scaled partial added in fp32.

The torch reference is `dequantize` + `F.linear` (`fp8_linear_ref`); tests compare the kernels with it
and with a float64 computation (Triton's interpreter on CPU). Block sizes are powers of two >= 16.
This module is torch only (model configs import it); the kernels and `fp8_linear`, which picks
between them, are in kernels/fp8_gemm.py.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
# The column "block" of a scale that does not vary along K (per-tensor and per-channel checkpoints:
# block (1, WHOLE), one scale per output row); a power of two, so the kernels' tile arithmetic holds.
WHOLE = 1 << 30
PER_ROW = (1, WHOLE)


def storage_view(t: torch.Tensor) -> torch.Tensor:
    """`t` as bytes when it is FP8 (torch's CPU index_copy_ has no FP8 kernel; bytes copy the same),
    else `t` itself."""
    return t.view(torch.uint8) if t.dtype == FP8_DTYPE else t


def scale_shape(n: int, k: int, block: tuple[int, int]) -> tuple[int, int]:
    return -(-n // block[0]), -(-k // block[1])


def quantize(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weights, fp32 scales) of a [N, K] weight: each [bn, bk] block (the last ones partial)
    scaled so that its largest magnitude maps to 448; an all-zero block gets scale 1."""
    n, k = w.shape
    sn, sk = scale_shape(n, k, block)
    bn, bk = min(block[0], n), min(block[1], k)  # a block wider than the weight: one block
    padded = torch.zeros(sn * bn, sk * bk, dtype=torch.float32, device=w.device)
    padded[:n, :k] = w.float()
    blocks = padded.view(sn, bn, sk, bk)
    amax = blocks.abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.view(sn * bn, sk * bk)[:n, :k].contiguous(), scale.contiguous()


def dequantize(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], dtype=torch.float32) -> torch.Tensor:
    """The real-valued [N, K] weight of fp8 weights and their block scales (computed in fp32)."""
    n, k = q.shape
    s = scale.float().repeat_interleave(min(block[0], n), 0)[:n].repeat_interleave(min(block[1], k), 1)[:, :k]
    return (q.float() * s).to(dtype)


def check_block(block) -> tuple[int, int]:
    """A checkpoint's [bn, bk] block size as the kernels take it: powers of two of at least 16."""
    try:
        bn, bk = (int(b) for b in block)
    except (TypeError, ValueError):
        raise ValueError(f"weight_block_size={block!r} must be two integers [rows, columns]") from None
    for b in (bn, bk):
        if b < 16 or b & (b - 1):
            raise ValueError(f"weight_block_size={[bn, bk]}: each size must be a power of two of at least 16 "
                             f"(checkpoints use [128, 128])")
    return bn, bk


def fp8_linear_ref(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int],
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, dequantize(q, scale, block, x.dtype), bias)


def online_block(rows_aligned: list[int], cols_aligned: list[int]) -> tuple[int, int] | None:
    """The block of a layer quantised at load (quantization="fp8" on a bf16 checkpoint): 128 x 128,
    or smaller (a power of two >= 16) so that every size in `rows_aligned` / `cols_aligned` (where a
    fused part or a tensor-parallel shard starts) is a whole number of blocks: SmolLM2's q/k/v rows
    (576 + 192 + 192) get 64. None where no such block exists."""
    def pow2_dividing(sizes):
        g = 0
        for s in sizes:
            g = math.gcd(g, s)
        b = 128
        while b >= 16 and g % b:
            b //= 2
        return b if b >= 16 else None
    bn, bk = pow2_dividing(rows_aligned), pow2_dividing(cols_aligned)
    return None if bn is None or bk is None else (bn, bk)
