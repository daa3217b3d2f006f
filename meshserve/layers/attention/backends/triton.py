"""The Triton attention backend: tile plans, KV splits, the plan buffers of CUDA graphs, and the
launch of kernels/paged_attention.py (with the rotary embedding fused into the KV write).

Its metadata adds a tile plan to the common fields: the sequence and first query of each tile,
query tokens per tile (by the step's size and the KernelSettings), and the KV splits of a decode
step (about two programs per SM). For CUDA graphs it owns the plan buffers: a static plan per
decode batch size, and one tile buffer that mixed-step graphs read after `fill_graph` has copied
the step's plan into it. `return_lse=True` returns each query row's log-sum-exp too, in eager steps
(not in CUDA graphs). Runs on a GPU, or on CPU under Triton's interpreter (TRITON_INTERPRET=1).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from meshserve.kernels import paged_attention as pa
from meshserve.kernels.fused import rotary_store_kv
from meshserve.kernels.settings import H200, KernelSettings
from meshserve.layers.attention.backend import AttentionBackend, AttentionMetadata, AttentionShape, common_fields

INTERPRETER_SMS = 132  # KV splits under Triton's CPU interpreter are planned as on an H200


def decode_num_splits(batch_size: int, num_kv_heads: int, num_sms: int) -> int:
    """KV splits so a decode step has about two programs per SM (fixed per bucket, graph-safe)."""
    return max(1, min(16, (2 * num_sms) // max(1, batch_size * num_kv_heads)))


@dataclass(kw_only=True)
class TritonAttentionMetadata(AttentionMetadata):
    tile_seq: torch.Tensor  # [num_tiles] int32: the sequence of each query tile
    tile_start: torch.Tensor  # [num_tiles] int32: the tile's first query index within its sequence
    block_q: int  # query tokens per tile; 1: decode tiles (the rows are the GQA group)
    num_splits: int = 1  # KV splits per tile (decode steps)
    workspace: dict = field(default_factory=dict)  # split partials and counters, kept across launches
    cuda_graph: bool = False  # built by graph_metadata, for a graph's capture

    @property
    def num_tiles(self) -> int:
        return self.tile_seq.shape[0]


class TritonAttentionBackend(AttentionBackend):
    name = "triton"
    supports_cuda_graphs = True
    supports_lse = True  # eager steps; CUDA graphs refuse return_lse
    supports_query_positions = True

    def __init__(self, shape: AttentionShape, block_size: int, device: torch.device,
                 settings: KernelSettings = H200):
        super().__init__(shape, block_size, device, settings)
        self.num_sms = (torch.cuda.get_device_properties(self.device).multi_processor_count
                        if self.device.type == "cuda" else INTERPRETER_SMS)
        self.workspace: dict = {}  # the eager steps' split partials
        self._decode_tiles: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # [max_bs] each, static
        self._mixed_tiles: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # [most tiles] each

    # ---- the metadata builder ----------------------------------------------------------------
    def block_q(self, max_query_len: int, num_tokens: Optional[int]) -> int:
        return pa.block_q_for(max_query_len, self.shape.group, num_tokens, self.settings)

    def num_splits(self, num_seqs: int) -> int:
        """KV splits of a decode step of `num_seqs` sequences."""
        return decode_num_splits(num_seqs, self.shape.num_kv_heads, self.num_sms)

    def build(self, common: AttentionMetadata, query_lens) -> TritonAttentionMetadata:
        lens = [int(x) for x in query_lens]
        block_q = self.block_q(common.max_query_len, sum(lens))
        tile_seq, tile_start = pa.plan_tiles(lens, block_q, self.device)
        splits = self.num_splits(len(lens)) if common.max_query_len == 1 else 1
        return TritonAttentionMetadata(**common_fields(common), backend=self, tile_seq=tile_seq,
                                       tile_start=tile_start, block_q=block_q, num_splits=splits,
                                       workspace=self.workspace)

    # ---- the forward -------------------------------------------------------------------------
    def fuses_qk_norm(self, layer, rotary) -> bool:
        return rotary is not None and 2 * rotary.cos_cache.shape[1] == layer.head_dim

    def forward(self, layer, q, k, v, md: TritonAttentionMetadata, rotary=None, positions=None, return_lse=False):
        if return_lse and md.cuda_graph:
            raise NotImplementedError(
                "return_lse=True in a CUDA graph (metadata from graph_metadata): the Triton attention "
                "backend returns the log-sum-exp only in eager steps; run the steps that merge partial "
                "attentions eagerly (cuda_graph_config=None, or enable=False) or leave return_lse False")
        kv_cache = layer.kv_cache
        k_scale, v_scale = getattr(layer, "k_scale", 1.0), getattr(layer, "v_scale", 1.0)
        rope = None
        if rotary is not None:
            norm = None
            if layer.qk_norm is not None and self.fuses_qk_norm(layer, rotary):
                qn, kn = layer.qk_norm
                norm = (qn.weight, kn.weight, qn.eps)
            if self.settings.fuse_rope_attention and md.block_q == 1 and md.query_positions is None:
                # decode tiles: the attention kernel rotates q and writes this token's k / v itself
                rope = pa.RopeInputs(k, v, positions, rotary.cos_cache, rotary.sin_cache, md.slot_mapping, norm,
                                     1.0 / k_scale, 1.0 / v_scale)
            else:
                rotary_store_kv(q, k, v, positions, rotary.cos_cache, rotary.sin_cache, kv_cache, md.slot_mapping,
                                norm, k_scale, v_scale)
        else:
            pa.store_kv(k, v, kv_cache, md.slot_mapping, k_scale, v_scale)
        # the cache holds k / k_scale and v / v_scale (an FP8 cache's calibrated scales; 1 otherwise):
        # k_scale folds into the softmax scale (the log-sum-exp stays exact), v_scale multiplies the output
        prefetch = None
        if self.settings.decode_l2_prefetch and md.block_q == 1 and q.shape[0] <= pa.SMALL_DECODE:
            after = layer.prefetch_after  # the linear that reads this layer's output (models set it)
            prefetch = after[0].weight if after else None
        out = pa.paged_attention(q, kv_cache, md.block_tables, md.seq_lens, md.query_start_loc, md.tile_seq,
                                 md.tile_start, md.block_q, layer.scale * k_scale, layer.sliding_window,
                                 md.num_splits, workspace=md.workspace, settings=self.settings, return_lse=return_lse,
                                 query_positions=md.query_positions, rope=rope, prefetch=prefetch)
        if v_scale == 1.0:
            return out
        if return_lse:
            return out[0] * v_scale, out[1]
        return out * v_scale

    # ---- CUDA graphs -------------------------------------------------------------------------
    def graph_token_boundaries(self) -> list[int]:
        return [self.settings.attn_prefill_large_tokens]  # smaller steps take smaller prefill tiles

    def graph_block_q(self, num_tokens: int) -> int:
        """Query tokens per tile in a mixed-step graph of `num_tokens` tokens (as `build` plans such a step)."""
        return self.block_q(2, num_tokens)

    def graph_tiles(self, num_tokens: int, num_seqs: int) -> int:
        """Tiles of a mixed-step graph: S + ceil(T / block_q) bounds the plan of any step of at most T
        tokens and S sequences (sum_i ceil(n_i / block_q) <= S + T / block_q)."""
        return num_seqs + -(-num_tokens // self.graph_block_q(num_tokens))

    def reserve_graph_buffers(self, max_tokens: int, max_seqs: int, decode: bool) -> None:
        dev = self.device
        if decode:  # tile i is sequence i, for every batch size
            self._decode_tiles = (torch.arange(max_seqs, dtype=torch.int32, device=dev),
                                  torch.zeros(max_seqs, dtype=torch.int32, device=dev))
            return
        # the most tiles any graph has: the largest graph of each tile size
        large = self.settings.attn_prefill_large_tokens
        n = max(self.graph_tiles(t, min(t, max_seqs)) for t in {max_tokens, min(max_tokens, large)})
        self._mixed_tiles = (torch.zeros(n, dtype=torch.int32, device=dev),
                             torch.zeros(n, dtype=torch.int32, device=dev))

    def graph_metadata(self, common: AttentionMetadata, num_tokens: int, num_seqs: int,
                       decode: bool) -> TritonAttentionMetadata:
        # every graph gets its own workspace: one captured graph must not see another's reallocated
        if decode:
            tile_seq, tile_start = self._decode_tiles
            return TritonAttentionMetadata(**common_fields(common), backend=self, tile_seq=tile_seq[:num_seqs],
                                           tile_start=tile_start[:num_seqs], block_q=1,
                                           num_splits=self.num_splits(num_seqs), workspace={}, cuda_graph=True)
        n = self.graph_tiles(num_tokens, num_seqs)
        tile_seq, tile_start = self._mixed_tiles
        return TritonAttentionMetadata(**common_fields(common), backend=self, tile_seq=tile_seq[:n],
                                       tile_start=tile_start[:n], block_q=self.graph_block_q(num_tokens),
                                       num_splits=1, workspace={}, cuda_graph=True)

    def graph_accepts(self, md: TritonAttentionMetadata, num_tokens: int, num_seqs: int) -> bool:
        # a step planned with other tiles than the graph's (e.g. past the tile threshold) runs eagerly
        return md.block_q == self.graph_block_q(num_tokens) and md.num_tiles <= self.graph_tiles(num_tokens, num_seqs)

    def fill_graph(self, md: TritonAttentionMetadata, graph_md: TritonAttentionMetadata, num_seqs: int) -> None:
        """Mixed graphs: the step's tiles, then tiles pointing at slot `num_seqs` (always a padding
        slot without queries or context), which exit at once. Decode graphs: nothing (static plan)."""
        if graph_md.num_decodes:
            return
        k, n = md.num_tiles, graph_md.num_tiles
        graph_md.tile_seq[:k].copy_(md.tile_seq, non_blocking=True)
        graph_md.tile_start[:k].copy_(md.tile_start, non_blocking=True)
        if n > k:
            graph_md.tile_seq[k:n].fill_(num_seqs)
            graph_md.tile_start[k:n].zero_()
