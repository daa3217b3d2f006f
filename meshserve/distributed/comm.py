"""The smallest group interface layers need, and the one-rank group used when nothing is split.

Layers receive a group object (a `GroupCoordinator` from parallel_state, or `SOLO`) and call only
`size`, `rank_in_group`, `all_reduce`, `all_gather`, `reduce_scatter`, `all_to_all`, `broadcast`;
they never ask torch.distributed directly. `SOLO_STATE` is the ParallelState of a one-rank job.
"""
from __future__ import annotations

import torch

from meshserve.mapping import Mapping


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

    def reduce_scatter(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        return tensor

    def all_to_all(self, tensor: torch.Tensor, output_split_sizes=None, input_split_sizes=None) -> torch.Tensor:
        return tensor.clone()

    def barrier(self) -> None:
        pass


SOLO = SoloGroup()

# the parallel dimensions a ParallelState holds a group for (besides `world`)
DIMENSIONS = ("tp", "pp", "cp", "moe_tp", "moe_ep", "attn_tp", "attn_dp", "tp_cp")


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


class SoloParallelState:
    """The ParallelState of a one-rank job: every dimension is `SOLO`. Models and the runner take
    a ParallelState (or this) and pick the groups they need by name."""

    def __init__(self):
        self.mapping = Mapping()
        self.world = SOLO
        for name in DIMENSIONS:
            setattr(self, name, SOLO)
        self.dp_tokens = None
        self.cp_split = None


SOLO_STATE = SoloParallelState()
