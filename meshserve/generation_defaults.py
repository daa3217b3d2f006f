"""Default sampling settings from a model's `generation_config.json`, as vLLM takes them.

vLLM's `--generation-config auto` (its default): the sampling fields a model's generation config
sets (`temperature`, `top_p`, `top_k`, `min_p`, `repetition_penalty`, and `max_new_tokens` as
max_tokens) are the defaults of a request that leaves them out; `vllm` ignores the file (the
library's own defaults); a folder reads that folder's generation_config.json instead. Model authors
write their recommended settings there (Qwen3: temperature 0.6, top_p 0.95, top_k 20), so a request
without them samples as the model card says. Pure stdlib: the API server's front reads it.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Optional

logger = logging.getLogger(__name__)

FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_new_tokens")


def check_generation_config(value: str) -> str:
    """`auto`, `vllm`, or a folder holding generation_config.json; ValueError otherwise."""
    if value in ("auto", "vllm"):
        return value
    if not os.path.isfile(os.path.join(value, "generation_config.json")):
        raise ValueError(f"generation_config={value!r}: expected 'auto' (the model's generation_config.json), "
                         f"'vllm' (none: the built-in defaults) or a folder holding a generation_config.json")
    return value


def sampling_defaults(model_path: Optional[str], mode: str = "auto") -> dict:
    """The SamplingParams fields the generation config sets ({} for `vllm` or no file); max_new_tokens
    comes back as max_tokens. Values of the wrong type are left out with a warning."""
    if mode == "vllm":
        return {}
    folder = model_path if mode == "auto" else mode
    path = os.path.join(folder or "", "generation_config.json")
    if not folder or not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        logger.warning("%s: not read (%s); sampling defaults are the built-in ones", path, e)
        return {}
    if not isinstance(config, dict):
        return {}
    out = {}
    for name in FIELDS:
        value = config.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            logger.warning("%s: %s=%r is not a number; left out of the sampling defaults", path, name, value)
            continue
        out["max_tokens" if name == "max_new_tokens" else name] = value
    return out


def describe(defaults: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in defaults.items())
