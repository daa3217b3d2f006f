"""Slot-to-slot copy between two paged KV caches in one pass (Triton): DEFAULT's same-host GPU path
(disagg/cuda_ipc.py) copies a request's tokens from the context server's cache, opened by CUDA IPC,
into the generation server's blocks. torch's index_select + index_copy_ (kv_io.copy_slots on the
CPU, the reference the tests compare against) reads and writes every byte twice through a temporary
and gathers strided head slices; here each program copies ROWS tokens' rows (a token's head range is
one contiguous run of heads x dim values; a latent row is the whole row) straight from source slot
to destination slot, K and V as the second grid axis.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from meshserve import kernels
from meshserve.kernels.pdl import pdl_enter


@triton.jit
def _copy_rows_kernel(src_ptr, dst_ptr, src_idx_ptr, dst_idx_ptr, n, src_kv_stride, dst_kv_stride,
                      src_slot_stride, dst_slot_stride, src_off, dst_off,
                      ROW: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr, USE_PDL: tl.constexpr = False):
    pdl_enter(USE_PDL)
    t = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    kv = tl.program_id(1).to(tl.int64)
    tm = t < n
    s = tl.load(src_idx_ptr + t, mask=tm, other=0).to(tl.int64)
    d = tl.load(dst_idx_ptr + t, mask=tm, other=0).to(tl.int64)
    src_rows = src_ptr + kv * src_kv_stride + s * src_slot_stride + src_off
    dst_rows = dst_ptr + kv * dst_kv_stride + d * dst_slot_stride + dst_off
    for c in tl.static_range(0, ROW, BLOCK):
        e = c + tl.arange(0, BLOCK)
        m = tm[:, None] & (e < ROW)[None, :]
        v = tl.load(src_rows[:, None] + e[None, :], mask=m)
        tl.store(dst_rows[:, None] + e[None, :], v, mask=m)


def copy_rows(src_flat: torch.Tensor, src_idx: torch.Tensor, src_off: int, dst_flat: torch.Tensor,
              dst_idx: torch.Tensor, dst_off: int, row: int) -> None:
    """For each i: the `row` values at src_flat slot src_idx[i] (from element `src_off` of the slot)
    into dst_flat slot dst_idx[i] (from `dst_off`), for K and V. src_flat / dst_flat: [2, slots, ...]
    (full caches) or [slots, ...] (latent), each slot's values contiguous; the same dtype."""
    n = src_idx.numel()
    if n == 0:
        return
    full = src_flat.dim() == 4
    kv = 2 if full else 1
    sdim = 1 if full else 0
    block = min(1024, triton.next_power_of_2(row))
    rows = max(1, min(16, 4096 // block))
    _copy_rows_kernel[(triton.cdiv(n, rows), kv)](
        src_flat, dst_flat, src_idx, dst_idx, n, src_flat.stride(0) if full else 0,
        dst_flat.stride(0) if full else 0, src_flat.stride(sdim), dst_flat.stride(sdim), src_off, dst_off,
        ROW=row, BLOCK=block, ROWS=rows, **kernels.pdl_args())
