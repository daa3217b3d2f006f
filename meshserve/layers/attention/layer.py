"""The Attention layer: one layer's local heads and its KV cache tensor, run by the step's backend.

The model runner binds `kv_cache` once after allocating it, and `kv_group`, the KV cache group
whose block table the layer reads (engine/kv_spec.py; 0 for most models):
  kv_cache: [2, num_blocks, block_size, num_kv_heads, head_dim]
Each forward call receives the step's metadata, built by the runner's attention backend, and hands
the work to that backend (`md.backend`); metadata built by hand (tests) runs the torch reference.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from meshserve.layers.attention.backend import AttentionMetadata
from meshserve.layers.attention.backends.torch import reference_forward


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
        self.kv_group = 0
        # an FP8 KV cache's calibrated scales (the checkpoint's k_scale / v_scale): the cache holds
        # k / k_scale and v / v_scale; 1 otherwise (models/loader.py, the model runner)
        self.k_scale = 1.0
        self.v_scale = 1.0
        # (q_norm, k_norm): per-head RMSNorms applied to q and k before rotary (Qwen3), by the
        # backend when it fuses them (backend.fuses_qk_norm), else here
        self.qk_norm: Optional[tuple] = None
        # (linear,): the layer that reads this one's output next (the model's o_proj), whose weight a
        # backend may prefetch into L2 while attention runs (kernel_config.decode_l2_prefetch); a
        # tuple so nn.Module does not register it as a submodule of this layer
        self.prefetch_after: Optional[tuple] = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, md: AttentionMetadata,
                rotary=None, positions: Optional[torch.Tensor] = None, return_lse: bool = False):
        """q: [T, H*D], k/v: [T, KVH*D]. rotary (a RotaryEmbedding) and positions: apply rotary
        embedding to q and k first (after `qk_norm` where set); a backend may fuse both with the KV write. Returns [T, H*D];
        with return_lse, also each row's log-sum-exp [T, H] (backends with supports_lse)."""
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.kv_group and md.group_views is not None:
            md = md.group_views[self.kv_group - 1]
        if self.qk_norm is not None and not (md.backend is not None and md.backend.fuses_qk_norm(self, rotary)):
            q, k = self.qk_norm[0](q), self.qk_norm[1](k)
        run = md.backend.forward if md.backend is not None else reference_forward
        if return_lse:
            o, lse = run(self, q, k, v, md, rotary, positions, return_lse=True)
            return o.reshape(-1, self.num_heads * self.head_dim), lse
        return run(self, q, k, v, md, rotary, positions).reshape(-1, self.num_heads * self.head_dim)
