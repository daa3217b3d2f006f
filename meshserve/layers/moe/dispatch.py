"""How tokens reach the ranks that hold their experts, and how the results come back.

Expert placement follows Mapping's MoE rule: the `moe_ep` group's member r holds experts
[r * E_local, (r + 1) * E_local); inside an EP slot the `moe_tp` group splits every expert's
intermediate dimension, so each moe_tp member computes a partial sum that one all-reduce completes.

Every rank of an MoE slice sees the same tokens (the TP ranks of one attention group, and the
attention replicas of the "replicate" layout, run the same batch; with attention DP the MoE layer
all-gathers the ranks' tokens first, layers/dp_attention.py). `EpDispatcher` then gives each EP
member its own chunk of ceil(T / ep) tokens and moves each (token, k) assignment of that chunk to
the member holding expert k with one all-to-all; the experts run on what arrived; a second
all-to-all brings the rows back to the chunk's owner, which applies the routing weights and sums over k;
the moe_tp all-reduce completes the partial sums and an all-gather over the EP group gives every
rank every token again.

Buffer sizes depend on T alone (a chunk sends at most C * min(K, E_local) rows to each member), so
the same code runs inside a CUDA graph captured for a batch size: positions inside each member's
buffer come from a cumulative sum, not from host-side counts. `tokens_replicated=False` (tokens
that differ per rank, each rank dispatching its own, every rank's T equal) skips the chunking and the
final all-gather: `own_tokens`, attention DP's direct dispatch (docs/attention_dp.md).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

# run(x [N, H], weights [N, K] fp32, local ids [N, K] with -1 = skip) -> [N, H]
ExpertFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class ExpertPlacement:
    """Which of `num_experts` experts this rank holds: a contiguous block per EP member."""

    def __init__(self, num_experts: int, ep_size: int, ep_rank: int):
        if num_experts % ep_size:
            raise ValueError(f"the model's {num_experts} experts do not split over moe_expert_parallel_size="
                             f"{ep_size}: the expert-parallel size must divide the number of experts")
        self.num_experts = num_experts
        self.ep_size, self.ep_rank = ep_size, ep_rank
        self.num_local = num_experts // ep_size
        self.first = ep_rank * self.num_local

    def owns(self, expert: int) -> bool:
        return self.first <= expert < self.first + self.num_local

    def local_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Global expert ids -> this rank's local ids, -1 where the expert lives elsewhere."""
        if self.ep_size == 1:
            return ids
        local = ids - self.first
        return torch.where((local >= 0) & (local < self.num_local), local, torch.full_like(local, -1))


class EpDispatcher:
    """Dispatch, expert compute and combine over `ep_group` (all-to-all) and `tp_group` (the
    moe_tp all-reduce). With one EP member it is just the experts and the all-reduce."""

    def __init__(self, placement: ExpertPlacement, ep_group, tp_group, tokens_replicated: bool = True):
        self.placement = placement
        self.ep, self.tp = ep_group, tp_group
        self.tokens_replicated = tokens_replicated

    def __call__(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, run: ExpertFn) -> torch.Tensor:
        if self.ep.size == 1:
            return self.tp.all_reduce(run(x, weights, ids))
        return self._exchange(x, weights, ids, run)

    def own_tokens(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, run: ExpertFn) -> torch.Tensor:
        """Tokens that differ per rank (attention DP, every rank's T padded to the same count): each
        rank's rows go straight to the members holding their experts and come back combined."""
        if self.ep.size == 1:
            return self.tp.all_reduce(run(x, weights, ids))
        replicated, self.tokens_replicated = self.tokens_replicated, False
        try:
            return self._exchange(x, weights, ids, run)
        finally:
            self.tokens_replicated = replicated

    def _exchange(self, x, weights, ids, run):
        ep, r = self.ep.size, self.ep.rank_in_group
        num_local = self.placement.num_local
        t, h = x.shape
        k = ids.shape[1]
        if self.tokens_replicated:
            c = -(-t // ep)
            pad = c * ep - t
            if pad:
                x = F.pad(x, (0, 0, 0, pad))
                weights = F.pad(weights, (0, 0, 0, pad))
                ids = F.pad(ids, (0, 0, 0, pad), value=-1)
            x, weights, ids = x[r * c:(r + 1) * c], weights[r * c:(r + 1) * c], ids[r * c:(r + 1) * c]
        else:
            c = t
        cap = c * min(k, num_local)  # rows one member can receive from this chunk
        flat = ids.reshape(-1)
        valid = flat >= 0
        dest = torch.where(valid, flat // num_local, torch.full_like(flat, ep))  # ep: nowhere
        onehot = F.one_hot(dest, ep + 1)[:, :ep]
        slot = (onehot.cumsum(0) - 1).gather(1, dest.clamp(max=ep - 1)[:, None]).squeeze(1)
        trash = ep * cap
        index = torch.where(valid, dest * cap + slot, torch.full_like(flat, trash))
        send_x = x.new_zeros(trash + 1, h)
        send_x.index_copy_(0, index, x.repeat_interleave(k, dim=0))
        send_ids = torch.full((trash + 1,), -1, dtype=torch.int64, device=x.device)
        send_ids.index_copy_(0, index, torch.where(valid, flat % num_local, torch.full_like(flat, -1)))
        send_ids[trash] = -1
        recv_x = self.ep.all_to_all(send_x[:trash])
        recv_ids = self.ep.all_to_all(send_ids[:trash])
        ones = torch.ones(trash, 1, dtype=torch.float32, device=x.device)
        y = run(recv_x, ones, recv_ids[:, None])
        back = self.ep.all_to_all(y)
        back = torch.cat([back, back.new_zeros(1, h)])
        rows = back.index_select(0, index).view(c, k, h).float()
        out = (rows * weights.float()[..., None]).sum(dim=1).to(x.dtype)
        out = self.tp.all_reduce(out)
        if self.tokens_replicated:
            out = self.ep.all_gather(out, dim=0)[:t]
        return out
