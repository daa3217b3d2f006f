"""ModelConfig: the fields of an HF config.json that the model code reads, parsed once.

Reads the raw JSON (not AutoConfig) so both rope spellings, `torch_dtype` and transformers 5's
`dtype` are handled here and nowhere else.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Optional

import torch

from meshserve.layers.rotary import rope_config
from meshserve.models.registry import SUPPORTED_ARCHITECTURES

_DTYPES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
           "float16": torch.float16, "half": torch.float16}
DEEPSEEK_ARCHITECTURES = ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM")  # latent attention (MLA)


@dataclass
class ModelConfig:
    architecture: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    rope: dict
    partial_rotary_factor: float = 1.0
    sliding_windows: list = field(default_factory=list)  # per layer: None or window size
    checkpoint_dtype: Optional[str] = None
    bos_token_id: Optional[int] = None
    eos_token_ids: list = field(default_factory=list)
    # mixture of experts (0 experts: a dense model)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    moe_layers: list = field(default_factory=list)  # per layer: True where the MLP is a MoE block
    shared_expert_intermediate_size: int = 0
    # latent attention (DeepSeek-V2/V3 MLA): the KV cache holds kv_lora_rank + qk_rope_head_dim
    # values per token and layer (engine/kv_spec.py); None: ordinary K/V heads
    kv_lora_rank: Optional[int] = None
    qk_rope_head_dim: int = 0
    # FP8 checkpoint (quantization_config): the block of its weight scales (kernels/fp8.py PER_ROW for
    # per-tensor and per-channel scales) and their tensors' name suffix
    fp8_block: Optional[tuple] = None
    fp8_scale_name: str = "weight_scale_inv"
    raw: dict = field(default_factory=dict, repr=False)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0 and any(self.moe_layers)

    @classmethod
    def from_dict(cls, cfg: dict) -> "ModelConfig":
        archs = cfg.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ValueError(f"Unsupported architecture {archs or cfg.get('model_type')!r}; "
                             f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        act = cfg.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"hidden_act={act!r} is not supported; supported: silu")
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
            value = cfg[name]
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{arch}: config field {name}={value!r} must be a positive integer")
        heads = cfg["num_attention_heads"]
        kv_heads = cfg.get("num_key_value_heads")
        if kv_heads is not None and (not isinstance(kv_heads, int) or isinstance(kv_heads, bool) or kv_heads < 1
                                     or heads % kv_heads):
            raise ValueError(f"{arch}: config field num_key_value_heads={kv_heads!r} must be a positive integer "
                             f"that divides num_attention_heads={heads}")
        if not cfg.get("head_dim") and cfg["hidden_size"] % heads and arch not in DEEPSEEK_ARCHITECTURES:
            raise ValueError(f"{arch}: config field hidden_size={cfg['hidden_size']} must be a multiple of "
                             f"num_attention_heads={heads} (or give head_dim)")
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
        layers = cfg["num_hidden_layers"]
        is_qwen2 = arch == "Qwen2ForCausalLM"
        moe = _moe_fields(arch, cfg, layers)
        mla = _mla_fields(arch, cfg)
        if mla:  # DeepSeek: the query/key head is nope + rope dims (HF writes head_dim = the rope dims)
            head_dim = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
        attn_bias = bool(cfg.get("attention_bias", False))
        eos = cfg.get("eos_token_id")
        eos = [] if eos is None else (list(eos) if isinstance(eos, list) else [eos])
        return cls(
            architecture=arch,
            hidden_size=cfg["hidden_size"],
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            intermediate_size=cfg["intermediate_size"],
            vocab_size=cfg["vocab_size"],
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=True if is_qwen2 else (bool(cfg.get("qkv_bias", True)) if arch == "Qwen2MoeForCausalLM"
                                            else attn_bias),
            o_bias=False if is_qwen2 else attn_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"),
            rope=rope_config(cfg),
            partial_rotary_factor=float(cfg.get("partial_rotary_factor", 1.0)),
            sliding_windows=_sliding_windows(arch, cfg, layers),
            checkpoint_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos,
            **_fp8_fields(arch, cfg),
            raw=cfg,
            **moe,
            **mla,
        )

    @classmethod
    def from_pretrained(cls, path: str) -> "ModelConfig":
        file = os.path.join(path, "config.json")
        with open(file) as f:
            try:
                cfg = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{file}: not valid JSON: {e}") from None
        if not isinstance(cfg, dict):
            raise ValueError(f"{file}: expected a JSON object of config fields, got {type(cfg).__name__}")
        try:
            return cls.from_dict(cfg)
        except KeyError as e:
            raise ValueError(f"{file}: the required field {e.args[0]!r} is missing") from None

    def torch_dtype(self, requested: str, device: torch.device) -> torch.dtype:
        if requested in (None, "auto"):
            if device.type == "cpu":
                return torch.float32  # CPU half-precision matmuls are slow and inexact: fp32 there
            return _DTYPES.get(str(self.checkpoint_dtype), torch.bfloat16) if self.checkpoint_dtype else torch.bfloat16
        if requested not in _DTYPES:
            raise ValueError(f"dtype={requested!r} is not supported; accepted: auto, float32, bfloat16, float16")
        return _DTYPES[requested]


def _moe_fields(arch: str, cfg: dict, num_layers: int) -> dict:
    """The expert fields of Mixtral / Qwen2-MoE / Qwen3-MoE configs, or {} for a dense model."""
    if arch == "MixtralForCausalLM":
        experts = cfg.get("num_local_experts", 8)
        return dict(num_experts=experts, num_experts_per_tok=cfg.get("num_experts_per_tok", 2),
                    moe_intermediate_size=cfg["intermediate_size"], norm_topk_prob=True,
                    moe_layers=[True] * num_layers)
    if arch in ("Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"):
        experts = cfg.get("num_experts") or cfg.get("num_local_experts") or 0  # Hub spelling, transformers 5
        step = cfg.get("decoder_sparse_step", 1) or 1
        dense = set(cfg.get("mlp_only_layers") or [])
        layers = [experts > 0 and i not in dense and (i + 1) % step == 0 for i in range(num_layers)]
        return dict(num_experts=experts, num_experts_per_tok=cfg.get("num_experts_per_tok", 0),
                    moe_intermediate_size=cfg.get("moe_intermediate_size", 0),
                    norm_topk_prob=bool(cfg.get("norm_topk_prob", False)), moe_layers=layers,
                    shared_expert_intermediate_size=(cfg.get("shared_expert_intermediate_size") or 0)
                    if arch == "Qwen2MoeForCausalLM" else 0)
    if arch in DEEPSEEK_ARCHITECTURES:  # DeepSeekMoE: dense first layers, shared experts
        experts = cfg.get("n_routed_experts") or 0
        first_dense = cfg.get("first_k_dense_replace") or 0
        freq = cfg.get("moe_layer_freq") or 1
        layers = [experts > 0 and i >= first_dense and i % freq == 0 for i in range(num_layers)]
        inter = cfg.get("moe_intermediate_size") or 0
        return dict(num_experts=experts, num_experts_per_tok=cfg.get("num_experts_per_tok") or 0,
                    moe_intermediate_size=inter,
                    norm_topk_prob=bool(cfg.get("norm_topk_prob", arch == "DeepseekV3ForCausalLM")),
                    moe_layers=layers, shared_expert_intermediate_size=inter * (cfg.get("n_shared_experts") or 0))
    return {}


_FP8_ACCEPTED = ("accepted: FP8 weight checkpoints: quant_method 'fp8' (block-wise with weight_block_size, as "
                 "DeepSeek-V3 and the Hub's *-FP8; or per-tensor), 'compressed-tensors' float8 weights "
                 "(tensor, channel or block strategy), 'modelopt' with quant_algo FP8; or an unquantised checkpoint")


def _fp8_fields(arch: str, cfg: dict) -> dict:
    """fp8_block and fp8_scale_name of an FP8 checkpoint ({} without quantization_config); any other
    quantisation a one-line error naming what is accepted. Activations run in the model's dtype
    (weight-only FP8): a checkpoint's static input scales are not needed and are skipped."""
    from meshserve.kernels.fp8 import PER_ROW, check_block
    qc = cfg.get("quantization_config")
    if qc is None:
        return {}
    if not isinstance(qc, dict):
        raise ValueError(f"{arch}: config field quantization_config={qc!r} is not supported; {_FP8_ACCEPTED}")
    method = qc.get("quant_method")
    if method == "fp8":
        fmt = qc.get("fmt", "e4m3")
        if fmt != "e4m3":
            raise ValueError(f"{arch}: quantization_config.fmt={fmt!r} is not supported; accepted: e4m3")
        block = qc.get("weight_block_size")
        if block is None:  # per-tensor (AutoFP8, vLLM's fp8 format): weight_scale per tensor
            return dict(fp8_block=PER_ROW, fp8_scale_name="weight_scale")
        return dict(fp8_block=check_block(block), fp8_scale_name="weight_scale_inv")
    if method == "compressed-tensors":
        groups = qc.get("config_groups") or {}
        strategies = set()
        for name, group in groups.items():
            w = (group or {}).get("weights") or {}
            if w.get("type") != "float" or w.get("num_bits") != 8:
                raise ValueError(f"{arch}: quantization_config.config_groups.{name}.weights type={w.get('type')!r} "
                                 f"num_bits={w.get('num_bits')!r} is not supported; {_FP8_ACCEPTED}")
            strategy = w.get("strategy")
            if strategy == "block":
                strategies.add(("block", tuple(check_block(w.get("block_structure")))))
            elif strategy in ("tensor", "channel"):
                strategies.add(("row", PER_ROW))
            else:
                raise ValueError(f"{arch}: quantization_config.config_groups.{name}.weights.strategy={strategy!r} is "
                                 f"not supported; accepted: tensor, channel, block")
        if len(strategies) != 1:
            raise ValueError(f"{arch}: quantization_config (compressed-tensors) with {len(strategies)} weight "
                             f"strategies {sorted(s for s, _ in strategies)} is not supported; {_FP8_ACCEPTED}")
        return dict(fp8_block=strategies.pop()[1], fp8_scale_name="weight_scale")
    if method == "modelopt":
        algo = qc.get("quant_algo") or (qc.get("quantization") or {}).get("quant_algo")
        if algo != "FP8":
            raise ValueError(f"{arch}: quantization_config.quant_algo={algo!r} (modelopt) is not supported; "
                             f"{_FP8_ACCEPTED}")
        return dict(fp8_block=PER_ROW, fp8_scale_name="weight_scale")
    raise ValueError(f"{arch}: quantization_config.quant_method={method!r} is not supported; {_FP8_ACCEPTED}")


def _mla_fields(arch: str, cfg: dict) -> dict:
    """The latent-attention fields of DeepSeek-V2/V3 configs, or {} for other models."""
    if arch not in DEEPSEEK_ARCHITECTURES:
        return {}
    for name in ("kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim"):
        if not isinstance(cfg.get(name), int) or cfg[name] < 1:
            raise ValueError(f"{arch}: config field {name}={cfg.get(name)!r} must be a positive integer")
    return dict(kv_lora_rank=cfg["kv_lora_rank"], qk_rope_head_dim=cfg["qk_rope_head_dim"])


def _sliding_windows(arch: str, cfg: dict, num_layers: int) -> list:
    window = cfg.get("sliding_window")
    if arch in ("MistralForCausalLM", "MixtralForCausalLM"):
        return [window] * num_layers
    if arch in ("Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM") and not cfg.get("use_sliding_window", False):
        return [None] * num_layers
    if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        if not cfg.get("use_sliding_window", False) or window is None:
            return [None] * num_layers
        types = cfg.get("layer_types")
        if types:
            return [window if t == "sliding_attention" else None for t in types]
        start = cfg.get("max_window_layers", num_layers)
        return [window if i >= start else None for i in range(num_layers)]
    if cfg.get("layer_types") and window:
        return [window if t == "sliding_attention" else None for t in cfg["layer_types"]]
    return [None] * num_layers
