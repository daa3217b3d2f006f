"""Context parallelism, ULYSSES (DeepSpeed-Ulysses; the seed's `cp_type: ULYSSES`).

Every rank of a cp group runs the same batch (the same SchedulerOutput, the same attention
metadata), but each takes a contiguous 1/cp of the step's tokens through everything outside
attention (embedding output, norms, MLPs or experts, the residual stream). Around attention two
all-to-alls trade the split: tokens for heads before it (each rank gets every token of 1/cp of the
heads), heads for tokens after it. So each rank attends over the whole sequence for its heads and
its KV cache holds only those heads (1/cp of the KV memory per rank); the scheduler, block tables
and prefix cache are the same as without cp. The last norm's output is all-gathered so the sampling
rank has every token's hidden state.

    rank c: x [T/cp, H*D] --all-to-all(cp)--> [T, H/cp * D] --attention(its heads, whole sequence)-->
            [T, H/cp * D] --all-to-all(cp)--> [T/cp, H*D]

KV heads fewer than cp (per TP rank) are repeated first, so each rank receives the one KV head its
query heads use. Steps whose token count does not divide by cp are padded at the end (the padding
rows never reach attention). The other cp types (RING, STAR, HELIX) shard the KV cache by sequence
and merge partial attention by its log-sum-exp (the backends' `return_lse`); they are refused for
now (engine/setup.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class CpSplit:
    """This step's token split over the cp group, shared by one model's layers (set by the runner)."""

    def __init__(self, group):
        self.group = group
        self.size, self.rank = group.size, group.rank_in_group
        self.total = self.chunk = self.start = self.num = 0

    def set_step(self, num_tokens: int) -> None:
        self.total = num_tokens
        self.chunk = -(-num_tokens // self.size)
        self.start = min(num_tokens, self.rank * self.chunk)
        self.num = min(num_tokens, self.start + self.chunk) - self.start

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """[T, ...] (the same on every cp rank) -> this rank's [T/cp, ...] rows, zero-padded."""
        part = x[self.start:self.start + self.num]
        if self.num < self.chunk:
            part = F.pad(part, (0, 0) * (x.dim() - 1) + (0, self.chunk - self.num))
        return part

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """[T/cp, ...] on each rank -> [T, ...] on every rank."""
        return self.group.all_gather(x.contiguous(), dim=0)[:self.total]

    def tokens_to_heads(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        """[T/cp, heads * D] -> [T, heads/cp * D]: every token, this rank's share of the heads."""
        cp, c = self.size, self.chunk
        d = x.shape[1] // heads
        pieces = x.reshape(c, cp, heads // cp * d).transpose(0, 1)  # piece j: rank j's heads
        y = self.group.all_to_all(pieces.reshape(cp * c, -1))  # from rank i: its tokens of my heads
        return y[:self.total]

    def heads_to_tokens(self, y: torch.Tensor) -> torch.Tensor:
        """[T, h * D] (this rank's heads) -> [T/cp, cp * h * D]: this rank's tokens, every head."""
        cp, c = self.size, self.chunk
        if y.shape[0] < cp * c:
            y = F.pad(y, (0, 0, 0, cp * c - y.shape[0]))
        got = self.group.all_to_all(y.contiguous())  # from rank j: my tokens of its heads
        return got.reshape(cp, c, -1).transpose(0, 1).reshape(c, -1)
