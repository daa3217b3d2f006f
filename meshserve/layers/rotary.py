"""Rotary position embeddings (rotate-half / NeoX layout, as HF Llama) with the scaling rules of
HF configs: default, linear, dynamic (as default below the trained length), llama3 and yarn.

Reads both config spellings: `rope_scaling` + `rope_theta` (Hub checkpoints) and transformers 5's
`rope_parameters`. The cos/sin table is built once in float32 and indexed by position.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from meshserve.kernels import use_triton

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


def rope_config(cfg: dict) -> dict:
    """Merge the two config spellings into one dict with rope_type and rope_theta set."""
    params = dict(cfg.get("rope_parameters") or {})
    legacy = cfg.get("rope_scaling") or {}
    for k, v in legacy.items():
        params.setdefault(k, v)
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")
    params.setdefault("rope_type", "default")
    params.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    if params["rope_type"] not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope_type={params['rope_type']!r} is not supported; "
                         f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    return params


def compute_inv_freq(params: dict, rot_dim: int, max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    base = float(params["rope_theta"])
    inv_freq = 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.int64).float() / rot_dim))
    rope_type = params["rope_type"]
    if rope_type == "linear":
        return inv_freq / float(params["factor"]), 1.0
    if rope_type == "llama3":
        factor = float(params["factor"])
        low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
        old_len = float(params["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    if rope_type == "yarn":
        return _yarn(params, base, rot_dim, max_position_embeddings)
    return inv_freq, 1.0


def _yarn(params: dict, base: float, dim: int, max_pos: int) -> tuple[torch.Tensor, float]:
    orig = params.get("original_max_position_embeddings") or max_pos
    factor = params.get("factor") or max_pos / orig

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn_factor = params.get("attention_factor")
    if attn_factor is None:
        m, m_all = params.get("mscale"), params.get("mscale_all_dim")
        attn_factor = get_mscale(factor, m) / get_mscale(factor, m_all) if (m and m_all) else get_mscale(factor)
    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1

    def correction_dim(rot: float) -> float:
        return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # share of the extrapolated (unscaled) frequency
    return interpolation * (1 - keep) + extrapolation * keep, float(attn_factor)


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_softmax_mscale(params: dict) -> float:
    """DeepSeek's YaRN factor on the attention softmax scale (MLA models): mscale(factor,
    mscale_all_dim) squared, applied to every q.k (nope and rope dims alike), as transformers'
    yarn_apply_mscale; 1.0 without scaling or without mscale_all_dim. (The rotary dims' own
    attention_factor, mscale / mscale_all_dim, is in the cos/sin table, see _yarn.)"""
    if params.get("rope_type", "default") == "default" or not params.get("mscale_all_dim"):
        return 1.0
    m = yarn_get_mscale(float(params.get("factor") or 1.0), float(params["mscale_all_dim"]))
    return m * m


def interleaved_to_half(rot_dim: int) -> torch.Tensor:
    """The permutation that turns interleaved rotary pairs (x0, x1), (x2, x3), ... (GPT-J layout,
    DeepSeek's checkpoints) into this module's rotate-half layout: evens first, then odds. Applied
    to the rows of the projections that make the rotary dims of q and k, it leaves every q.k as it
    was and lets RotaryEmbedding (and its fused kernels) rotate them."""
    return torch.cat([torch.arange(0, rot_dim, 2), torch.arange(1, rot_dim, 2)])


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, params: dict, partial_rotary_factor: float = 1.0):
        super().__init__()
        self.head_dim = head_dim
        self.rot_dim = int(head_dim * partial_rotary_factor)
        inv_freq, scale = compute_inv_freq(params, self.rot_dim, max_position)
        t = torch.arange(max_position, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # [max_pos, rot_dim/2]
        self.register_buffer("cos_cache", freqs.cos() * scale, persistent=False)
        self.register_buffer("sin_cache", freqs.sin() * scale, persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        # positions: [T]; q: [T, num_heads, head_dim]; k: [T, num_kv_heads, head_dim]
        if use_triton(q):
            from meshserve.kernels.fused import rotary_
            rotary_(q, k, positions, self.cos_cache, self.sin_cache)  # in place
            return q, k
        cos = self.cos_cache[positions].unsqueeze(1)
        sin = self.sin_cache[positions].unsqueeze(1)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rot, rest = x[..., : self.rot_dim], x[..., self.rot_dim:]
        x1, x2 = rot.float().chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
        return torch.cat((out, rest), dim=-1) if rest.numel() else out
