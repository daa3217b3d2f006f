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
