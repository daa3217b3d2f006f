"""Mixtral: the Qwen-MoE block with softmax top-k always renormalised and every layer sparse.

Hub checkpoints name the block `block_sparse_moe` and the experts' linears w1 (gate), w3 (up) and
w2 (down); transformers 5 names it `mlp` with fused `experts.gate_up_proj` / `experts.down_proj`.
Both load (layers/moe/layer.py maps the expert names).
"""
from __future__ import annotations

from meshserve.models.qwen3_moe import QwenMoeForCausalLM


class MixtralForCausalLM(QwenMoeForCausalLM):
    renormalize_always = True
    moe_prefixes = (".block_sparse_moe.", ".mlp.")
