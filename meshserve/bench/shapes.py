"""Model sizes for the benchmarks' roofline figures (weight and KV-cache bytes of a config).

The shapes themselves (configs + tokenizers for random-weight runs) live in meshserve.models.shapes,
so the model package does not depend on bench/; their names stay importable from here.
"""
from __future__ import annotations

from meshserve.models.shapes import (  # noqa: F401 - re-exported for the benchmarks and tests
    SHAPE_FORMAT_VERSION, SHAPES, ModelShape, TokenizerSpec, build_tokenizer, canonical_name, default_cache_dir,
    materialize_shape, resolve_model)


def weight_bytes(config: dict, bytes_per_param: int = 2) -> int:
    """Bytes of all weights (every expert counted) of a Llama/Qwen/Mixtral-style config."""
    h, inter = config["hidden_size"], config["intermediate_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or h // heads
    attn = h * head_dim * (heads + 2 * kv_heads) + heads * head_dim * h
    experts = config.get("num_local_experts", 1)
    mlp = experts * 3 * h * inter + (h * experts if experts > 1 else 0)
    norms = 2 * h + (2 * head_dim if config.get("model_type") == "qwen3" else 0)
    embed = config["vocab_size"] * h * (1 if config.get("tie_word_embeddings") else 2)
    return (config["num_hidden_layers"] * (attn + mlp + norms) + embed + h) * bytes_per_param


def decode_weight_bytes(config: dict, bytes_per_param: int = 2) -> int:
    """Weight bytes one decode step at batch 1 reads: not the input embedding table (only a row
    is looked up, unless it is tied to the LM head), and only the top-k experts of an MoE."""
    total = weight_bytes(config, bytes_per_param)
    if not config.get("tie_word_embeddings"):
        total -= config["vocab_size"] * config["hidden_size"] * bytes_per_param
    experts = config.get("num_local_experts", 1)
    if experts > 1:
        unused = (experts - config["num_experts_per_tok"]) * 3 * config["hidden_size"] * config["intermediate_size"]
        total -= config["num_hidden_layers"] * unused * bytes_per_param
    return total


def kv_bytes_per_token(config: dict, bytes_per_elem: int = 2) -> int:
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim * 2 * bytes_per_elem
