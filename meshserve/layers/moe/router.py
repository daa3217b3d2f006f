"""Which experts each token goes to, and with what weight.

`select_experts(logits, cfg)` turns router logits [T, E] into (weights [T, K] fp32, ids [T, K]
int64). Every step is a fixed-shape torch op (no host sync), so it runs inside CUDA graphs.

- softmax scoring (Mixtral, Qwen2/3-MoE): softmax over all experts in fp32, top-k, and with
  `renormalize` the k weights are divided by their sum (Mixtral always; Qwen's `norm_topk_prob`).
- sigmoid scoring (DeepSeek-V3): sigmoid scores; the choice adds `correction_bias`
  (`e_score_correction_bias`) but the weights do not; with `n_group` the experts form groups, each
  group is scored by the sum of its two best (bias-corrected) scores, only the `topk_group` best
  groups stay eligible; then top-k, optional renormalisation (sum + 1e-20), and everything times
  `routed_scaling_factor`.
- softmax scoring with `n_group` (DeepSeek-V2's group_limited_greedy): groups scored by their best
  expert.

On CUDA (Triton available) all of it is one kernel, kernels/moe_router.py (`router_topk`); the torch
ops below are its reference and the path everywhere else. `kernel=True` (or the module switch
`USE_KERNEL = True`) also takes the kernel on CPU under Triton's interpreter (tests).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from meshserve import kernels

SCORINGS = ("softmax", "sigmoid")

# None: the fused kernel on CUDA where Triton runs, torch elsewhere; True: the kernel also on CPU
# under TRITON_INTERPRET=1 (tests); False: always torch.
USE_KERNEL: Optional[bool] = None


@dataclass(frozen=True)
class RouterConfig:
    top_k: int
    renormalize: bool = True
    scoring: str = "softmax"
    n_group: Optional[int] = None
    topk_group: Optional[int] = None
    routed_scaling_factor: float = 1.0

    def __post_init__(self):
        if self.scoring not in SCORINGS:
            raise ValueError(f"router scoring={self.scoring!r} is not supported; accepted: {', '.join(SCORINGS)}")
        if self.top_k < 1:
            raise ValueError(f"num_experts_per_tok={self.top_k} must be >= 1")
        if (self.n_group is None) != (self.topk_group is None):
            raise ValueError(f"n_group={self.n_group} and topk_group={self.topk_group}: give both or neither")

    def check(self, num_experts: int) -> None:
        """ValueErrors naming the numbers for a router that cannot work with `num_experts`."""
        if self.top_k > num_experts:
            raise ValueError(f"num_experts_per_tok={self.top_k} is larger than the number of experts {num_experts}")
        if self.n_group is not None and self.n_group > 1:
            if num_experts % self.n_group:
                raise ValueError(f"n_group={self.n_group} must divide the number of experts {num_experts}")
            if not 1 <= self.topk_group <= self.n_group:
                raise ValueError(f"topk_group={self.topk_group} must be between 1 and n_group={self.n_group}")
            if self.top_k > self.topk_group * num_experts // self.n_group:
                raise ValueError(f"num_experts_per_tok={self.top_k} exceeds the experts of topk_group="
                                 f"{self.topk_group} groups of {num_experts // self.n_group}")


def _limit_to_groups(choice: torch.Tensor, cfg: RouterConfig) -> torch.Tensor:
    """`choice` with the experts outside each token's best `topk_group` groups set to -inf."""
    t, e = choice.shape
    grouped = choice.view(t, cfg.n_group, e // cfg.n_group)
    if cfg.scoring == "sigmoid":
        group_scores = grouped.topk(min(2, e // cfg.n_group), dim=-1)[0].sum(dim=-1)
    else:
        group_scores = grouped.amax(dim=-1)
    group_idx = torch.topk(group_scores, k=cfg.topk_group, dim=-1, sorted=False)[1]
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
    keep = keep.unsqueeze(-1).expand(t, cfg.n_group, e // cfg.n_group).reshape(t, e)
    return choice.masked_fill(~keep, float("-inf"))


def _topk(x: torch.Tensor, k: int, ids_out: Optional[torch.Tensor], sorted: bool = True):
    if ids_out is None:
        return torch.topk(x, k, dim=-1, sorted=sorted)
    values = torch.empty(x.shape[0], k, dtype=x.dtype, device=x.device)
    return torch.topk(x, k, dim=-1, sorted=sorted, out=(values, ids_out))


def _use_kernel(logits: torch.Tensor, cfg: RouterConfig, kernel: Optional[bool]) -> bool:
    choice = USE_KERNEL if kernel is None else kernel
    if choice is False or logits.dim() != 2 or not kernels.TRITON_INSTALLED:
        return False
    from meshserve.kernels.moe_router import supports
    if not supports(logits.shape[1], cfg.top_k):
        return False
    if logits.is_cuda:
        return kernels.TRITON_AVAILABLE
    return choice is True and logits.device.type == "cpu" and kernels.interpreting()


def select_experts(logits: torch.Tensor, cfg: RouterConfig, correction_bias: Optional[torch.Tensor] = None,
                   ids_out: Optional[torch.Tensor] = None,
                   kernel: Optional[bool] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, K] float32, ids [T, K] int64) for router logits [T, E]. `ids_out` ([T, K]
    int64) receives the ids in place (the expert-load table, with no extra copy). `kernel`: None
    follows USE_KERNEL; True/False force the fused kernel (CUDA, or CPU under the interpreter) or
    the torch ops. The kernel gives ids in descending order of the choice (the torch path's sigmoid
    branch leaves them unsorted); the weights' order follows the ids in both."""
    if _use_kernel(logits, cfg, kernel):
        from meshserve.kernels.moe_router import router_topk
        sigmoid = cfg.scoring == "sigmoid"
        return router_topk(logits, cfg.top_k, sigmoid=sigmoid, renormalize=cfg.renormalize,
                           bias=correction_bias if sigmoid else None, n_group=cfg.n_group,
                           topk_group=cfg.topk_group, scale=cfg.routed_scaling_factor, ids_out=ids_out)
    logits = logits.float()
    grouped = cfg.n_group is not None and cfg.n_group > 1
    if cfg.scoring == "softmax":
        scores = torch.softmax(logits, dim=-1)
        choice = scores
        if grouped:
            choice = _limit_to_groups(scores, cfg)
        weights, ids = _topk(choice, cfg.top_k, ids_out)
        if grouped:
            weights = scores.gather(1, ids)
        if cfg.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
    else:
        scores = logits.sigmoid()
        choice = scores if correction_bias is None else scores + correction_bias.float()
        if grouped:
            choice = _limit_to_groups(choice, cfg)
        ids = _topk(choice, cfg.top_k, ids_out, sorted=False)[1]
        weights = scores.gather(1, ids)
        if cfg.renormalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    if cfg.routed_scaling_factor != 1.0:
        weights = weights * cfg.routed_scaling_factor
    return weights, ids
