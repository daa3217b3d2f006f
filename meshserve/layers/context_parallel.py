"""Context parallelism: ULYSSES (DeepSpeed-Ulysses), RING and HELIX (the KV cache sharded by sequence).

ULYSSES. Every rank of a cp group runs the same batch (the same SchedulerOutput, the same attention
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
rows never reach attention).

RING. The token split outside attention is ULYSSES's, but the KV cache is sharded by sequence:
each block of the scheduler's `tokens_per_block` (S) tokens is cut into cp sub-blocks of B = S/cp
tokens and cp rank r holds sub-block r of every block, in its own cache block of the same id (so
the scheduler, block tables and prefix cache are unchanged, and each rank's block is 1/cp of the
bytes). In attention every rank gathers the step's q, k, v (all heads), writes the k/v of the
positions it holds, and attends every query to its shard of the keys, returning each row's
log-sum-exp; an all-to-all sends each rank the cp partials of its own tokens, merged by their
log-sum-exp (`merge_attention`). This is the exchange of ring attention's decode phase (queries
to the KV shards); for new tokens the KV moves to its owner by the all-gather rather than round a
ring, so the result is exact attention for prefill and decode alike.

    rank r: qkv [T/cp] --all-gather(cp)--> [T] --attention(keys at rank r's sub-blocks)--> (o, lse) [T]
            --all-to-all(cp)--> cp partials of its [T/cp] --merge by lse--> o [T/cp]

A query at position p sees, of rank r's keys (increasing positions, a prefix of its local
sequence), n_r(p) = (p // S) * B + (B if r < t, p % B + 1 if r == t, else 0) with t = p % S // B.
That is not the causal shape of a sequence's new rows: the torch and Triton backends take each
row's last visible key (`AttentionMetadata.query_positions`), so a request's new tokens stay one
sequence; for other backends (latent attention) each query runs as its own one-row sequence of
n_r(p) keys over the request's block table, which any decode path serves (`ring_metadata`). Rows
that see no key on a rank (n_r = 0) contribute nothing to the merge.

HELIX (Helix parallelism). RING's KV sharding and metadata, but no token split: every cp rank
runs every token. After attention an all-to-all over cp trades the partials so that each rank
holds the merged attention of every token for 1/cp of its tp rank's heads (`merge_helix`), and the
layers after attention run as one tensor-parallel group over the tp x cp ranks (o_proj split by
those head slices, the MLP by tp x cp; `ParallelState.tp_cp`). MoE layers keep their experts over
the tp slice (moe_tp x moe_ep, replicated over cp) and take 1/cp of the tokens each (split before, gather after).

    rank (t, c): hidden [T] --qkv (tp)--> attention over its shard --all-to-all(cp), merge-->
                 [T, H/(tp cp) * D] --o_proj, MLP over tp x cp (all-reduce)--> hidden [T]
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from meshserve.layers.attention.backend import AttentionMetadata, merge_attention


class CpSplit:
    """This step's token split over the cp group, shared by one model's layers (set by the runner)."""

    def __init__(self, group, ring: bool = False, helix: bool = False):
        self.group = group
        self.size, self.rank = group.size, group.rank_in_group
        # RING: the KV cache sharded by sequence (the step's attention metadata is over this rank's
        # shard), else ULYSSES; HELIX: RING's cache and metadata, every token on every rank, the
        # layers after attention over tp x cp
        self.ring = ring or helix
        self.helix = helix
        self.total = self.chunk = self.start = self.num = 0
        self.ring_empty: Optional[torch.Tensor] = None  # RING: [T] rows that see no key of this rank

    def set_step(self, num_tokens: int, ring_empty: Optional[torch.Tensor] = None) -> None:
        self.ring_empty = ring_empty
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

    def _drop_empty(self, o: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The partials with the rows that saw none of this rank's keys set to (0, -inf): a one-row
        sequence is given at least one key (ring_metadata), so its backend's row is not that."""
        empty = self.ring_empty[:, None]
        return o.masked_fill(empty, 0), lse.float().masked_fill(empty, float("-inf"))

    def merge_ring(self, o: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
        """RING: o [T, H*D] and lse [T, H], this rank's partial attention of every query -> the
        merged attention of this rank's tokens [T/cp, H*D] (the others' partials by all-to-all)."""
        cp, c = self.size, self.chunk
        heads = lse.shape[1]
        o, lse = self._drop_empty(o, lse)
        if o.shape[0] < cp * c:
            o = F.pad(o, (0, 0, 0, cp * c - o.shape[0]))
            lse = F.pad(lse, (0, 0, 0, cp * c - lse.shape[0]), value=float("-inf"))
        outs = self.group.all_to_all(o.contiguous()).view(cp, c, heads, -1)  # from rank j: its partial of my rows
        lses = self.group.all_to_all(lse.contiguous()).view(cp, c, heads)
        out, _ = merge_attention(list(outs.unbind(0)), list(lses.unbind(0)))
        return out.reshape(c, -1)

    def merge_helix(self, o: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
        """HELIX: o [T, H*D] and lse [T, H], this rank's partial attention of every query over its
        KV shard -> every token's merged attention for this rank's 1/cp of the heads [T, H/cp*D]
        (an all-to-all sends head slice j of the partials to cp rank j)."""
        cp = self.size
        t, heads = lse.shape
        h = heads // cp
        o, lse = self._drop_empty(o, lse)
        outs = self.group.all_to_all(o.view(t, cp, -1).transpose(0, 1).reshape(cp * t, -1))
        lses = self.group.all_to_all(lse.view(t, cp, h).transpose(0, 1).reshape(cp * t, h))
        out, _ = merge_attention(list(outs.view(cp, t, h, -1).unbind(0)), list(lses.view(cp, t, h).unbind(0)))
        return out.reshape(t, -1)


def ring_metadata(positions: np.ndarray, rows: np.ndarray, tables: np.ndarray, block_size: int, rank: int,
                  size: int, backend, device) -> tuple[AttentionMetadata, torch.Tensor]:
    """RING / HELIX: this step's attention metadata over cp rank `rank`'s KV shard, and the [T] rows
    that see none of its keys. positions [T]: each new token's position; rows [T]: the row of its
    request in tables [R, max_blocks] (the scheduler's block ids, blocks of `block_size` tokens),
    request by request as the runner lays them out. The k/v of the positions this rank holds go to
    their slots, the others to the null block 0. A query at position p sees n_r(p) of the rank's keys
    (module docstring): with a backend that takes each row's last key (`supports_query_positions`)
    each request's new tokens are one sequence with those limits; otherwise each query is a one-row
    sequence of n_r(p) keys (any backend's decode path)."""
    sub = block_size // size  # B: tokens of each block this rank holds
    positions = np.asarray(positions, dtype=np.int64)
    rows = np.asarray(rows, dtype=np.int64)
    blk, owner, off = positions // block_size, positions % block_size // sub, positions % sub
    owned = owner == rank
    tables = np.asarray(tables, dtype=np.int64).reshape(len(tables), -1)
    block_ids = tables[rows, blk] if len(rows) else np.zeros(0, np.int64)
    slots = np.where(owned, block_ids * sub + off, 0)
    seen = blk * sub + np.where(rank < owner, sub, np.where(owned, off + 1, 0))
    empty = seen == 0
    n = len(positions)

    def dev(x, dtype):
        return torch.as_tensor(np.ascontiguousarray(x), dtype=dtype).to(device)

    qpos = None
    if getattr(backend, "supports_query_positions", False):  # one sequence per request
        starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]]) if n else np.zeros(0, np.int64)
        q_lens = np.diff(np.r_[starts, n])
        ends = starts + q_lens - 1
        seq_lens = np.maximum(seen[ends], 1)
        seq_rows = rows[starts]
        q_loc = np.r_[0, np.cumsum(q_lens)]
        qpos = dev(seen - 1, torch.int32)
    else:  # a one-row sequence per query
        q_lens = np.ones(n, np.int64)
        seq_lens = np.maximum(seen, 1)
        seq_rows = rows
        q_loc = np.arange(n + 1)
    width = max(1, -(-int(seq_lens.max(initial=1)) // sub))
    per_seq = tables[seq_rows][:, :width] if len(seq_rows) else np.zeros((0, width), np.int64)
    if per_seq.shape[1] < width:
        per_seq = np.pad(per_seq, ((0, 0), (0, width - per_seq.shape[1])))
    decode = bool(len(q_lens)) and int(q_lens.max()) == 1
    common = AttentionMetadata(
        slot_mapping=dev(slots, torch.int64), query_start_loc=dev(q_loc, torch.int32),
        seq_lens=dev(seq_lens, torch.int32), block_tables=dev(per_seq, torch.int32),
        max_query_len=int(q_lens.max(initial=0)), max_seq_len=int(seq_lens.max(initial=0)), block_size=sub,
        num_decodes=len(q_lens) if decode else 0, query_positions=qpos)
    return backend.build(common, q_lens.tolist()), dev(empty, torch.bool)
