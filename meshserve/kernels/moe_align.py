"""Alignment of the fused MoE kernels (kernels/moe.py): the (token, k) assignments sorted by expert,
each expert's segment padded to BLOCK_M rows, as the grouped GEMM reads them. Up to 256 assignments
one program sorts them in assignment space (`_align_small_kernel`, its arithmetic `_assignment_slots`
shared with the decode path's self-sorting GEMM); more take `_count_kernel` per chunk, then
`_place_kernel`. No kernel needs the host to look at device data, so decode steps capture in CUDA
graphs. Tests: tests/unit/test_moe_experts.py (interpreter), tests/gpu/test_moe_decode_kernels.py."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from meshserve import kernels
from meshserve.kernels.pdl import pdl_enter

_INTERPRET = kernels.interpreting()


# ----------------------------------------------------------------------------------------------------
# Alignment: sort the assignments by expert, each expert's segment padded to BLOCK_M rows.

# Sizes that change with the batch are runtime arguments, not specialized (Triton would otherwise
# compile a variant per "divisible by 16" / "equal to 1" pattern, ~0.5 s each, mid-serving).
@triton.jit(do_not_specialize=["n", "chunk_iters"])
def _count_kernel(ids_ptr, counts_ptr, n, chunk_iters, SUB: tl.constexpr, E_P2: tl.constexpr,
                  USE_PDL: tl.constexpr = False):
    pdl_enter(USE_PDL)
    c = tl.program_id(0)
    e = tl.arange(0, E_P2)
    acc = tl.zeros([E_P2], dtype=tl.int32)
    for s in range(chunk_iters):
        i = (c * chunk_iters + s) * SUB + tl.arange(0, SUB)
        ids = tl.load(ids_ptr + i, mask=i < n, other=-1).to(tl.int32)
        acc += tl.sum((ids[:, None] == e[None, :]).to(tl.int32), axis=0)
    tl.store(counts_ptr + c * E_P2 + e, acc)


@triton.jit(do_not_specialize=["n", "max_padded", "num_chunks", "chunk_iters", "pos_iters"])
def _place_kernel(ids_ptr, counts_ptr, sorted_ptr, block_expert_ptr, n, max_padded, num_chunks, chunk_iters,
                  pos_iters, SUB: tl.constexpr, E: tl.constexpr, E_P2: tl.constexpr, BLOCK_M: tl.constexpr,
                  USE_PDL: tl.constexpr = False):
    pdl_enter(USE_PDL)
    c = tl.program_id(0)
    e = tl.arange(0, E_P2)
    total = tl.zeros([E_P2], dtype=tl.int32)  # assignments per expert
    before = tl.zeros([E_P2], dtype=tl.int32)  # of them in earlier chunks
    for r in range(num_chunks):
        row = tl.load(counts_ptr + r * E_P2 + e)
        total += row
        before += tl.where((e * 0 + r) < c, row, 0)
    padded = (total + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    pad_end = tl.cumsum(padded, axis=0)
    pad_start = pad_end - padded
    used_end = pad_start + total  # slots from here to pad_end are padding
    running = pad_start + before
    # This chunk's assignments, in order, into their experts' segments.
    for s in range(chunk_iters):
        i = (c * chunk_iters + s) * SUB + tl.arange(0, SUB)
        ids = tl.load(ids_ptr + i, mask=i < n, other=-1).to(tl.int32)
        onehot = (ids[:, None] == e[None, :]).to(tl.int32)  # [SUB, E_P2]
        rank = tl.cumsum(onehot, axis=0) - onehot  # same-expert assignments before it in this step
        dest = tl.sum(onehot * (rank + running[None, :]), axis=1)
        tl.store(sorted_ptr + dest, i, mask=(ids >= 0) & (i < n))
        running += tl.sum(onehot, axis=0)
    # This program's share of the slots: sentinels into the padding, experts of the blocks.
    for s in range(pos_iters):
        p = (c * pos_iters + s) * SUB + tl.arange(0, SUB)
        ex = tl.sum((pad_end[None, :] <= p[:, None]).to(tl.int32), axis=1)  # the segment holding slot p
        mine = e[None, :] == ex[:, None]
        is_pad = p >= tl.sum(tl.where(mine, used_end[None, :], 0), axis=1)  # (0 past the last segment)
        valid = p < max_padded
        tl.store(sorted_ptr + p, n + p * 0, mask=valid & is_pad)
        tl.store(block_expert_ptr + p // BLOCK_M, tl.where(ex < E, ex, -1), mask=valid & (p % BLOCK_M == 0))


@triton.jit
def _assignment_slots(ids_ptr, n, N_P2: tl.constexpr, CJ: tl.constexpr, BLOCK_M: tl.constexpr):
    """For the n (<= N_P2) assignments: (id, count of its expert, same-expert assignments before it,
    padded start of its expert's segment, padded rows of all experts). With same[i, j] = (id_i ==
    id_j): the padded start is the sum, over the first assignment j of each expert with id_j <
    id_i, of that expert's count rounded up to BLOCK_M. [N_P2, CJ] compares, CJ assignments j at a
    time; an id of -1 (another rank's expert) matches nothing and gets no slot."""
    i = tl.arange(0, N_P2)
    id_i = tl.load(ids_ptr + i, mask=i < n, other=-1).to(tl.int32)
    cnt = tl.zeros([N_P2], dtype=tl.int32)  # assignments of i's expert
    rank = tl.zeros([N_P2], dtype=tl.int32)  # of them before i
    start = tl.zeros([N_P2], dtype=tl.int32)  # padded start of i's expert's segment
    total = tl.zeros([CJ], dtype=tl.int32)  # padded rows of all experts (summed at the end)
    for c in range(N_P2 // CJ):
        j = c * CJ + tl.arange(0, CJ)
        id_j = tl.load(ids_ptr + j, mask=j < n, other=-1).to(tl.int32)
        ok_j = id_j >= 0
        same = (id_i[:, None] == id_j[None, :]) & ok_j[None, :]  # [N_P2, CJ]; -1 rows never match
        cnt += tl.sum(same.to(tl.int32), axis=1)
        rank += tl.sum((same & (j[None, :] < i[:, None])).to(tl.int32), axis=1)
        cnt_j = tl.sum(same.to(tl.int32), axis=0)
        first_j = ok_j & (tl.sum((same & (i[:, None] < j[None, :])).to(tl.int32), axis=0) == 0)
        pad_j = tl.where(first_j, (cnt_j + BLOCK_M - 1) // BLOCK_M * BLOCK_M, 0)
        start += tl.sum(tl.where(id_j[None, :] < id_i[:, None], pad_j[None, :], 0), axis=1)
        total += pad_j
    return id_i, cnt, rank, start, tl.sum(total, axis=0)


@triton.jit(do_not_specialize=["n", "max_padded", "tail_iters"])
def _align_small_kernel(ids_ptr, sorted_ptr, block_expert_ptr, n, max_padded, tail_iters,
                        N_P2: tl.constexpr, CJ: tl.constexpr, BLOCK_M: tl.constexpr, MAXB: tl.constexpr,
                        TAIL: tl.constexpr, USE_PDL: tl.constexpr = False):
    """The whole alignment of up to N_P2 assignments in one program, in assignment space (no
    per-expert arrays, so E does not matter): assignment i's slot is (the padded start of its
    expert) + (same-expert assignments before it), from _assignment_slots. Then each expert's first
    assignment writes its segment's padding sentinels and block experts; slots past the used ones
    get the sentinel n, blocks past them -1 (all stores disjoint: no barrier)."""
    pdl_enter(USE_PDL)
    i = tl.arange(0, N_P2)
    id_i, cnt, rank, start, used = _assignment_slots(ids_ptr, n, N_P2, CJ, BLOCK_M)
    ok_i = id_i >= 0
    tl.store(sorted_ptr + start + rank, i, mask=ok_i)
    # Each expert's first assignment: its segment's padding and its blocks.
    first = ok_i & (rank == 0)
    padded = (cnt + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    for m0 in tl.static_range(0, BLOCK_M, 16):
        o = m0 + tl.arange(0, 16)
        fill = first[:, None] & (cnt[:, None] + o[None, :] < padded[:, None])
        tl.store(sorted_ptr + (start + cnt)[:, None] + o[None, :], n + o[None, :] * 0 + i[:, None] * 0, mask=fill)
    b = tl.arange(0, MAXB)
    mine = first[:, None] & (b[None, :] * BLOCK_M < padded[:, None])
    tl.store(block_expert_ptr + (start // BLOCK_M)[:, None] + b[None, :], id_i[:, None] + b[None, :] * 0, mask=mine)
    # Past the used slots.
    for s in range(tail_iters):
        p = s * TAIL + tl.arange(0, TAIL)
        rest = (p >= used) & (p < max_padded)
        tl.store(sorted_ptr + p, n + p * 0, mask=rest)
        tl.store(block_expert_ptr + p // BLOCK_M, p * 0 - 1, mask=rest & (p % BLOCK_M == 0))


_SUB = 64  # assignments (or slots) per step of the multi-program alignment kernels
_MAX_CHUNKS = 64  # programs of the alignment kernels
_SINGLE_MAX = 256  # up to this many assignments one program sorts them (_align_small_kernel)


def padded_rows(num_assignments: int, num_experts: int, block_m: int) -> int:
    """Static upper bound on the sorted, padded rows: each used expert adds at most BLOCK_M-1 padding."""
    rows = num_assignments + min(num_experts, num_assignments) * (block_m - 1)
    return triton.cdiv(rows, block_m) * block_m


def _align_small(ids: torch.Tensor, n: int, P: int, block_m: int, sorted_ids, block_expert) -> None:
    n_p2 = max(8, triton.next_power_of_2(n))
    cj = min(n_p2, max(16, 4096 // n_p2))
    tail = min(1024, triton.next_power_of_2(P))
    warps = 1 if n_p2 <= 32 else (2 if n_p2 <= 64 else 4)
    extra = {} if _INTERPRET else {"num_warps": warps}
    _align_small_kernel[(1,)](ids, sorted_ids, block_expert, n, P, triton.cdiv(P, tail), N_P2=n_p2, CJ=cj,
                              BLOCK_M=block_m, MAXB=triton.next_power_of_2(triton.cdiv(n_p2, block_m)),
                              TAIL=tail, **extra, **kernels.pdl_args())


def align_block_size(topk_ids: torch.Tensor, num_experts: int, block_m: int,
                     small_max: int = _SINGLE_MAX) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted_ids int32 [P], block_expert int32 [P // block_m]) with P = padded_rows(..): the flat
    assignment indices grouped by expert (stable), each group padded with the sentinel T*K to a
    multiple of block_m; block_expert[b] is the expert of rows b*block_m.., -1 past the used rows.
    Up to `small_max` assignments: one program (_align_small_kernel); more: _count_kernel per chunk,
    then _place_kernel per chunk."""
    ids = topk_ids.reshape(-1)
    if ids.stride(0) != 1:
        ids = ids.contiguous()
    n = ids.numel()
    P = padded_rows(n, num_experts, block_m)
    sorted_ids = torch.empty(P, dtype=torch.int32, device=ids.device)
    block_expert = torch.empty(P // block_m, dtype=torch.int32, device=ids.device)
    if n == 0:
        return sorted_ids, block_expert
    if n <= small_max:
        _align_small(ids, n, P, block_m, sorted_ids, block_expert)
        return sorted_ids, block_expert
    e_p2 = max(16, triton.next_power_of_2(num_experts))
    chunk_iters = triton.cdiv(triton.cdiv(n, _SUB), _MAX_CHUNKS)
    num_chunks = triton.cdiv(n, chunk_iters * _SUB)
    pos_iters = triton.cdiv(triton.cdiv(P, _SUB), num_chunks)
    counts = torch.empty(num_chunks, e_p2, dtype=torch.int32, device=ids.device)
    _count_kernel[(num_chunks,)](ids, counts, n, chunk_iters, SUB=_SUB, E_P2=e_p2, **kernels.pdl_args())
    _place_kernel[(num_chunks,)](ids, counts, sorted_ids, block_expert, n, P, num_chunks, chunk_iters, pos_iters,
                                 SUB=_SUB, E=num_experts, E_P2=e_p2, BLOCK_M=block_m,
                                 **kernels.pdl_args())
    return sorted_ids, block_expert
