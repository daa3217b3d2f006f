"""Configs of the fused MoE expert kernels (kernels/moe.py): the tile shapes (GemmConfig,
MoeKernelConfig), the built-in table, and the tuned config files benchmarks/tune_moe.py writes
(kernels/configs/, or $MESHSERVE_MOE_CONFIG_DIR first), read once per process."""
from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Union

import torch

logger = logging.getLogger("meshserve.kernels.moe")


@dataclass(frozen=True)
class GemmConfig:
    block_n: int
    block_k: int
    group_m: int = 1
    num_warps: int = 4
    num_stages: int = 3


@dataclass(frozen=True)
class MoeKernelConfig:
    """block_m is shared by both GEMMs (the sorted rows are padded to it); gate_up.block_n counts
    intermediate columns (each program reads that many gate rows and as many up rows of w13).
    down_sum (decode, up to DIRECT_MAX assignments): when set, the two-kernel path runs instead:
    the gated GEMM sorts its own rows (no alignment kernel) and writes them in assignment order,
    then _down_sum_kernel does the down product and the sum over k per token (block_n output
    columns per program, block_k wide steps over I, num_warps; group_m and num_stages unused;
    block_n * block_k * next_power_of_2(K) weights per load: keep it near 16k for K=8)."""
    block_m: int
    gate_up: GemmConfig
    down: GemmConfig
    down_sum: Optional[GemmConfig] = None
    # with down_sum: the gated GEMM as matrix-vector products (kernels/moe.py _gate_up_gemv_kernel:
    # block_n intermediate columns per program, block_k wide steps over H, num_warps) instead of
    # the self-sorting dot tiles of `gate_up`; bf16/fp16 weights (FP8 experts keep the dot tiles)
    gate_up_gemv: Optional[GemmConfig] = None


# (most assignments per local expert, config), first match wins. Shaped after public H200 sweeps of
# this kernel design for E=128, N=768 (their gate_up N is our 2*block_n); to be re-tuned on ours.
CONFIG_TABLE: tuple[tuple[float, MoeKernelConfig], ...] = (
    # up to 1/4 assignment per expert (T <= 4 for E=128 K=8): two kernels (an untuned guess at where
    # two fewer launches beat re-reading an expert shared by two tokens; the tuner decides per GPU)
    (0.25, MoeKernelConfig(16, GemmConfig(32, 128, 1, 4, 4), GemmConfig(64, 128, 1, 4, 4),
                           down_sum=GemmConfig(8, 128, 1, 4, 1))),
    (1, MoeKernelConfig(16, GemmConfig(32, 128, 1, 4, 4), GemmConfig(64, 128, 1, 4, 4))),
    (8, MoeKernelConfig(16, GemmConfig(64, 128, 1, 4, 3), GemmConfig(128, 128, 1, 4, 3))),
    (16, MoeKernelConfig(32, GemmConfig(128, 128, 16, 4, 2), GemmConfig(256, 128, 16, 4, 2))),
    (32, MoeKernelConfig(64, GemmConfig(64, 64, 1, 4, 3), GemmConfig(128, 64, 1, 4, 3))),
    (float("inf"), MoeKernelConfig(128, GemmConfig(128, 64, 8, 8, 4), GemmConfig(256, 64, 8, 8, 4))),
)

ConfigArg = Union[None, MoeKernelConfig, Callable[[int, int, int, int, int], MoeKernelConfig]]


def _table_config(T: int, K: int, E: int) -> MoeKernelConfig:
    per_expert = T * K / max(1, E)
    for bound, cfg in CONFIG_TABLE:
        if per_expert <= bound:
            return cfg
    return CONFIG_TABLE[-1][1]


def default_config(T: int, K: int, E: int, H: int, I: int, dtype: Optional[torch.dtype] = None,
                   device_name: Optional[str] = None) -> MoeKernelConfig:
    """The config for T tokens of top-K over E local experts (hidden H, intermediate I): from a
    tuned file for this shape, dtype and GPU when one exists (`find_config_table`; needs `dtype`
    and `device_name`), else the built-in CONFIG_TABLE."""
    if dtype is not None and device_name is not None:
        table = find_config_table(E, H, I, dtype, device_name)
        if table is not None:
            return table(T, K, E, H, I)
    return _table_config(T, K, E)


# ----------------------------------------------------------------------------------------------------
# Tuned config files (benchmarks/tune_moe.py writes them): one JSON per (local experts, hidden,
# local intermediate, dtype, GPU), best config per token count T.
#
#   {"format": "meshserve-moe-configs", "version": 1, "E": 128, "H": 2048, "I": 768, "K": 8,
#    "dtype": "bfloat16", "device": "NVIDIA H200",
#    "configs": {"1": {"block_m": 16, "gate_up": {"block_n": 32, "block_k": 128, "group_m": 1,
#                                                 "num_warps": 4, "num_stages": 4},
#                      "down": {...}, "us": 21.3}, "2": {...}, ...}}
#
# Extra keys (timings) are ignored. A call with T tokens takes the entry whose T is nearest on a log
# scale (ties: the smaller), after scaling T by K / the file's K when top-k differs.

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
CONFIG_DIR_ENV = "MESHSERVE_MOE_CONFIG_DIR"  # searched before CONFIG_DIR
_DTYPE_TAGS = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def gpu_tag(device_name: str) -> str:
    """'NVIDIA H200' -> 'H200', 'NVIDIA H100 80GB HBM3' -> 'H100_80GB_HBM3'."""
    name = device_name.strip()
    if name.upper().startswith("NVIDIA "):
        name = name[len("NVIDIA "):]
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_") or "unknown"


def config_file_name(E: int, H: int, I: int, dtype: torch.dtype, device_name: str) -> str:
    return f"moe_E{E}_H{H}_I{I}_{_DTYPE_TAGS.get(dtype, str(dtype).replace('torch.', ''))}_{gpu_tag(device_name)}.json"


def config_to_dict(cfg: MoeKernelConfig) -> dict:
    d = {"block_m": cfg.block_m, "gate_up": asdict(cfg.gate_up), "down": asdict(cfg.down)}
    if cfg.down_sum is not None:
        d["down_sum"] = asdict(cfg.down_sum)
    if cfg.gate_up_gemv is not None:
        d["gate_up_gemv"] = asdict(cfg.gate_up_gemv)
    return d


def config_from_dict(d: dict) -> MoeKernelConfig:
    fields = ("block_n", "block_k", "group_m", "num_warps", "num_stages")

    def gemm(g):
        return GemmConfig(**{f: int(g[f]) for f in fields if f in g})
    cfg = MoeKernelConfig(int(d["block_m"]), gemm(d["gate_up"]), gemm(d["down"]),
                          gemm(d["down_sum"]) if d.get("down_sum") else None,
                          gemm(d["gate_up_gemv"]) if d.get("gate_up_gemv") else None)
    if cfg.gate_up_gemv is not None and cfg.down_sum is None:
        raise ValueError(f"gate_up_gemv needs down_sum (the decode path it belongs to) in {d}")
    tiles = [cfg.block_m, cfg.gate_up.block_n, cfg.gate_up.block_k, cfg.down.block_n, cfg.down.block_k]
    for name in ("down_sum", "gate_up_gemv"):  # matrix-vector tiles: any power of two of output rows
        g = getattr(cfg, name)
        if g is not None:
            tiles.append(g.block_k)
            if g.block_n < 1 or g.block_n & (g.block_n - 1):
                raise ValueError(f"{name} block_n must be a power of two, got {g.block_n} in {d}")
    for v in tiles:
        if v < 16 or v & (v - 1):
            raise ValueError(f"tile sizes must be powers of two >= 16, got {v} in {d}")
    return cfg


@dataclass(frozen=True)
class ConfigTable:
    """Best config per token count, for one shape; callable as fused_experts' `configs`."""
    top_k: int
    entries: tuple[tuple[int, MoeKernelConfig], ...]  # ascending T
    source: str = ""

    def __call__(self, T: int, K: int, E: int = 0, H: int = 0, I: int = 0) -> MoeKernelConfig:
        t = max(1e-9, T * K / self.top_k)
        key = math.log2(t)
        best = min(self.entries, key=lambda e: (abs(math.log2(e[0]) - key), e[0]))
        return best[1]


def load_config_table(path: str) -> ConfigTable:
    """Read a tuned config file (the format above); ValueError naming the file if it is malformed."""
    try:
        with open(path) as f:
            raw = json.load(f)
        entries = sorted((int(t), config_from_dict(c)) for t, c in raw["configs"].items())
        if not entries or any(t < 1 for t, _ in entries):
            raise ValueError("'configs' needs token counts >= 1")
        return ConfigTable(int(raw.get("K", 1)), tuple(entries), path)
    except (OSError, KeyError, TypeError, ValueError, json.JSONDecodeError) as e:
        raise ValueError(f"MoE kernel config file {path}: {type(e).__name__}: {e}") from e


_FOUND: dict[tuple, Optional[ConfigTable]] = {}


def find_config_table(E: int, H: int, I: int, dtype: torch.dtype, device_name: str) -> Optional[ConfigTable]:
    """The tuned table for this shape, dtype and GPU from $MESHSERVE_MOE_CONFIG_DIR or CONFIG_DIR
    (first found; read once per process), or None."""
    dirs = tuple(d for d in (os.environ.get(CONFIG_DIR_ENV), CONFIG_DIR) if d)
    key = (E, H, I, dtype, gpu_tag(device_name), dirs)
    if key not in _FOUND:
        name = config_file_name(E, H, I, dtype, device_name)
        table = None
        for d in dirs:
            path = os.path.join(d, name)
            if os.path.exists(path):
                table = load_config_table(path)
                logger.info("MoE kernel configs from %s", path)
                break
        _FOUND[key] = table
    return _FOUND[key]
