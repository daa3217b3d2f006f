"""Build a model shard and fill it: safetensors (one file or sharded with an index), or random
("dummy") weights from config.json alone. GGUF files are converted to a folder first (gguf.py).
"""
from __future__ import annotations

import glob
import json
import logging
import os
from typing import Iterator

import torch
from safetensors import safe_open
from tqdm import tqdm

from meshserve.models.config import ModelConfig
from meshserve.models.registry import model_class

logger = logging.getLogger(__name__)

LOAD_FORMATS = ("auto", "safetensors", "dummy")


def safetensors_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(path, n) for n in names]
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"No *.safetensors weights in {path!r} (use load_format='dummy' for random weights)")
    return files


def iter_safetensors(path: str, show_progress: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    files = safetensors_files(path)
    for file in tqdm(files, desc="Loading safetensors shards", disable=not show_progress or len(files) < 1,
                     unit="file", leave=False):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def build_model(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, parallel=None,
                layer_range=None, is_first: bool = True, is_last: bool = True,
                moe_backend: str = "auto") -> torch.nn.Module:
    """This rank's shard of the model; `parallel` is its ParallelState (None: one rank);
    `moe_backend` is moe_config.backend (models with experts)."""
    cls = model_class(cfg.architecture)
    with torch.device(device):
        return cls(cfg, parallel, dtype, layer_range, is_first, is_last, moe_backend=moe_backend).eval()


def load_weights(model: torch.nn.Module, path: str, load_format: str = "auto", seed: int = 0,
                 show_progress: bool = True) -> None:
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format={load_format!r} is not supported; accepted: {', '.join(LOAD_FORMATS)}")
    if load_format == "dummy":
        _init_dummy(model, seed)
        return
    loaded = model.load_weights(iter_safetensors(path, show_progress))
    expected = {n for n, _ in model.named_parameters()}
    missing = sorted(expected - loaded)
    if missing:
        raise ValueError(f"Checkpoint {path!r} lacks {len(missing)} weights this model needs, e.g. {missing[:5]}")


@torch.no_grad()
def _init_dummy(model: torch.nn.Module, seed: int) -> None:
    """Random weights of the right shapes: speed does not depend on their values."""
    gens: dict = {}
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
            continue
        if p.device not in gens:
            gens[p.device] = torch.Generator(device=p.device).manual_seed(seed)
        p.normal_(0.0, 0.02, generator=gens[p.device])
