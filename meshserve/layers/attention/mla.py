"""Multi-head latent attention (DeepSeek-V2/V3 MLA): the layer, its step metadata, its backends.

The KV cache of a layer holds one vector per token, shared by every head (engine/kv_spec.py
MLAAttentionSpec): [num_blocks, block_size, kv_lora_rank + qk_rope_head_dim], the normalised
compressed KV c_kv (L = kv_lora_rank values) then the rotated rope key k_pe (R values). Each TP
rank holds the whole latent cache (its heads all read it); heads split over TP.

With W_UK[h] [nope, L] and W_UV[h] [v, L] the two row blocks of head h in kv_b_proj:
  score(t, j) = scale * (q_nope[t, h] . W_UK[h] c_kv[j] + q_pe[t, h] . k_pe[j])
  out[t, h]   = sum_j softmax_j(score) W_UV[h] c_kv[j]
- decode (sequences with one query token this step): the absorbed form. q_lat = W_UK[h]^T q_nope,
  then multi-query attention of [q_lat, q_pe] over the cached vectors (keys: all L + R values,
  values: the first L), then W_UV[h] on the result. It reads L + R values per cached token;
  `paged_latent_decode` here is the torch reference, kernels/mla_decode.py the Triton kernel.
- prefill (sequences with several query tokens: prompts, chunked prefill, the rest of a prompt
  after a prefix-cache hit): the expanded form. The sequence's context latents, gathered through
  its block table, go through kv_b_proj into per-head keys and values, and ordinary causal
  attention runs over them.
Both read the paged cache, so chunked prefill, preemption and prefix reuse work as for other
layers. `MLAMetadata` splits a step's sequences into the two parts once per step (`build`).

The layer's forward takes q [T, H, nope + rope], the latent [T, L + R] (c_kv normalised, k_pe not
yet rotated) and this rank's kv_b_proj weight [H * (nope + v), L]; rotary (on the rope dims, in
place) and the cache write happen in the backend. CUDA graphs: the Triton backend's decode steps
(backends/mla_triton.py); steps with prompt tokens run eagerly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from meshserve.layers.attention.backend import AttentionBackend, AttentionMetadata, AttentionShape, common_fields
from meshserve.utils import to_device


# ---- the layer ---------------------------------------------------------------------------------
class MLAAttention(nn.Module):
    """Latent attention over the paged cache for one layer's local heads. The model runner binds
    `kv_cache` ([num_blocks, block_size, L + R]) and `kv_group` as for `Attention`."""
    latent = True  # the runner picks a latent-attention backend for these layers

    def __init__(self, num_heads: int, kv_lora_rank: int, qk_nope_head_dim: int, qk_rope_head_dim: int,
                 v_head_dim: int, scale: float):
        super().__init__()
        self.num_heads = num_heads
        self.kv_lora_rank = kv_lora_rank
        self.qk_nope_head_dim = qk_nope_head_dim
        self.qk_rope_head_dim = qk_rope_head_dim
        self.v_head_dim = v_head_dim
        self.scale = scale
        # what the runner's generic code reads: one shared KV "head" of the latent's width
        self.num_kv_heads = 1
        self.head_dim = kv_lora_rank + qk_rope_head_dim
        self.sliding_window = None
        self.kv_cache: Optional[torch.Tensor] = None
        self.kv_group = 0

    def forward(self, q: torch.Tensor, latent: torch.Tensor, w_kv_b: torch.Tensor, md: AttentionMetadata,
                rotary=None, positions: Optional[torch.Tensor] = None, return_lse: bool = False):
        """q: [T, H * (nope + rope)] or [T, H, nope + rope]; latent: [T, L + R]; w_kv_b: this
        rank's kv_b_proj weight [H * (nope + v), L]. Returns [T, H * v]; with return_lse also each
        row's log-sum-exp [T, H] (float32)."""
        q = q.view(-1, self.num_heads, self.qk_nope_head_dim + self.qk_rope_head_dim)
        if self.kv_group and md.group_views is not None:
            md = md.group_views[self.kv_group - 1]
        backend = md.backend if isinstance(md.backend, MLABackend) else _reference_backend(self, q.device)
        if not isinstance(md, MLAMetadata):  # metadata built by hand (tests) or by another backend
            q_lens = (md.query_start_loc[1:] - md.query_start_loc[:-1]).tolist()
            md = backend.build(AttentionMetadata(**common_fields(md)), q_lens)
        out = backend.forward_mla(self, q, latent, w_kv_b, md, rotary, positions, return_lse)
        if return_lse:
            return out[0].reshape(-1, self.num_heads * self.v_head_dim), out[1]
        return out.reshape(-1, self.num_heads * self.v_head_dim)


_REFERENCE: dict = {}


def _reference_backend(layer: MLAAttention, device: torch.device) -> "TorchMLABackend":
    key = (layer.num_heads, layer.head_dim, str(device))
    if key not in _REFERENCE:
        _REFERENCE[key] = TorchMLABackend(AttentionShape(layer.num_heads, 1, layer.head_dim), 1, device)
    return _REFERENCE[key]


# ---- the step's metadata -----------------------------------------------------------------------
@dataclass
class MLAPart:
    """The sequences of one form (decode or prefill) in a step: their tokens' rows in the step
    (None: every token, in order), and their own query_start_loc / seq_lens / block_tables."""
    tokens: Optional[torch.Tensor]  # [N] int64
    query_start_loc: torch.Tensor  # [B+1] int32
    seq_lens: torch.Tensor  # [B] int32
    block_tables: torch.Tensor  # [B, max_blocks] int32
    max_query_len: int
    max_seq_len: int  # an upper bound: the step's longest context
    num_tokens: int
    num_splits: int = 1  # KV splits of the Triton decode kernel

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]


@dataclass(kw_only=True)
class MLAMetadata(AttentionMetadata):
    decode: Optional[MLAPart] = None  # sequences with one query token: absorbed form
    prefill: Optional[MLAPart] = None  # sequences with several: expanded form


# ---- torch references --------------------------------------------------------------------------
def _context_slots(block_tables: torch.Tensor, max_len: int, block_size: int) -> torch.Tensor:
    """[B, max_len] cache slots of each sequence's first max_len positions."""
    nblk = -(-max_len // block_size)
    offs = torch.arange(nblk * block_size, device=block_tables.device)
    slots = block_tables[:, :nblk].long().repeat_interleave(block_size, dim=1) * block_size + offs % block_size
    return slots[:, :max_len]


def paged_latent_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                        kv_lora_rank: int, scale: float, max_seq_len: Optional[int] = None, return_lse: bool = False):
    """The torch reference of kernels/mla_decode.mla_decode: q [B, H, L + R] (absorbed queries, one
    per sequence), kv_cache [num_blocks, block_size, L + R]. Returns out [B, H, L] (and lse [B, H],
    float32 or wider), the softmax in float32 or wider."""
    B, H, width = q.shape
    block_size = kv_cache.shape[1]
    max_len = max_seq_len if max_seq_len is not None else int(seq_lens.max()) if B else 0
    work = torch.promote_types(q.dtype, torch.float32)
    keys = kv_cache.view(-1, width)[_context_slots(block_tables, max(max_len, 1), block_size)].to(work)  # [B, S, L+R]
    scores = torch.einsum("bhc,bsc->bhs", q.to(work), keys) * scale
    visible = torch.arange(keys.shape[1], device=q.device)[None, :] < seq_lens.long()[:, None]  # [B, S]
    scores = scores.masked_fill(~visible[:, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [B, H]
    probs = torch.exp(scores - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    out = torch.einsum("bhs,bsl->bhl", probs, keys[..., :kv_lora_rank]).to(q.dtype)
    return (out, lse) if return_lse else out


def _expanded_attention(layer: MLAAttention, q: torch.Tensor, w_kv_b: torch.Tensor, part: MLAPart,
                        return_lse: bool):
    """Prefill rows: q [N, H, nope + rope] of the part's sequences (in order). The context latents
    are gathered from the cache and expanded by kv_b_proj into keys [.., nope + rope] and values [.., v]."""
    H, n, v_dim, L = layer.num_heads, layer.qk_nope_head_dim, layer.v_head_dim, layer.kv_lora_rank
    cache = layer.kv_cache
    bs = cache.shape[1]
    max_len, max_q = part.max_seq_len, part.max_query_len
    dev = q.device
    latents = cache.view(-1, cache.shape[-1])[_context_slots(part.block_tables, max_len, bs)].to(q.dtype)  # [B, S, L+R]
    B, S = latents.shape[:2]
    kv = F.linear(latents[..., :L], w_kv_b).view(B, S, H, n + v_dim)
    k_pe = latents[..., L:]
    keys = torch.cat([kv[..., :n], k_pe[:, :, None, :].expand(B, S, H, k_pe.shape[-1])], dim=-1)  # [B, S, H, n+r]
    values = kv[..., n:]

    starts = part.query_start_loc[:-1].long()
    q_lens = (part.query_start_loc[1:] - part.query_start_loc[:-1]).long()
    seq_lens = part.seq_lens.long()
    i = torch.arange(max_q, device=dev)
    q_valid = i[None, :] < q_lens[:, None]  # [B, Q]
    queries = q[torch.where(q_valid, starts[:, None] + i[None, :], 0)]  # [B, Q, H, n+r]
    q_pos = (seq_lens - q_lens)[:, None] + i[None, :]
    j = torch.arange(S, device=dev)
    mask = (j[None, None, :] <= q_pos[:, :, None]) & (j[None, None, :] < seq_lens[:, None, None])
    mask[:, :, 0] |= ~q_valid  # padding rows attend to one key instead of producing NaN
    if not return_lse:
        out = F.scaled_dot_product_attention(queries.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                                             attn_mask=mask[:, None], scale=layer.scale)
        return out.transpose(1, 2)[q_valid]
    work = torch.promote_types(q.dtype, torch.float32)
    scores = torch.einsum("bqhd,bshd->bhqs", queries.to(work), keys.to(work)) * layer.scale
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [B, H, Q]
    probs = torch.exp(scores - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    out = torch.einsum("bhqs,bshd->bqhd", probs, values.to(work)).to(q.dtype)
    return out[q_valid], lse.transpose(1, 2)[q_valid]


# ---- backends ----------------------------------------------------------------------------------
class MLABackend(AttentionBackend):
    """Builds MLAMetadata and runs latent attention: the absorbed decode form through
    `latent_decode` (the torch reference here, the Triton kernel in the Triton backend) and the
    expanded prefill form in torch."""
    name = "mla-torch"
    supports_lse = True

    def num_splits(self, num_seqs: int, max_seq_len: int) -> int:
        return 1

    def build(self, common: AttentionMetadata, query_lens: Sequence[int]) -> MLAMetadata:
        lens = np.asarray(query_lens, dtype=np.int64)
        md = MLAMetadata(**common_fields(common), backend=self)
        is_decode = lens == 1
        n_dec = int(is_decode.sum())
        if n_dec == len(lens):  # the usual decode step: every token, in order
            md.decode = MLAPart(None, common.query_start_loc, common.seq_lens, common.block_tables, 1,
                                common.max_seq_len, len(lens), self.num_splits(len(lens), common.max_seq_len))
            return md
        if n_dec == 0:
            md.prefill = MLAPart(None, common.query_start_loc, common.seq_lens, common.block_tables,
                                 common.max_query_len, common.max_seq_len, int(lens.sum()))
            return md
        starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
        dev = self.device

        def part(select: np.ndarray, num_splits: int = 1) -> MLAPart:
            seqs = np.nonzero(select)[0]
            plens = lens[seqs]
            tokens = np.concatenate([np.arange(starts[s], starts[s] + lens[s]) for s in seqs])
            seq_idx = to_device(torch.from_numpy(seqs), dev)
            return MLAPart(to_device(torch.from_numpy(tokens), dev),
                           to_device(torch.from_numpy(np.concatenate([[0], np.cumsum(plens)]).astype(np.int32)), dev),
                           common.seq_lens[seq_idx], common.block_tables[seq_idx], int(plens.max()),
                           common.max_seq_len, len(tokens), num_splits)

        md.decode = part(is_decode, self.num_splits(n_dec, common.max_seq_len))
        md.prefill = part(~is_decode)
        return md

    def forward(self, layer, q, k, v, md, rotary=None, positions=None, return_lse=False):
        raise TypeError(f"the {self.name} attention backend runs latent-attention layers (MLAAttention.forward "
                        f"calls forward_mla); it got a {type(layer).__name__}")

    # ---- the pieces ----------------------------------------------------------------------------
    def rotate_and_store(self, layer: MLAAttention, q: torch.Tensor, latent: torch.Tensor,
                         slot_mapping: torch.Tensor, rotary, positions) -> None:
        """Rotate the rope dims of q and of the latent's k_pe in place, then write the latent rows
        into the cache at their slots."""
        L = layer.kv_lora_rank
        if rotary is not None:
            q_pe, k_pe = q[..., layer.qk_nope_head_dim:], latent[:, None, L:]
            q_rot, k_rot = rotary(positions, q_pe, k_pe)
            if q_rot.data_ptr() != q_pe.data_ptr():  # the torch path returns new tensors
                q_pe.copy_(q_rot)
                k_pe.copy_(k_rot)
        cache = layer.kv_cache
        cache.view(-1, cache.shape[-1]).index_copy_(0, slot_mapping, latent.to(cache.dtype))

    def latent_decode(self, q_abs: torch.Tensor, kv_cache: torch.Tensor, part: MLAPart, layer: MLAAttention,
                      return_lse: bool):
        return paged_latent_decode(q_abs, kv_cache, part.block_tables, part.seq_lens, layer.kv_lora_rank,
                                   layer.scale, part.max_seq_len, return_lse)

    def absorbed(self, layer: MLAAttention, q: torch.Tensor, w_kv_b: torch.Tensor, part: MLAPart, return_lse: bool):
        """Decode rows q [N, H, nope + rope] (one per sequence of the part) -> [N, H, v]."""
        H, n, L = layer.num_heads, layer.qk_nope_head_dim, layer.kv_lora_rank
        w = w_kv_b.view(H, n + layer.v_head_dim, L)
        w_uk, w_uv = w[:, :n], w[:, n:]  # [H, nope, L], [H, v, L]
        q_lat = torch.bmm(q[..., :n].transpose(0, 1), w_uk).transpose(0, 1)  # [N, H, L]
        q_abs = torch.cat([q_lat, q[..., n:]], dim=-1)
        res = self.latent_decode(q_abs, layer.kv_cache, part, layer, return_lse)
        o_lat, lse = res if return_lse else (res, None)
        out = torch.bmm(o_lat.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)  # [N, H, v]
        return (out, lse) if return_lse else out

    def forward_mla(self, layer: MLAAttention, q: torch.Tensor, latent: torch.Tensor, w_kv_b: torch.Tensor,
                    md: MLAMetadata, rotary=None, positions=None, return_lse: bool = False):
        """q [T, H, nope + rope], latent [T, L + R] -> out [T, H, v] (and lse [T, H])."""
        self.rotate_and_store(layer, q, latent, md.slot_mapping, rotary, positions)
        results = []
        for part, run in ((md.decode, self.absorbed), (md.prefill, _expanded_attention)):
            if part is None or part.num_tokens == 0:
                continue
            rows = q if part.tokens is None else q.index_select(0, part.tokens)
            results.append((part, run(layer, rows, w_kv_b, part, return_lse)))
        if len(results) == 1 and results[0][0].tokens is None:
            return results[0][1]
        T = q.shape[0]
        out = q.new_zeros(T, layer.num_heads, layer.v_head_dim)
        lse = torch.full((T, layer.num_heads), float("-inf"), device=q.device,
                         dtype=torch.promote_types(q.dtype, torch.float32)) if return_lse else None
        for part, res in results:
            o, part_lse = res if return_lse else (res, None)
            out.index_copy_(0, part.tokens, o)
            if return_lse:
                lse.index_copy_(0, part.tokens, part_lse.to(lse.dtype))
        return (out, lse) if return_lse else out


class TorchMLABackend(MLABackend):
    """The reference (CPU, and attention_backend='torch' anywhere)."""
    name = "mla-torch"

