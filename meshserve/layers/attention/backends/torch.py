"""The torch reference attention backend: the KV write and paged attention in plain torch.

It gathers each sequence's blocks from the cache and runs SDPA with a causal (and optional
sliding-window) mask; with return_lse it writes the softmax out to return each row's log-sum-exp
too. It is the CPU path and the oracle the Triton kernels are tested against. Metadata: the
common AttentionMetadata; no CUDA graphs (it indexes with data-dependent shapes).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from meshserve.layers.attention.backend import AttentionBackend, AttentionMetadata


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor,
             k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """k, v: [T, KVH, D] -> kv_cache[0/1] at the slots (block * block_size + offset), divided by
    k_scale / v_scale (an FP8 cache's calibrated scales; 1 otherwise)."""
    if k_scale != 1.0 or v_scale != 1.0:
        k, v = k.float() / k_scale, v.float() / v_scale
    num_kv_heads, head_dim = kv_cache.shape[-2:]
    from meshserve.kernels.fp8 import storage_view  # an FP8 cache (kv_cache_config.dtype fp8) as bytes
    k_flat = storage_view(kv_cache[0].view(-1, num_kv_heads, head_dim))
    v_flat = storage_view(kv_cache[1].view(-1, num_kv_heads, head_dim))
    k_flat.index_copy_(0, slot_mapping, storage_view(k.to(kv_cache.dtype)))
    v_flat.index_copy_(0, slot_mapping, storage_view(v.to(kv_cache.dtype)))


def torch_paged_attention(q: torch.Tensor, kv_cache: torch.Tensor, md: AttentionMetadata, scale: float,
                          sliding_window: Optional[int] = None, return_lse: bool = False):
    """q: [T, H, D] for the tokens of this step; keys/values read from the cache (already written).
    Returns out [T, H, D]; with return_lse, (out, lse [T, H]) in float32 or wider."""
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
    if md.query_positions is not None:  # each row's last visible key given (context parallelism RING)
        q_pos = torch.where(q_valid, md.query_positions.long()[q_index], -1)
    j = torch.arange(max_len, device=device)
    mask = (j[None, None, :] <= q_pos[:, :, None]) & (j[None, None, :] < seq_lens[:, None, None])
    if sliding_window is not None:
        mask &= j[None, None, :] > (q_pos[:, :, None] - sliding_window)
    mask[:, :, 0] |= ~q_valid  # padding rows attend to one key instead of producing NaN

    if return_lse:
        out, lse = _attention_with_lse(queries, keys, values, mask, scale)
        # tokens are laid out sequence by sequence, so [q_valid] restores their order
        return out[q_valid], lse[q_valid]
    out = F.scaled_dot_product_attention(
        queries.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
        attn_mask=mask[:, None], scale=scale, enable_gqa=num_heads != num_kv_heads)
    out = out.transpose(1, 2)  # [B, max_q, H, D]
    return out[q_valid]


def _attention_with_lse(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                        scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The softmax written out, in float32 or wider. queries [B, Q, H, D], keys/values [B, L, KVH, D],
    mask [B, Q, L] (True: visible). Returns out [B, Q, H, D] in the queries' dtype and lse [B, Q, H]."""
    work = torch.promote_types(queries.dtype, torch.float32)
    group = queries.shape[2] // keys.shape[2]
    qh = queries.to(work).transpose(1, 2)  # [B, H, Q, D]
    kh = keys.to(work).transpose(1, 2).repeat_interleave(group, dim=1)  # [B, H, L, D]; head h reads kv head h // group
    vh = values.to(work).transpose(1, 2).repeat_interleave(group, dim=1)
    scores = (qh @ kh.transpose(-1, -2)) * scale  # [B, H, Q, L]
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [B, H, Q]; -inf where a row sees no key
    probs = torch.exp(scores - torch.where(torch.isinf(lse), 0.0, lse)[..., None])  # 0 for such a row
    out = probs @ vh  # [B, H, Q, D]
    return out.transpose(1, 2).to(queries.dtype), lse.transpose(1, 2)


def reference_forward(layer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, md: AttentionMetadata,
                      rotary=None, positions: Optional[torch.Tensor] = None, return_lse: bool = False):
    """AttentionBackend.forward of the reference, for a layer (kv_cache, scale, sliding_window)."""
    if rotary is not None:
        q, k = rotary(positions, q, k)
    k_scale, v_scale = getattr(layer, "k_scale", 1.0), getattr(layer, "v_scale", 1.0)
    write_kv(layer.kv_cache, k, v, md.slot_mapping, k_scale, v_scale)
    out = torch_paged_attention(q, layer.kv_cache, md, layer.scale * k_scale, layer.sliding_window, return_lse)
    if v_scale == 1.0:
        return out
    return (out[0] * v_scale, out[1]) if return_lse else out * v_scale


class TorchAttentionBackend(AttentionBackend):
    """The reference backend (CPU, and `attention_backend='torch'` anywhere)."""
    name = "torch"
    supports_lse = True
    supports_query_positions = True

    def forward(self, layer, q, k, v, md, rotary=None, positions=None, return_lse=False):
        return reference_forward(layer, q, k, v, md, rotary, positions, return_lse)
