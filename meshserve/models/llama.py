"""Llama-family decoder (Llama, Mistral, Qwen2, Qwen3): one model file, options from ModelConfig.

Parameter names follow the HF checkpoints (q/k/v fused into qkv_proj, gate/up into gate_up_proj),
so `load_weights` maps checkpoint names with a short table. Parallelism enters only through the
ParallelState handed in (its attn_tp group for the linears: the tp group, or one rank with attention
DP; MoE models hand their moe groups to the expert layers; context parallelism its cp_split) and a
layer range [start, end) for this pipeline stage. Models whose MLP differs per layer (mixture of
experts: models/mixtral.py, models/qwen3_moe.py) override `make_mlp`.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

from meshserve.distributed.comm import SOLO_STATE
from meshserve.layers.activation import silu_and_mul
from meshserve.layers.attention import Attention, AttentionMetadata
from meshserve.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from meshserve.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from meshserve.layers.moe.block import MoEBlock
from meshserve.layers.norm import RMSNorm
from meshserve.layers.rotary import RotaryEmbedding
from meshserve.models.config import ModelConfig


class DecoderAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, tp_group, dtype, rotary_emb: RotaryEmbedding, cp=None,
                 helix_group=None):
        super().__init__()
        tp = tp_group.size
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads,
                                          cfg.num_key_value_heads, cfg.qkv_bias, tp_group, dtype)
        self.num_heads = cfg.num_attention_heads // tp
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.q_size = self.num_heads * cfg.head_dim
        self.kv_size = self.num_kv_heads * cfg.head_dim
        self.head_dim = cfg.head_dim
        # context parallelism (layers/context_parallel.py). ULYSSES: attention runs every token of
        # 1/cp of this rank's heads; KV heads fewer than cp are repeated so each rank gets one. RING:
        # every head, every token, over this rank's shard of the KV cache
        self.cp = cp
        cp_size = cp.size if cp is not None and not cp.ring else 1
        attn_heads, attn_kv_heads = self.num_heads // cp_size, max(1, self.num_kv_heads // cp_size)
        self.helix = cp is not None and cp.helix  # o_proj over tp x cp: this rank's head slice of its tp heads
        self.o_proj = RowParallelLinear(cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size, cfg.o_bias,
                                        helix_group if self.helix else tp_group, params_dtype=dtype)
        self.rotary_emb = rotary_emb  # one table shared by every layer
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype)
        else:
            self.q_norm = self.k_norm = None
        self.attn = Attention(attn_heads, cfg.head_dim, cfg.head_dim ** -0.5, attn_kv_heads,
                              cfg.sliding_windows[layer_idx])
        if cfg.qk_norm:  # applied by the attention layer: its backend may fuse them with rotary
            self.attn.qk_norm = (self.q_norm, self.k_norm)
        self.attn.prefetch_after = (self.o_proj,)

    @property
    def input_linear(self) -> nn.Module:
        """The linear that reads the normed input first (DecoderLayer may fuse the norm into it)."""
        return self.qkv_proj

    def forward(self, positions: torch.Tensor, hidden: Optional[torch.Tensor], md: AttentionMetadata,
                qkv: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`qkv`: qkv_proj(hidden) computed already (then hidden is not read)."""
        if qkv is None:
            qkv = self.qkv_proj(hidden)
        if self.helix:  # every token here already: this rank's keys, merge this rank's head slice
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            o, lse = self.attn(q, k, v, md, self.rotary_emb, positions, return_lse=True)
            return self.o_proj(self.cp.merge_helix(o, lse))
        if self.cp is not None and self.cp.ring:  # every token's q/k/v, this rank's keys, merge over cp
            q, k, v = self.cp.gather(qkv).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            o, lse = self.attn(q, k, v, md, self.rotary_emb, positions, return_lse=True)
            return self.o_proj(self.cp.merge_ring(o, lse))
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.cp is not None:
            q, k, v = self._tokens_to_heads(q, k, v)
        # The q/k norms (Qwen3) and the rotary embedding are applied by the attention layer, whose
        # backend may fuse them with the KV-cache write.
        o = self.attn(q, k, v, md, self.rotary_emb, positions)
        if self.cp is not None:
            o = self.cp.heads_to_tokens(o)
        return self.o_proj(o)

    def _tokens_to_heads(self, q, k, v):
        cp = self.cp
        kv_heads = self.num_kv_heads
        if kv_heads < cp.size:  # repeat each KV head for the ranks whose query heads use it
            rep = cp.size // kv_heads
            k, v = (t.reshape(-1, kv_heads, self.head_dim).repeat_interleave(rep, dim=1).reshape(t.shape[0], -1)
                    for t in (k, v))
            kv_heads = cp.size
        return (cp.tokens_to_heads(q, self.num_heads), cp.tokens_to_heads(k.contiguous(), kv_heads),
                cp.tokens_to_heads(v.contiguous(), kv_heads))


class DecoderMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, tp_group, dtype, intermediate_size: Optional[int] = None):
        super().__init__()
        inter = intermediate_size or cfg.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [inter] * 2, cfg.mlp_bias, tp_group, dtype)
        self.down_proj = RowParallelLinear(inter, cfg.hidden_size, cfg.mlp_bias, tp_group, params_dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))

    def forward_normed(self, x: torch.Tensor, residual: Optional[torch.Tensor], norm: RMSNorm):
        """(forward(norm(x + residual)), x + residual) with the norm fused into gate_up_proj, or None
        where it does not fuse (then the caller runs the two)."""
        if not norm.fuses_with(x, self.gate_up_proj, "mlp"):
            return None
        gate_up, residual, _ = norm.then_linear(x, residual, self.gate_up_proj)
        return self.down_proj(silu_and_mul(gate_up)), residual


class DecoderLayer(nn.Module):
    """Pre-norm residual block around any attention and MLP module (DeepSeek's too)."""

    def __init__(self, cfg: ModelConfig, self_attn: nn.Module, mlp: nn.Module, dtype):
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def forward(self, positions, hidden, residual, md):
        # One decode row on the GPU: each norm runs inside the kernel of the linear that reads it
        # (RMSNorm.then_linear); attention and MLP modules that offer it take the linear's output.
        attn_in = getattr(self.self_attn, "input_linear", None)
        if attn_in is not None and self.input_layernorm.fuses_with(hidden, attn_in, "attention"):
            qkv, residual, _ = self.input_layernorm.then_linear(hidden, residual, attn_in)
            hidden = self.self_attn(positions, None, md, qkv=qkv)
        else:
            if residual is None:
                residual = hidden
                hidden = self.input_layernorm(hidden)
            else:
                hidden, residual = self.input_layernorm(hidden, residual)
            hidden = self.self_attn(positions, hidden, md)
        forward_normed = getattr(self.mlp, "forward_normed", None)
        fused = forward_normed(hidden, residual, self.post_attention_layernorm) if forward_normed else None
        if fused is not None:
            return fused
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class DecoderModel(nn.Module):
    """Embedding, this stage's layers, final norm. `make_attn(i, rotary_emb)` and `make_mlp(i)`
    build layer i's attention and MLP (one rotary table is shared by every layer)."""

    def __init__(self, cfg: ModelConfig, tp_group, dtype, layer_range: range, is_first: bool, is_last: bool,
                 make_attn, make_mlp, rotary_emb: RotaryEmbedding, cp=None):
        super().__init__()
        self.cp = cp  # context parallelism: this rank's tokens between attentions (None without cp)
        self.layer_range = layer_range
        self.is_first, self.is_last = is_first, is_last
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp_group, dtype) \
            if is_first or (is_last and cfg.tie_word_embeddings) else None
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, make_attn(i, rotary_emb), make_mlp(i), dtype) if i in layer_range else nn.Identity()
            for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype) if is_last else None
        # kernel_config.l2_prefetch_next_layer: an MoE block's router gate (a latency-bound kernel) prefetches
        # the next layer's first linear into L2, for the stage's layers that have one after them here
        for i in layer_range:
            if i + 1 in layer_range and isinstance(self.layers[i].mlp, MoEBlock):
                nxt = getattr(self.layers[i + 1].self_attn, "input_linear", None)  # latent attention: none
                if nxt is not None:
                    self.layers[i].mlp.gate.prefetch_after = (nxt,)

    def forward(self, input_ids, positions, md, hidden=None, residual=None):
        if self.is_first:
            hidden = self.embed_tokens(input_ids)
            if self.cp is not None:  # later pipeline stages receive this rank's share already
                hidden = self.cp.split(hidden)
        for i in self.layer_range:
            hidden, residual = self.layers[i](positions, hidden, residual, md)
        if self.is_last:
            hidden, _ = self.norm(hidden, residual)
            return (self.cp.gather(hidden) if self.cp is not None else hidden), None
        return hidden, residual


class DecoderForCausalLM(nn.Module):
    # checkpoint name fragment -> (our parameter fragment, shard id)
    stacked_params = [
        (".q_proj.", ".qkv_proj.", "q"),
        (".k_proj.", ".qkv_proj.", "k"),
        (".v_proj.", ".qkv_proj.", "v"),
        (".gate_proj.", ".gate_up_proj.", 0),
        (".up_proj.", ".gate_up_proj.", 1),
    ]

    def __init__(self, cfg: ModelConfig, parallel=None, dtype=torch.float32, layer_range: Optional[range] = None,
                 is_first: bool = True, is_last: bool = True, moe_backend: str = "auto"):
        super().__init__()
        self.moe_backend = moe_backend  # moe_config.backend, read by models with experts
        # parallel: this rank's ParallelState; a dense decoder splits over attn_tp only (the tp group, or
        # one rank with attention DP; pp enters as layer_range, the stage's layers)
        parallel = parallel or SOLO_STATE
        tp_group = parallel.attn_tp
        self.cfg = cfg
        self.parallel, self.dtype = parallel, dtype
        layer_range = layer_range if layer_range is not None else range(cfg.num_hidden_layers)
        rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope, cfg.partial_rotary_factor)
        cp = getattr(parallel, "cp_split", None)  # context parallelism (ULYSSES, RING, HELIX), set by the runner
        # HELIX: no token split (every rank runs every token); the MLP and o_proj split over tp x cp
        self.helix_group = parallel.tp_cp if cp is not None and cp.helix else None
        self.model = DecoderModel(cfg, tp_group, dtype, layer_range, is_first, is_last,
                                  lambda i, rope: DecoderAttention(cfg, i, tp_group, dtype, rope, cp, self.helix_group),
                                  self.make_mlp, rotary_emb, None if self.helix_group is not None else cp)
        self.lm_head = None
        if is_last:
            self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, tp_group, dtype)
            if cfg.tie_word_embeddings:
                self.lm_head.tie_to(self.model.embed_tokens)

    def make_mlp(self, layer_idx: int) -> nn.Module:
        """The MLP of layer `layer_idx` (a dense one here; MoE models override)."""
        return DecoderMLP(self.cfg, self.helix_group or self.parallel.attn_tp, self.dtype)

    def forward(self, input_ids, positions, md, hidden=None, residual=None):
        return self.model(input_ids, positions, md, hidden, residual)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def attention_layers(self) -> list[Attention]:
        return [self.model.layers[i].self_attn.attn for i in self.model.layer_range]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy (name, tensor) pairs into this shard; returns the parameter names filled."""
        return load_stacked(self, weights)


def load_stacked(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
    """The decoder models' loader: (name, tensor) pairs into `model`'s parameters, checkpoint names of
    fused projections renamed by `model.stacked_params` (checkpoint part, ours, shard id) and loaded
    by shard; tensors of another pipeline stage, rotary buffers and a tied LM head skipped. Returns
    the parameter names filled."""
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded: set[str] = set()
    for name, tensor in weights:
        if "rotary_emb.inv_freq" in name:
            continue
        if name == "lm_head.weight" and model.cfg.tie_word_embeddings:
            continue
        shard_id = None
        for ckpt, ours, sid in model.stacked_params:
            if ckpt in name:
                name, shard_id = name.replace(ckpt, ours), sid
                break
        param = params.get(name)
        if param is None:
            continue  # another pipeline stage owns it
        param.weight_loader(param, tensor, shard_id) if hasattr(param, "weight_loader") \
            else param.data.copy_(tensor)
        loaded.add(name)
    return loaded
