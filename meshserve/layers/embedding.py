"""Vocab-parallel embedding and LM head. The vocabulary is padded up to a multiple of the tp size;
each rank holds a contiguous slice of rows. Embedding: look up local ids, zero the rest, all-reduce.
LM head: local logits, all-gather, drop the padding columns.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from meshserve.distributed.comm import SOLO
from meshserve.layers.linear import linear


class VocabParallelEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, tp_group=None, params_dtype=None):
        super().__init__()
        self.tp_group = tp_group or SOLO
        tp = self.tp_group.size
        self.num_embeddings = num_embeddings
        self.padded_vocab = -(-num_embeddings // tp) * tp
        self.shard_size = self.padded_vocab // tp
        self.vocab_start = self.tp_group.rank_in_group * self.shard_size
        self.vocab_end = min(self.vocab_start + self.shard_size, num_embeddings)
        self.weight = nn.Parameter(torch.empty(self.shard_size, embedding_dim, dtype=params_dtype),
                                   requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        rows = max(0, self.vocab_end - self.vocab_start)
        param.data.zero_()
        if rows:
            param.data[:rows].copy_(loaded[self.vocab_start:self.vocab_end])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_group.size == 1:
            return F.embedding(input_ids, self.weight)
        mask = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        local = torch.where(mask, input_ids - self.vocab_start, 0)
        y = F.embedding(local, self.weight) * mask.unsqueeze(-1).to(self.weight.dtype)
        return self.tp_group.all_reduce(y)


class ParallelLMHead(VocabParallelEmbedding):
    def __init__(self, num_embeddings: int, embedding_dim: int, tp_group=None, params_dtype=None):
        super().__init__(num_embeddings, embedding_dim, tp_group, params_dtype)

    def tie_to(self, embedding: VocabParallelEmbedding) -> None:
        self.weight = embedding.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [num_tokens, hidden] -> logits [num_tokens, vocab]
        logits = linear(hidden, self.weight)
        if self.tp_group.size > 1:
            logits = self.tp_group.all_gather(logits, -1)
        return logits[..., : self.num_embeddings]
