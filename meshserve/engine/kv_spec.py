"""KV cache specs: how each attention layer stores a token's KV, and the groups of layers that share
one block table.

Each layer has a spec, derived from the model config (`model_kv_groups`): full attention, sliding
window (a query reads only the last `sliding_window` positions, so blocks wholly before them can be
freed), or latent attention (one compressed vector of kv_lora_rank + qk_rope_head_dim values per
token, as DeepSeek's MLA). Layers with equal specs form groups of equal size; the KV manager
(engine/kv_cache.py) keeps one block table per group over one shared pool of block ids, and the
model runner gives the i-th layer of every group the same cache tensor ("slot" i), so a block id
means the same bytes whichever group holds it. A model whose layers share one spec has one group:
today's single table. Pure Python: no torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence


class KVCacheSpec:
    """A layer's KV layout. `cache_shape` is the shape of its tensor of `num_blocks` blocks."""

    def bytes_per_token(self, dtype_size: int) -> int:
        raise NotImplementedError

    def cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        raise NotImplementedError

    def num_skipped_blocks(self, num_computed_tokens: int, block_size: int) -> int:
        """Leading blocks no query at position >= num_computed_tokens reads (0: every block is kept)."""
        return 0


@dataclass(frozen=True)
class FullAttentionSpec(KVCacheSpec):
    num_kv_heads: int
    head_dim: int

    def bytes_per_token(self, dtype_size: int) -> int:
        return 2 * self.num_kv_heads * self.head_dim * dtype_size  # K and V

    def cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        return (2, num_blocks, block_size, self.num_kv_heads, self.head_dim)


@dataclass(frozen=True)
class SlidingWindowSpec(FullAttentionSpec):
    # a query at position p reads keys p - sliding_window + 1 .. p (transformers' and our kernels' mask)
    sliding_window: int = 0

    def num_skipped_blocks(self, num_computed_tokens: int, block_size: int) -> int:
        # the first query still to compute is at num_computed_tokens; it reads from
        # num_computed_tokens - sliding_window + 1 on, so the blocks wholly before that are dead
        return max(0, num_computed_tokens - self.sliding_window + 1) // block_size


@dataclass(frozen=True)
class MLAAttentionSpec(KVCacheSpec):
    """Latent attention: one vector per token per layer (the compressed KV and the rope key), not
    K and V per head; the tensor is [num_blocks, block_size, kv_lora_rank + qk_rope_head_dim]."""
    kv_lora_rank: int
    qk_rope_head_dim: int

    def bytes_per_token(self, dtype_size: int) -> int:
        return (self.kv_lora_rank + self.qk_rope_head_dim) * dtype_size

    def cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        return (num_blocks, block_size, self.kv_lora_rank + self.qk_rope_head_dim)


@dataclass(frozen=True)
class KVCacheGroup:
    spec: KVCacheSpec
    layers: tuple[int, ...]  # model layer indices; the i-th uses cache slot i

    @property
    def sliding_window(self) -> Optional[int]:
        return getattr(self.spec, "sliding_window", None)


def layer_kv_specs(sliding_windows: Sequence[Optional[int]], num_kv_heads: int, head_dim: int,
                   max_seq_len: int, kv_lora_rank: Optional[int] = None,
                   qk_rope_head_dim: Optional[int] = None) -> list[KVCacheSpec]:
    """One spec per layer. A window of at least max_seq_len never drops a key: full attention."""
    if kv_lora_rank:
        return [MLAAttentionSpec(kv_lora_rank, qk_rope_head_dim or 0) for _ in sliding_windows]
    return [SlidingWindowSpec(num_kv_heads, head_dim, w) if w is not None and w < max_seq_len
            else FullAttentionSpec(num_kv_heads, head_dim) for w in sliding_windows]


def kv_cache_groups(specs: Sequence[KVCacheSpec]) -> list[KVCacheGroup]:
    """Layers of one spec, split into groups of equal size (the last of a spec may be shorter).

    The size is the smallest spec's layer count, or the largest when that is within 1.25x of it
    (fewer groups for a little unused slot memory), as vLLM does. Slots are shared across groups,
    so every group's spec must lay a block out the same way.
    Example: 2 full layers, then 4 sliding ones -> size 2: full (0, 1), sliding (2, 3), (4, 5).
    """
    by_spec: dict[KVCacheSpec, list[int]] = {}
    for i, spec in enumerate(specs):
        by_spec.setdefault(spec, []).append(i)
    if len(by_spec) <= 1:
        return [KVCacheGroup(spec, tuple(layers)) for spec, layers in by_spec.items()]
    shapes = {spec.cache_shape(1, 1) for spec in by_spec}
    if len(shapes) > 1:
        raise ValueError(f"layers with KV specs {sorted(map(repr, by_spec))} lay out a block differently "
                         f"(shapes {sorted(shapes)}); mixing them in one model is not supported")
    counts = [len(layers) for layers in by_spec.values()]
    size = max(counts) if max(counts) < 1.25 * min(counts) else min(counts)
    return [KVCacheGroup(spec, tuple(layers[k:k + size]))
            for spec, layers in by_spec.items() for k in range(0, len(layers), size)]


def model_kv_groups(model_config, max_seq_len: int, num_kv_heads: Optional[int] = None) -> list[KVCacheGroup]:
    """The groups of a ModelConfig (its sliding_windows, heads, and kv_lora_rank / qk_rope_head_dim
    where the model has latent attention). num_kv_heads: this rank's share (the engine uses the
    model's; the grouping is the same either way)."""
    cfg = model_config
    specs = layer_kv_specs(cfg.sliding_windows or [None] * cfg.num_hidden_layers,
                           num_kv_heads or cfg.num_key_value_heads, cfg.head_dim, max_seq_len,
                           getattr(cfg, "kv_lora_rank", None), getattr(cfg, "qk_rope_head_dim", None))
    return kv_cache_groups(specs)


def layer_slots(groups: Sequence[KVCacheGroup]) -> dict[int, tuple[int, int]]:
    """Layer index -> (its group, its cache slot)."""
    return {layer: (g, slot) for g, group in enumerate(groups) for slot, layer in enumerate(group.layers)}
