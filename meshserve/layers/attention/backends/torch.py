"""Paged attention: the per-step metadata, the KV write, and the torch reference backend.

The model runner builds one `AttentionMetadata` per step and passes it down the forward call.
Each `Attention` module holds its layer's KV cache tensor, bound once after allocation:
  kv_cache: [2, num_blocks, block_size, num_kv_heads, head_dim]
The torch backend gathers each sequence's blocks and runs SDPA with a causal (and optional
sliding-window) mask: the oracle for the Triton kernels and the CPU path.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64; padding tokens write into the reserved null block 0
    query_start_loc: torch.Tensor  # [B+1] int32
    seq_lens: torch.Tensor  # [B] int32: context length after this step
    block_tables: torch.Tensor  # [B, max_blocks] int32
    max_query_len: int
    max_seq_len: int
    block_size: int
    num_decodes: int = 0  # the number of sequences when every one decodes a single token, else 0
    backend_data: dict = field(default_factory=dict)  # per-backend precomputed tensors

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    num_kv_heads, head_dim = kv_cache.shape[-2:]
    k_flat = kv_cache[0].view(-1, num_kv_heads, head_dim)
    v_flat = kv_cache[1].view(-1, num_kv_heads, head_dim)
    k_flat.index_copy_(0, slot_mapping, k.to(kv_cache.dtype))
    v_flat.index_copy_(0, slot_mapping, v.to(kv_cache.dtype))


def torch_paged_attention(q: torch.Tensor, kv_cache: torch.Tensor, md: AttentionMetadata, scale: float,
                          sliding_window: Optional[int] = None) -> torch.Tensor:
    """q: [T, H, D] for the tokens of this step; keys/values read from the cache (already written).
    Returns [T, H, D]."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = kv_cache.shape[-2]
    bs = md.block_size
    device = q.device
    max_len = md.max_seq_len
    max_q = md.max_query_len

    # Slots of each sequence's context, in order: [B, max_len]
    nblk = -(-max_len // bs)
    offs = torch.arange(nblk * bs, device=device)
    slots = (md.block_tables[:, :nblk].long().repeat_interleave(bs, dim=1) * bs + offs % bs)[:, :max_len]
    k_flat = kv_cache[0].view(-1, num_kv_heads, head_dim)
    v_flat = kv_cache[1].view(-1, num_kv_heads, head_dim)
    keys = k_flat[slots].to(q.dtype)  # [B, L, KVH, D]
    values = v_flat[slots].to(q.dtype)

    starts = md.query_start_loc[:-1].long()
    q_lens = (md.query_start_loc[1:] - md.query_start_loc[:-1]).long()
    seq_lens = md.seq_lens.long()
    i = torch.arange(max_q, device=device)
    q_valid = i[None, :] < q_lens[:, None]  # [B, max_q]
    q_index = torch.where(q_valid, starts[:, None] + i[None, :], 0)
    queries = q[q_index]  # [B, max_q, H, D]

    q_pos = (seq_lens - q_lens)[:, None] + i[None, :]  # absolute position of each query row
    j = torch.arange(max_len, device=device)
    mask = (j[None, None, :] <= q_pos[:, :, None]) & (j[None, None, :] < seq_lens[:, None, None])
    if sliding_window is not None:
        mask &= j[None, None, :] > (q_pos[:, :, None] - sliding_window)
    mask[:, :, 0] |= ~q_valid  # padding rows attend to one key instead of producing NaN

    out = F.scaled_dot_product_attention(
        queries.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
        attn_mask=mask[:, None], scale=scale, enable_gqa=num_heads != num_kv_heads)
    out = out.transpose(1, 2)  # [B, max_q, H, D]
    return out[q_valid]  # tokens are laid out sequence by sequence, so this restores their order


class Attention(nn.Module):
    """Attention over the paged KV cache for one layer's local heads."""

    def __init__(self, num_heads: int, head_dim: int, scale: float, num_kv_heads: int,
                 sliding_window: Optional[int] = None):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scale = scale
        self.num_kv_heads = num_kv_heads
        self.sliding_window = sliding_window
        self.kv_cache: Optional[torch.Tensor] = None
        self.impl = None  # set by the model runner to a backend's forward function

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, md: AttentionMetadata,
                rotary=None, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """q: [T, H*D], k/v: [T, KVH*D]. rotary (a RotaryEmbedding) and positions: apply rotary
        embedding to q and k first; a backend may fuse it with the KV write."""
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.impl is not None:
            o = self.impl(q, k, v, self.kv_cache, md, self.scale, self.sliding_window,
                          rotary=(rotary, positions) if rotary is not None else None)
        else:
            if rotary is not None:
                q, k = rotary(positions, q, k)
            write_kv(self.kv_cache, k, v, md.slot_mapping)
            o = torch_paged_attention(q, self.kv_cache, md, self.scale, self.sliding_window)
        return o.reshape(-1, self.num_heads * self.head_dim)


def triton_attention(q, k, v, kv_cache, md: AttentionMetadata, scale: float, sliding_window: Optional[int],
                     rotary=None):
    """The Triton backend (GPU): the KV write (with the rotary embedding of q and k fused in when
    `rotary` = (RotaryEmbedding, positions) is given), then paged attention over the cache."""
    from meshserve.kernels.paged_attention import paged_attention, store_kv

    if rotary is not None:
        from meshserve.kernels.fused import rotary_store_kv
        emb, positions = rotary
        rotary_store_kv(q, k, v, positions, emb.cos_cache, emb.sin_cache, kv_cache, md.slot_mapping)
    else:
        store_kv(k, v, kv_cache, md.slot_mapping)
    bd = md.backend_data
    return paged_attention(q, kv_cache, md.block_tables, md.seq_lens, md.query_start_loc, bd["tile_seq"],
                           bd["tile_start"], bd["block_q"], scale, sliding_window, bd["num_splits"],
                           workspace=bd["workspace"])
