"""The MoE router in one Triton kernel: scores, (group-limited) top-k, renormalisation and scaling.

`router_topk(logits, ...)` is the fused form of layers/moe/router.py's torch path (`select_experts`
with `kernel=False`, the reference the tests compare against). On a decode step torch's path is
five to eight launches per layer (softmax, topk's gatherTopK + bitonic sort, the renormalising sum,
a division, a scale); this is one. Each program takes ROWS token rows whole ([ROWS, E_P2] in
registers, E <= 1024), in fp32:

- softmax: exp(x - max) / sum; the choice is the probabilities themselves.
- sigmoid: 1 / (1 + exp(-x)); the choice adds `bias` (DeepSeek-V3's e_score_correction_bias), the
  weights do not.
- groups (n_group > 1): each group of E / n_group consecutive experts is scored by its best choice
  (softmax: DeepSeek-V2's group_limited_greedy) or the sum of its two best (sigmoid: DeepSeek-V3);
  the topk_group best groups stay eligible, the others are masked out.
- top-k: k rounds of (max, lowest index holding it, mask it out), so ids come in descending order of
  the choice (like torch.topk(sorted=True)), ties to the lowest index.
- the weights (the unbiased scores of the chosen experts) divided by their sum (softmax) or by the
  sum + 1e-20 (sigmoid) when renormalising, then times `scale` (routed_scaling_factor).

Writes weights fp32 [T, K] and ids int64 [T, K] (into `ids_out` when given: the expert-load table).
No host sync: it runs inside CUDA graphs.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from meshserve import kernels
from meshserve.kernels.pdl import pdl_enter

MAX_EXPERTS = 1024  # one row of scores per program in registers
MAX_TOPK = 32


@triton.jit
def route_rows(x, bias_ptr, scale, e, e_ok, ROWS: tl.constexpr, E_P2: tl.constexpr, TOPK: tl.constexpr,
               K_P2: tl.constexpr, SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, RENORM: tl.constexpr,
               SCALE: tl.constexpr, N_GROUP: tl.constexpr, NG_P2: tl.constexpr, TOPK_GROUP: tl.constexpr,
               GROUP_SIZE: tl.constexpr):
    """Router logits x [ROWS, E_P2] (fp32; `e` the expert index, `e_ok` e < E) -> (weights [ROWS, K_P2]
    fp32, ids [ROWS, K_P2] int32), columns past TOPK zero. Shared by the router kernel and the
    skinny GEMM's routing epilogue (kernels/gemv.py norm_gemv)."""
    neg = float("-inf")
    if SIGMOID:
        scores = 1.0 / (1.0 + tl.exp(-x))
        choice = scores
        if HAS_BIAS:
            choice = scores + tl.load(bias_ptr + e, mask=e_ok, other=0.0).to(tl.float32)[None, :]
    else:
        x = tl.where(e_ok[None, :], x, neg)
        p = tl.exp(x - tl.max(x, axis=1)[:, None])
        scores = p / tl.sum(p, axis=1)[:, None]
        choice = scores
    choice = tl.where(e_ok[None, :], choice, neg)

    if N_GROUP > 1:
        grp = e // GROUP_SIZE  # >= N_GROUP past E: never kept
        gi = tl.arange(0, NG_P2)
        gscore = tl.full([ROWS, NG_P2], neg, tl.float32)
        for g in tl.static_range(N_GROUP):
            c = tl.where((grp == g)[None, :], choice, neg)
            best = tl.max(c, axis=1)
            if SIGMOID and GROUP_SIZE >= 2:  # the sum of the group's two best
                first = tl.min(tl.where(c == best[:, None], e[None, :], E_P2), axis=1)
                best += tl.max(tl.where(e[None, :] == first[:, None], neg, c), axis=1)
            gscore = tl.where(gi[None, :] == g, best[:, None], gscore)
        keep = grp[None, :] < 0  # all False, [1, E_P2]
        for j in tl.static_range(TOPK_GROUP):
            gbest = tl.max(gscore, axis=1)
            gsel = tl.min(tl.where(gscore == gbest[:, None], gi[None, :], NG_P2), axis=1)
            keep = keep | (grp[None, :] == gsel[:, None])
            gscore = tl.where(gi[None, :] == gsel[:, None], neg, gscore)
        choice = tl.where(keep, choice, neg)

    kk = tl.arange(0, K_P2)
    w = tl.zeros([ROWS, K_P2], dtype=tl.float32)
    ids = tl.zeros([ROWS, K_P2], dtype=tl.int32)
    for j in tl.static_range(TOPK):
        best = tl.max(choice, axis=1)
        idx = tl.min(tl.where(choice == best[:, None], e[None, :], E_P2), axis=1)
        hit = e[None, :] == idx[:, None]
        if SIGMOID:
            val = tl.sum(tl.where(hit, scores, 0.0), axis=1)  # the unbiased score
        else:
            val = best  # choice == scores where eligible
        w = tl.where(kk[None, :] == j, val[:, None], w)
        ids = tl.where(kk[None, :] == j, idx[:, None], ids)
        choice = tl.where(hit, neg, choice)
    if RENORM:
        total = tl.sum(w, axis=1)
        if SIGMOID:
            total += 1e-20
        w = w / total[:, None]
    if SCALE:
        w = w * scale
    return w, ids


@triton.jit(do_not_specialize=["T"])
def _router_kernel(logits_ptr, bias_ptr, w_ptr, ids_ptr, T, E, stride_l, stride_w, stride_i, scale,
                   ROWS: tl.constexpr, E_P2: tl.constexpr, TOPK: tl.constexpr, K_P2: tl.constexpr,
                   SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, RENORM: tl.constexpr, SCALE: tl.constexpr,
                   N_GROUP: tl.constexpr, NG_P2: tl.constexpr, TOPK_GROUP: tl.constexpr,
                   GROUP_SIZE: tl.constexpr, USE_PDL: tl.constexpr = False):
    pdl_enter(USE_PDL)
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    e = tl.arange(0, E_P2)
    row_ok = rows < T
    e_ok = e < E
    x = tl.load(logits_ptr + rows.to(tl.int64)[:, None] * stride_l + e[None, :],
                mask=row_ok[:, None] & e_ok[None, :], other=0.0).to(tl.float32)
    w, ids = route_rows(x, bias_ptr, scale, e, e_ok, ROWS, E_P2, TOPK, K_P2, SIGMOID, HAS_BIAS, RENORM, SCALE,
                        N_GROUP, NG_P2, TOPK_GROUP, GROUP_SIZE)
    kk = tl.arange(0, K_P2)
    out_mask = row_ok[:, None] & (kk < TOPK)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    tl.store(w_ptr + r64 * stride_w + kk[None, :], w, mask=out_mask)
    tl.store(ids_ptr + r64 * stride_i + kk[None, :], ids.to(tl.int64), mask=out_mask)


def route_constexprs(E: int, top_k: int, *, sigmoid: bool, renormalize: bool, has_bias: bool,
                     n_group: Optional[int], topk_group: Optional[int], scale: float) -> dict:
    """The constexpr arguments of `route_rows` for one router (after ROWS)."""
    grouped = n_group is not None and n_group > 1
    return dict(E_P2=triton.next_power_of_2(E), TOPK=top_k, K_P2=triton.next_power_of_2(top_k), SIGMOID=sigmoid,
                HAS_BIAS=has_bias, RENORM=renormalize, SCALE=scale != 1.0,
                N_GROUP=n_group if grouped else 1, NG_P2=triton.next_power_of_2(n_group) if grouped else 1,
                TOPK_GROUP=topk_group if grouped else 1, GROUP_SIZE=E // n_group if grouped else E)


def check_ids_out(ids_out: torch.Tensor, T: int, top_k: int) -> None:
    if ids_out.dtype != torch.int64 or tuple(ids_out.shape) != (T, top_k) or (top_k > 1 and ids_out.stride(1) != 1):
        raise ValueError(f"router ids_out must be int64 [{T}, {top_k}] with unit stride along k; got "
                         f"{ids_out.dtype} {tuple(ids_out.shape)} strides {ids_out.stride()}")


def supports(num_experts: int, top_k: int) -> bool:
    """Whether router_topk takes this router (else the torch path)."""
    return 1 <= top_k <= MAX_TOPK and top_k <= num_experts <= MAX_EXPERTS


def router_topk(logits: torch.Tensor, top_k: int, *, sigmoid: bool = False, renormalize: bool = True,
                bias: Optional[torch.Tensor] = None, n_group: Optional[int] = None,
                topk_group: Optional[int] = None, scale: float = 1.0,
                ids_out: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] (any float dtype) -> (weights fp32 [T, K], ids int64 [T, K]); see the module doc.
    `ids_out`: an int64 [T, K] tensor with unit stride along K that receives the ids."""
    T, E = logits.shape
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    weights = torch.empty(T, top_k, dtype=torch.float32, device=logits.device)
    if ids_out is not None:
        check_ids_out(ids_out, T, top_k)
    ids = ids_out if ids_out is not None else torch.empty(T, top_k, dtype=torch.int64, device=logits.device)
    if T == 0:
        return weights, ids
    meta = route_constexprs(E, top_k, sigmoid=sigmoid, renormalize=renormalize, has_bias=bias is not None,
                            n_group=n_group, topk_group=topk_group, scale=scale)
    rows = 1 if T <= 128 else max(1, min(16, 2048 // meta["E_P2"]))
    warps = max(1, min(4, rows * meta["E_P2"] // 256))
    if bias is not None:
        bias = bias.contiguous()
    _router_kernel[(triton.cdiv(T, rows),)](
        logits, bias if bias is not None else logits, weights, ids, T, E, logits.stride(0), weights.stride(0),
        ids.stride(0), float(scale), ROWS=rows, num_warps=warps, **meta, **kernels.pdl_args())
    return weights, ids
