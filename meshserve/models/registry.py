"""The one table of supported architectures: HF `architectures` name -> (module, class).

Names only, so that config parsing can check an architecture without importing model code; the
loader imports the class when it builds a model (as vLLM's registry does).
"""
from __future__ import annotations

import importlib

_MODELS: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("meshserve.models.llama", "DecoderForCausalLM"),
    "MistralForCausalLM": ("meshserve.models.llama", "DecoderForCausalLM"),
    "Qwen2ForCausalLM": ("meshserve.models.llama", "DecoderForCausalLM"),
    "Qwen3ForCausalLM": ("meshserve.models.llama", "DecoderForCausalLM"),
    "MixtralForCausalLM": ("meshserve.models.mixtral", "MixtralForCausalLM"),
    "Qwen2MoeForCausalLM": ("meshserve.models.qwen3_moe", "QwenMoeForCausalLM"),
    "Qwen3MoeForCausalLM": ("meshserve.models.qwen3_moe", "QwenMoeForCausalLM"),
    "DeepseekV2ForCausalLM": ("meshserve.models.deepseek_v3", "DeepseekV3ForCausalLM"),
    "DeepseekV3ForCausalLM": ("meshserve.models.deepseek_v3", "DeepseekV3ForCausalLM"),
}

SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(_MODELS)


def model_class(architecture: str) -> type:
    """The model class for an HF architecture name; a ValueError naming the supported ones."""
    if architecture not in _MODELS:
        raise ValueError(f"architecture {architecture!r} is not supported; supported: "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    module, name = _MODELS[architecture]
    return getattr(importlib.import_module(module), name)
