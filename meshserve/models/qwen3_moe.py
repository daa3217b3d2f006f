"""Qwen3-MoE and Qwen2-MoE: the Llama-family decoder with mixture-of-experts MLPs.

A layer is sparse unless `mlp_only_layers` names it or `decoder_sparse_step` skips it (then it is
a dense MLP of `intermediate_size`). The sparse block: a replicated router linear (`mlp.gate`),
`FusedMoE` (layers/moe) over the moe_tp / moe_ep groups, and for Qwen2-MoE a shared expert (a
dense TP-split MLP of `shared_expert_intermediate_size`) scaled by sigmoid(`shared_expert_gate`).
Router: softmax top-k, renormalised when `norm_topk_prob`. Mixtral (models/mixtral.py) is the
same block with renormalisation always on and its own checkpoint names.
"""
from __future__ import annotations

import logging
from typing import Iterable, Iterator

import torch
from torch import nn

from meshserve.layers.linear import ReplicatedLinear
from meshserve.layers.moe.block import MoEBlock
from meshserve.layers.moe.layer import FusedMoE
from meshserve.layers.moe.load import ExpertLoad
from meshserve.layers.moe.router import RouterConfig
from meshserve.models.config import ModelConfig
from meshserve.models.llama import DecoderForCausalLM, DecoderMLP

logger = logging.getLogger(__name__)


class SparseMoeBlock(MoEBlock):
    def __init__(self, cfg: ModelConfig, layer_idx: int, parallel, dtype, backend: str, renormalize: bool,
                 load: ExpertLoad):
        super().__init__(parallel)
        self.gate = ReplicatedLinear(cfg.hidden_size, cfg.num_experts, bias=False, params_dtype=dtype)
        self.gate.fp8_ok = False  # routers stay in full precision (FP8 checkpoint gates are dequantised)
        self.experts = FusedMoE(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size,
                                RouterConfig(cfg.num_experts_per_tok, renormalize=renormalize),
                                parallel, dtype, backend, layer_idx, load)
        self.shared_expert = self.shared_expert_gate = None
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = DecoderMLP(cfg, parallel.attn_tp, dtype, cfg.shared_expert_intermediate_size)
            self.shared_expert_gate = ReplicatedLinear(cfg.hidden_size, 1, bias=False, params_dtype=dtype)
            self.shared_expert_gate.fp8_ok = False

    def add_shared(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.shared_expert is not None:  # Qwen2-MoE: scaled by sigmoid(shared_expert_gate)
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out


class QwenMoeForCausalLM(DecoderForCausalLM):
    renormalize_always = False  # Qwen: norm_topk_prob decides; Mixtral: always
    # checkpoint name prefixes of a layer's MoE block, first the one this class names its modules by
    moe_prefixes = (".mlp.",)

    def __init__(self, cfg: ModelConfig, parallel=None, dtype=torch.float32, layer_range=None,
                 is_first: bool = True, is_last: bool = True, moe_backend: str = "auto"):
        self.expert_load = None  # created with the first MoE block (make_mlp runs inside __init__)
        super().__init__(cfg, parallel, dtype, layer_range, is_first, is_last, moe_backend)

    def make_mlp(self, layer_idx: int) -> nn.Module:
        if not self.cfg.moe_layers[layer_idx]:
            return super().make_mlp(layer_idx)
        if self.expert_load is None:
            device = torch.empty(0).device  # the model is built under torch.device(...)
            stage = [i for i, sparse in enumerate(self.cfg.moe_layers) if sparse]
            self.expert_load = ExpertLoad(stage, self.cfg.num_experts, self.cfg.num_experts_per_tok, device)
        return SparseMoeBlock(self.cfg, layer_idx, self.parallel, self.dtype, self.moe_backend,
                              self.renormalize_always or self.cfg.norm_topk_prob, self.expert_load)

    def moe_blocks(self) -> dict[int, SparseMoeBlock]:
        return {i: self.model.layers[i].mlp for i in self.model.layer_range
                if isinstance(self.model.layers[i].mlp, SparseMoeBlock)}

    def _split_expert_weights(self, weights: Iterable[tuple[str, torch.Tensor]],
                              blocks: dict[int, SparseMoeBlock]) -> Iterator[tuple[str, torch.Tensor]]:
        """Expert tensors go straight to their layer's FusedMoE; the rest, under this class's
        module names, on to the dense loader."""
        for name, tensor in weights:
            for prefix in self.moe_prefixes:
                if prefix in name:
                    name = name.replace(prefix, ".mlp.")
                    break
            if ".mlp.experts." in name or name.endswith("e_score_correction_bias"):
                layer = int(name.split(".layers.")[1].split(".")[0])
                block = blocks.get(layer)
                if block is not None:
                    block.experts.load_weight(name.split(".mlp.", 1)[1], tensor)
                continue  # another pipeline stage's layer
            yield name, tensor

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        blocks = self.moe_blocks()
        loaded = super().load_weights(self._split_expert_weights(weights, blocks))
        for i, block in blocks.items():
            if block.experts.fully_loaded():
                prefix = f"model.layers.{i}.mlp.experts."
                loaded |= {prefix + n for n, _ in block.experts.named_parameters()}
        return loaded
