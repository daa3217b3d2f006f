"""DeepSeek-V3 and DeepSeek-V2 (Kimi / Moonlight checkpoints use the V3 architecture): multi-head
latent attention (MLA) and DeepSeekMoE.

Attention (layers/attention/mla.py): q from hidden through q_a_proj -> q_a_layernorm -> q_b_proj
(q_lora_rank set) or one q_proj; the latent from kv_a_proj_with_mqa, kv_lora_rank values through
kv_a_layernorm plus qk_rope_head_dim rope-key values; kv_b_proj expands the latent into each head's
nope key (qk_nope_head_dim) and value (v_head_dim). The cache keeps the latent, one vector per
token and layer. Softmax scale: (nope + rope)^-0.5 times DeepSeek's YaRN mscale(factor,
mscale_all_dim)^2 (layers/rotary.yarn_softmax_mscale); the rope dims' own YaRN attention factor
sits in the cos/sin table. DeepSeek rotates interleaved pairs (x0, x1), (x2, x3)...: the rows of
q's and the latent's rope dims are permuted at load time into the rotate-half layout RotaryEmbedding
uses (evens, then odds), which leaves every q.k unchanged (V3 with rope_interleave false: as is).

TP splits the heads (q_b_proj / q_proj and kv_b_proj column-parallel, o_proj row-parallel); the
latent projections are replicated, so every TP rank holds the whole latent cache.

MLP: the first `first_k_dense_replace` layers (and those off `moe_layer_freq`) are dense
(`intermediate_size`), the others DeepSeekMoE: a replicated fp32 router linear (`mlp.gate`),
`FusedMoE` (layers/moe) over the moe_tp / moe_ep groups, plus `n_shared_experts` shared experts
as one dense TP-split MLP of n_shared_experts x moe_intermediate_size, added unscaled.
Router: V3 sigmoid scores with `e_score_correction_bias` for the choice, group-limited top-k
(n_group, topk_group: groups ranked by the sum of their two best scores), renormalised when
`norm_topk_prob`, times `routed_scaling_factor`. V2 softmax scores, `topk_method` greedy or
group_limited_greedy (groups ranked by their best score), times `routed_scaling_factor`
(renormalised when norm_topk_prob, as DeepSeek's code and vLLM; V2 checkpoints set it false).

Multi-token-prediction layers a checkpoint carries (model.layers.<num_hidden_layers>... ) are
skipped with one log line. FP8 block-quantised checkpoints (weight_scale_inv, as DeepSeek-V3 ships):
the attention's linears, the dense / shared MLPs and the routed experts hold FP8 weights; kv_b_proj
(read as the latent attention's up-projection matrix) and the router are dequantised at load
(models/loader.py).
"""
from __future__ import annotations

import logging
from typing import Iterable, Iterator, Optional

import torch
from torch import nn

from meshserve.distributed.comm import SOLO_STATE
from meshserve.layers.attention import AttentionMetadata
from meshserve.layers.attention.mla import MLAAttention
from meshserve.layers.embedding import ParallelLMHead
from meshserve.layers.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear
from meshserve.layers.moe.block import MoEBlock
from meshserve.layers.moe.layer import FusedMoE
from meshserve.layers.moe.load import ExpertLoad
from meshserve.layers.moe.router import RouterConfig
from meshserve.layers.norm import RMSNorm
from meshserve.layers.rotary import RotaryEmbedding, interleaved_to_half, yarn_softmax_mscale
from meshserve.models.config import ModelConfig
from meshserve.models.llama import DecoderMLP, DecoderModel, load_stacked

logger = logging.getLogger(__name__)

LATENT_NORM_EPS = 1e-6  # q_a_layernorm / kv_a_layernorm: DeepSeek's RMSNorm default, not rms_norm_eps
V2_TOPK_METHODS = ("greedy", "group_limited_greedy")


class MLAConfig:
    """The latent-attention numbers of a DeepSeek config (read from the raw config.json)."""

    def __init__(self, cfg: ModelConfig):
        raw = cfg.raw
        self.q_lora_rank: Optional[int] = raw.get("q_lora_rank") or None
        self.kv_lora_rank: int = raw["kv_lora_rank"]
        self.nope: int = raw["qk_nope_head_dim"]
        self.rope: int = raw["qk_rope_head_dim"]
        self.v: int = raw["v_head_dim"]
        self.bias = bool(raw.get("attention_bias", False))
        # V3 configs say whether the rope dims are interleaved pairs; V2 always rotates pairs
        self.interleaved = cfg.architecture == "DeepseekV2ForCausalLM" or bool(raw.get("rope_interleave", True))
        self.scale = (self.nope + self.rope) ** -0.5 * yarn_softmax_mscale(cfg.rope)


class DeepseekAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, mla: MLAConfig, tp_group, dtype, rotary_emb: RotaryEmbedding, cp=None,
                 helix_group=None):
        super().__init__()
        self.cp = cp  # context parallelism RING / HELIX (the latent cache sharded by sequence); None without cp
        self.helix = helix_group is not None  # HELIX: o_proj over tp x cp, by head slices
        heads, hidden = cfg.num_attention_heads, cfg.hidden_size
        if heads % tp_group.size:
            raise ValueError(f"num_attention_heads={heads} is not divisible by tensor parallel size {tp_group.size}")
        self.mla = mla
        self.num_heads = heads // tp_group.size
        qk = mla.nope + mla.rope
        if mla.q_lora_rank:
            self.q_a_proj = ReplicatedLinear(hidden, mla.q_lora_rank, mla.bias, params_dtype=dtype)
            self.q_a_layernorm = RMSNorm(mla.q_lora_rank, LATENT_NORM_EPS, dtype)
            self.q_b_proj = ColumnParallelLinear(mla.q_lora_rank, heads * qk, False, tp_group, params_dtype=dtype)
        else:
            self.q_proj = ColumnParallelLinear(hidden, heads * qk, False, tp_group, params_dtype=dtype)
        self.kv_a_proj_with_mqa = ReplicatedLinear(hidden, mla.kv_lora_rank + mla.rope, mla.bias, params_dtype=dtype)
        self.kv_a_layernorm = RMSNorm(mla.kv_lora_rank, LATENT_NORM_EPS, dtype)
        self.kv_b_proj = ColumnParallelLinear(mla.kv_lora_rank, heads * (mla.nope + mla.v), False, tp_group,
                                              params_dtype=dtype)
        self.kv_b_proj.fp8_ok = False  # attention reads its weight as a matrix (absorbed up-projection)
        self.o_proj = RowParallelLinear(heads * mla.v, hidden, mla.bias, helix_group or tp_group, params_dtype=dtype)
        self.rotary_emb = rotary_emb  # one table shared by every layer
        self.attn = MLAAttention(self.num_heads, mla.kv_lora_rank, mla.nope, mla.rope, mla.v, mla.scale)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, md: AttentionMetadata) -> torch.Tensor:
        if self.mla.q_lora_rank:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden)))
        else:
            q = self.q_proj(hidden)
        kv = self.kv_a_proj_with_mqa(hidden)
        L = self.mla.kv_lora_rank
        latent = torch.cat([self.kv_a_layernorm(kv[:, :L]), kv[:, L:]], dim=-1)  # [T, L + R], a new tensor
        if self.helix:  # every token here already: this rank's shard, merge this rank's head slice
            o, lse = self.attn(q, latent, self.kv_b_proj.weight, md, self.rotary_emb, positions,
                               return_lse=True)
            return self.o_proj(self.cp.merge_helix(o, lse))
        if self.cp is not None:  # RING: every token's q and latent, this rank's shard, merge over cp
            q, latent = self.cp.gather(q), self.cp.gather(latent)
            o, lse = self.attn(q, latent, self.kv_b_proj.weight, md, self.rotary_emb, positions,
                               return_lse=True)
            return self.o_proj(self.cp.merge_ring(o, lse))
        o = self.attn(q, latent, self.kv_b_proj.weight, md, self.rotary_emb, positions)
        return self.o_proj(o)


def router_config(cfg: ModelConfig) -> RouterConfig:
    """DeepSeekMoE's routing rule from the raw config; a one-line error for a V2 topk_method we lack."""
    raw = cfg.raw
    scaling = float(raw.get("routed_scaling_factor") or 1.0)
    if cfg.architecture == "DeepseekV3ForCausalLM":
        n_group, topk_group = raw.get("n_group") or 1, raw.get("topk_group") or 1
        return RouterConfig(cfg.num_experts_per_tok, renormalize=cfg.norm_topk_prob, scoring="sigmoid",
                            n_group=n_group, topk_group=topk_group, routed_scaling_factor=scaling)
    method = raw.get("topk_method") or "greedy"
    if method not in V2_TOPK_METHODS:
        raise ValueError(f"DeepseekV2ForCausalLM: topk_method={method!r} is not supported; accepted: "
                         f"{', '.join(V2_TOPK_METHODS)}")
    grouped = method == "group_limited_greedy"
    return RouterConfig(cfg.num_experts_per_tok, renormalize=cfg.norm_topk_prob, scoring="softmax",
                        n_group=raw.get("n_group") if grouped else None,
                        topk_group=raw.get("topk_group") if grouped else None, routed_scaling_factor=scaling)


class DeepseekMoE(MoEBlock):
    def __init__(self, cfg: ModelConfig, layer_idx: int, parallel, dtype, backend: str, load: ExpertLoad):
        super().__init__(parallel)
        router = router_config(cfg)
        # the router runs in fp32, as DeepSeek's and transformers' (gate.weight is kept in fp32)
        self.gate = ReplicatedLinear(cfg.hidden_size, cfg.num_experts, bias=False, params_dtype=torch.float32)
        self.gate.fp8_ok = False
        self.experts = FusedMoE(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, router, parallel,
                                dtype, backend, layer_idx, load)
        self.shared_experts = DecoderMLP(cfg, parallel.attn_tp, dtype, cfg.shared_expert_intermediate_size) \
            if cfg.shared_expert_intermediate_size else None

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(x.float())

    def add_shared(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return out + self.shared_experts(x) if self.shared_experts is not None else out


class DeepseekV3ForCausalLM(nn.Module):
    """DeepseekV3ForCausalLM and DeepseekV2ForCausalLM (models/registry.py)."""
    stacked_params = [(".gate_proj.", ".gate_up_proj.", 0), (".up_proj.", ".gate_up_proj.", 1)]

    def __init__(self, cfg: ModelConfig, parallel=None, dtype=torch.float32, layer_range: Optional[range] = None,
                 is_first: bool = True, is_last: bool = True, moe_backend: str = "auto"):
        super().__init__()
        parallel = parallel or SOLO_STATE
        self.cfg, self.parallel, self.dtype, self.moe_backend = cfg, parallel, dtype, moe_backend
        self.mla = MLAConfig(cfg)
        self.expert_load: Optional[ExpertLoad] = None  # created with the first MoE block
        layer_range = layer_range if layer_range is not None else range(cfg.num_hidden_layers)
        # attention, dense MLPs, shared experts, embedding and LM head split over attn_tp: the tp group,
        # or one rank with attention DP (layers/dp_attention.py); the experts over moe_tp x moe_ep
        mla, tp = self.mla, parallel.attn_tp
        rotary_emb = RotaryEmbedding(mla.rope, cfg.max_position_embeddings, cfg.rope)
        cp = getattr(parallel, "cp_split", None)  # context parallelism (RING, HELIX), set by the model runner
        # HELIX: no token split but in the experts; o_proj and the dense MLPs over tp x cp
        self.helix_group = parallel.tp_cp if cp is not None and cp.helix else None
        self.model = DecoderModel(cfg, tp, dtype, layer_range, is_first, is_last,
                                  lambda i, rope: DeepseekAttention(cfg, mla, tp, dtype, rope, cp, self.helix_group),
                                  self.make_mlp, rotary_emb, None if self.helix_group is not None else cp)
        self.lm_head = None
        if is_last:
            self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, tp, dtype)
            if cfg.tie_word_embeddings:
                self.lm_head.tie_to(self.model.embed_tokens)

    def make_mlp(self, layer_idx: int) -> nn.Module:
        cfg = self.cfg
        if not (cfg.moe_layers and cfg.moe_layers[layer_idx]):
            return DecoderMLP(cfg, self.helix_group or self.parallel.attn_tp, self.dtype)
        if self.expert_load is None:
            device = torch.empty(0).device  # the model is built under torch.device(...)
            sparse = [i for i, is_moe in enumerate(cfg.moe_layers) if is_moe]
            self.expert_load = ExpertLoad(sparse, cfg.num_experts, cfg.num_experts_per_tok, device)
        return DeepseekMoE(cfg, layer_idx, self.parallel, self.dtype, self.moe_backend, self.expert_load)

    def forward(self, input_ids, positions, md, hidden=None, residual=None):
        return self.model(input_ids, positions, md, hidden, residual)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def attention_layers(self) -> list[MLAAttention]:
        return [self.model.layers[i].self_attn.attn for i in self.model.layer_range]

    def moe_blocks(self) -> dict[int, DeepseekMoE]:
        return {i: self.model.layers[i].mlp for i in self.model.layer_range
                if isinstance(self.model.layers[i].mlp, DeepseekMoE)}

    # ---- weights --------------------------------------------------------------------------------
    def _rope_rows_to_half(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Interleaved rope rows -> rotate-half rows (see the module docstring); other tensors as they are."""
        mla = self.mla
        if not mla.interleaved or name.endswith("_scale_inv"):  # rope rows share their block's scale
            return tensor
        perm = interleaved_to_half(mla.rope).to(tensor.device)
        if ".kv_a_proj_with_mqa." in name:
            L = mla.kv_lora_rank
            return torch.cat([tensor[:L], tensor[L:][perm]])
        if name.endswith(("self_attn.q_proj.weight", "self_attn.q_b_proj.weight")):
            qk = mla.nope + mla.rope
            t = tensor.view(-1, qk, tensor.shape[-1])
            return torch.cat([t[:, :mla.nope], t[:, mla.nope:][:, perm]], dim=1).reshape(tensor.shape)
        return tensor

    def _route(self, weights: Iterable[tuple[str, torch.Tensor]], blocks: dict[int, DeepseekMoE],
               skipped: list) -> Iterator[tuple[str, torch.Tensor]]:
        """Expert tensors straight to their layer's FusedMoE, multi-token-prediction layers aside,
        the rest (rope rows permuted) on to the dense loader."""
        num_layers = self.cfg.num_hidden_layers
        for name, tensor in weights:
            if ".layers." in name:
                layer = int(name.split(".layers.")[1].split(".")[0])
                if layer >= num_layers:  # multi-token prediction
                    skipped.append(layer)
                    continue
                if ".mlp.experts." in name or name.endswith("e_score_correction_bias"):
                    block = blocks.get(layer)
                    if block is not None:
                        block.experts.load_weight(name.split(".mlp.", 1)[1], tensor)
                    continue  # another pipeline stage's layer
            yield name, self._rope_rows_to_half(name, tensor)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy (name, tensor) pairs into this shard; returns the parameter names filled."""
        blocks = self.moe_blocks()
        skipped: list[int] = []
        loaded = load_stacked(self, self._route(weights, blocks, skipped))
        for i, block in blocks.items():
            if block.experts.fully_loaded():
                prefix = f"model.layers.{i}.mlp.experts."
                loaded |= {prefix + n for n, _ in block.experts.named_parameters()}
        if skipped:
            layers = sorted(set(skipped))
            logger.info("skipped %d checkpoint tensors of multi-token-prediction layer(s) %s (speculative decoding "
                        "with them is not supported)", len(skipped), layers)
        return loaded
