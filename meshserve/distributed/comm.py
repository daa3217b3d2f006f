"""The smallest group interface layers need, and the one-rank group used when nothing is split.

Layers receive a group object (a `GroupCoordinator` from parallel_state, or `SOLO`) and call only
`size`, `rank_in_group`, `all_reduce`, `all_gather`; they never ask torch.distributed directly.
"""
from __future__ import annotations

import torch


class SoloGroup:
    """A group of one rank: every collective is the identity."""

    size = 1
    rank_in_group = 0
    ranks = [0]

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        return tensor

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        return tensor

    def barrier(self) -> None:
        pass


SOLO = SoloGroup()


class PipelineChannel:
    """Hidden states (and the residual) from one pipeline stage to the next, over the pp group's
    device group (NCCL on GPU, gloo on CPU). `group` is a GroupCoordinator of the pp dimension."""

    def __init__(self, group):
        self.group = group
        self.size = group.size
        self.rank_in_group = group.rank_in_group

    def send_hidden(self, hidden: torch.Tensor, residual: torch.Tensor) -> None:
        nxt = self.rank_in_group + 1
        self.group.send(hidden.contiguous(), nxt)
        self.group.send(residual.contiguous(), nxt)

    def recv_hidden(self, num_tokens: int, hidden_size: int, dtype: torch.dtype, device: torch.device):
        prev = self.rank_in_group - 1
        hidden = torch.empty(num_tokens, hidden_size, dtype=dtype, device=device)
        residual = torch.empty_like(hidden)
        self.group.recv(hidden, prev)
        self.group.recv(residual, prev)
        return hidden, residual
