"""Build a model shard and fill it: safetensors (one file or sharded with an index), or random
("dummy") weights from config.json alone. GGUF files are converted to a folder first (gguf.py).

FP8 (`plan_fp8`, before loading): an FP8 block-quantised checkpoint's linear layers become FP8
layers (layers/linear.py `to_fp8`) where every checkpoint tensor feeding the layer carries a
`weight_scale_inv`; FP8 tensors of anything else (experts, DeepSeek's kv_b_proj, which attention
reads as a matrix) are dequantised to the model's dtype as they are read (`fp8_weights`). With
quantization="fp8" on a full-precision checkpoint every eligible linear becomes FP8 and quantises
its checkpoint tensors as they arrive (kernels/fp8.py `online_block` picks the block).
"""
from __future__ import annotations

import glob
import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional

import torch
from safetensors import safe_open

from meshserve.models.config import ModelConfig
from meshserve.models.registry import model_class
from meshserve.progress import progress_bar

logger = logging.getLogger(__name__)

LOAD_FORMATS = ("auto", "safetensors", "dummy")


def _index(path: str) -> str:
    """The sharded checkpoint's index file (model.safetensors.index.json: tensor name -> file)."""
    return os.path.join(path, "model.safetensors.index.json")


def safetensors_files(path: str) -> list[str]:
    index = _index(path)
    if os.path.exists(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(path, n) for n in names]
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"No *.safetensors weights in {path!r} (use load_format='dummy' for random weights)")
    return files


def iter_safetensors(path: str, show_progress: bool = True, wanted=None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every checkpoint tensor; `wanted(name)` False: not read at all. A sharded
    checkpoint's files holding no wanted tensor (the index's weight_map says which) are not opened:
    a pipeline stage reads only the shards of its layers."""
    if wanted is not None and os.path.exists(_index(path)):
        files = sorted({file for name, file in tensor_files(path).items() if wanted(name)})
    else:
        files = safetensors_files(path)
    for file in progress_bar(files, desc="Loading safetensors shards", disable=not show_progress or len(files) < 1,
                             unit="file", leave=False):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                if wanted is None or wanted(name):
                    yield name, f.get_tensor(name)


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_EXPERT = re.compile(r"\.experts\.(\d+)\.")


def shard_filter(model: torch.nn.Module):
    """Which checkpoint tensors this shard reads: not the decoder layers of other pipeline stages,
    not the per-expert tensors of experts other expert-parallel ranks hold (the seed's DeepSeek-V3
    layout reads 1/4 of the experts per rank, and each pipeline stage its own layers). Layers past
    num_hidden_layers (DeepSeek's multi-token prediction) are read, for the model to count and skip."""
    inner = getattr(model, "model", None)
    layer_range = getattr(inner, "layer_range", None)
    cfg = getattr(model, "cfg", None)
    if layer_range is None or cfg is None:
        return None
    blocks = model.moe_blocks() if hasattr(model, "moe_blocks") else {}
    placements = {i: b.experts.placement for i, b in blocks.items()}

    def wanted(name: str) -> bool:
        m = _LAYER.search(name)
        if m is None:
            return True
        layer = int(m.group(1))
        if layer >= cfg.num_hidden_layers:
            return True
        if layer not in layer_range:
            return False
        e = _EXPERT.search(name)
        placement = placements.get(layer)
        if e is None or placement is None:
            return True
        expert = int(e.group(1))  # an expert the model does not have: read, for the model's error
        return expert >= placement.num_experts or placement.owns(expert)
    return wanted


@dataclass
class Fp8Plan:
    """Which layers hold FP8 weights and which checkpoint tensors stay FP8 on the way in."""
    block: Optional[tuple] = None  # the checkpoint's weight_block_size (None: quantised online)
    keep: set = field(default_factory=set)  # checkpoint weight names loaded as FP8 (with their scales)
    layers: list = field(default_factory=list)  # our module names of the FP8 layers
    online: bool = False
    expert_layers: set = field(default_factory=set)  # decoder layers whose experts are FP8
    scale_name: str = "weight_scale_inv"  # the checkpoint's scale tensors: <weight name>_scale_inv or _scale
    files: dict = field(default_factory=dict)  # tensor_files(path), read once by plan_fp8
    # calibrated KV-cache scales of the checkpoint, per decoder layer: {"k": float, "v": float}
    kv_scales: dict = field(default_factory=dict)

    def apply_kv_scales(self, layer_ids, attn_layers, fp8_cache: bool) -> None:
        """Give each attention layer its checkpoint k / v scale when the KV cache is FP8 (else they
        are not needed: a full-precision cache stores the values as they are)."""
        if not self.kv_scales:
            return
        if not fp8_cache:
            logger.info("FP8 checkpoint: its KV-cache scales (%d layers) are not used: the KV cache is not FP8 "
                        "(kv_cache_config.dtype fp8 uses them)", len(self.kv_scales))
            return
        for layer_idx, attn in zip(layer_ids, attn_layers):
            scales = self.kv_scales.get(layer_idx, {})
            attn.k_scale = scales.get("k", 1.0)
            attn.v_scale = scales.get("v", 1.0)

    def keeps(self, name: str) -> bool:
        """Whether checkpoint weight `name` loads as FP8 (with its scale)."""
        if name in self.keep:
            return True
        m = _EXPERT_WEIGHT.search(name)
        return m is not None and int(m.group(1)) in self.expert_layers


_EXPERT_WEIGHT = re.compile(r"(?:^|\.)layers\.(\d+)\..*experts\.\d+\.(?:gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$")


def _fp8_sources(model: torch.nn.Module, module_name: str) -> list[str]:
    """The checkpoint weight names that fill linear `module_name` (q/k/v for qkv_proj...)."""
    dotted = f".{module_name}."
    sources = [f"{module_name}.weight".replace(ours, ckpt) for ckpt, ours, _ in getattr(model, "stacked_params", [])
               if ours in dotted]
    return sources or [f"{module_name}.weight"]


def tensor_files(path: str) -> dict[str, str]:
    """Checkpoint tensor name -> the safetensors file holding it: the index's weight_map when the
    checkpoint is sharded (no file opened), else the files' headers."""
    index = _index(path)
    if os.path.exists(index):
        with open(index) as f:
            return {name: os.path.join(path, file) for name, file in json.load(f)["weight_map"].items()}
    where = {}
    for file in safetensors_files(path):
        with safe_open(file, framework="pt") as f:
            where.update(dict.fromkeys(f.keys(), file))
    return where


def plan_fp8(model: torch.nn.Module, cfg: ModelConfig, path: str, quantization: Optional[str],
             load_format: str = "auto") -> Optional[Fp8Plan]:
    """Turn this shard's linears that will hold FP8 weights into FP8 layers (before loading); None
    when the model runs without FP8. quantization: "fp8" quantises a full-precision checkpoint's
    linears at load (an FP8 checkpoint is FP8 either way)."""
    from meshserve.kernels.fp8 import online_block
    from meshserve.layers.linear import LinearBase
    from meshserve.layers.moe.layer import FusedMoE
    if cfg.fp8_block is None and quantization != "fp8":
        return None
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, LinearBase) and m.fp8_ok]
    experts = [(int(_LAYER.search(name).group(1)), m) for name, m in model.named_modules() if isinstance(m, FusedMoE)]
    if cfg.fp8_block is not None and load_format != "dummy":
        suffix = "." + cfg.fp8_scale_name
        files = tensor_files(path)
        scaled = {n[:-len(suffix)] + ".weight" for n in files if n.endswith(suffix)}
        plan = Fp8Plan(block=cfg.fp8_block, scale_name=cfg.fp8_scale_name, files=files)
        for name, layer in linears:
            sources = _fp8_sources(model, name)
            if all(s in scaled for s in sources):
                layer.to_fp8(cfg.fp8_block)
                plan.keep.update(sources)
                plan.layers.append(name)
        scaled_experts = {int(m.group(1)) for m in map(_EXPERT_WEIGHT.search, scaled) if m}
        for layer_idx, moe in experts:  # per-expert FP8 tensors (the Hub's layout): experts in FP8
            if layer_idx in scaled_experts:
                moe.to_fp8(cfg.fp8_block)
                plan.expert_layers.add(layer_idx)
        return plan
    plan = Fp8Plan(block=cfg.fp8_block, online=cfg.fp8_block is None)
    for layer_idx, moe in experts:
        i = moe.i_local
        block = cfg.fp8_block or online_block([i], [i] if moe.dispatcher_tp_size > 1 else [])
        if block is None:
            raise ValueError(f"quantization='fp8': layer {layer_idx}'s experts have an intermediate size of {i} per "
                             f"rank, which no block of 16 to 128 (a power of two) divides")
        moe.to_fp8(block)
        plan.expert_layers.add(layer_idx)
    for name, layer in linears:
        block = cfg.fp8_block or online_block(*layer.fp8_aligned_sizes())
        if block is None:
            rows, cols = layer.fp8_aligned_sizes()
            raise ValueError(f"quantization='fp8': layer {name} has fused parts or tensor parallel shards of "
                             f"{rows or cols} rows/columns, which no block of 16 to 128 (a power of two) divides")
        layer.to_fp8(block)
        plan.layers.append(name)
    return plan


class _Headers:
    """Tensors read on demand, and shapes from the safetensors headers (an FP8 tensor dequantised on
    the way in needs its scale; a per-tensor scale becomes one per row of its weight)."""

    def __init__(self, where: dict[str, str]):
        self.where = where  # tensor_files(path)
        self.open: dict = {}

    def _file(self, name: str):
        file = self.where.get(name)
        if file is None:
            return None
        if file not in self.open:
            self.open[file] = safe_open(file, framework="pt")
        return self.open[file]

    def get(self, name: str) -> Optional[torch.Tensor]:
        f = self._file(name)
        return None if f is None else f.get_tensor(name)

    def shape(self, name: str) -> Optional[tuple]:
        f = self._file(name)
        return None if f is None else tuple(f.get_slice(name).get_shape())


# Tensors of activation quantisation that weight-only FP8 does not use
_UNUSED_SCALES = (".input_scale", ".q_scale", ".weight_zero_point", ".input_zero_point")
# KV-cache scales: compressed-tensors self_attn.k_scale / v_scale, ModelOpt k_proj.k_scale / v_proj.v_scale,
# AutoFP8's one self_attn.kv_scale for both
_KV_SCALES = (".k_scale", ".v_scale", ".kv_scale")


def _row_scales(scale: torch.Tensor, rows: int, name: str) -> torch.Tensor:
    """A per-tensor ([] or [1]) or per-channel ([rows] / [rows, 1]) scale as one per row: [rows, 1]."""
    if scale.numel() == 1:
        return scale.reshape(1, 1).float().expand(rows, 1).contiguous()
    if scale.numel() == rows:
        return scale.reshape(rows, 1).float()
    raise ValueError(f"checkpoint tensor {name!r} has {tuple(scale.shape)} scales for a weight of {rows} rows; "
                     f"accepted: one per tensor or one per row")


def fp8_weights(weights: Iterable[tuple[str, torch.Tensor]], path: str, plan: Fp8Plan,
                dtype: torch.dtype, device: Optional[torch.device] = None) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors as the model loads them: FP8 weights of FP8 layers and their scales
    (as `<weight>_scale_inv`; per-tensor and per-channel ones as one per row); other FP8 weights
    dequantised to `dtype` on `device` (the model's: on a GPU a dequantisation costs microseconds;
    their scales dropped); activation and KV-cache scales skipped (weight-only FP8)."""
    from meshserve.kernels.fp8 import FP8_DTYPE, PER_ROW, dequantize, scale_shape
    headers = _Headers(plan.files or tensor_files(path))
    suffix = "." + plan.scale_name
    per_row = plan.block == PER_ROW
    dequantised = unused = 0
    for name, tensor in weights:
        if name.endswith(_UNUSED_SCALES):
            unused += 1
            continue
        if name.endswith(_KV_SCALES):
            m = _LAYER.search(name)
            if m is None or tensor.numel() != 1:
                raise ValueError(f"checkpoint tensor {name!r} {tuple(tensor.shape)}: KV-cache scales are taken one "
                                 f"per layer (a scalar); accepted: per-tensor k_scale / v_scale / kv_scale")
            which = ("k", "v") if name.endswith(".kv_scale") else (name[-7],)
            for w in which:
                plan.kv_scales.setdefault(int(m.group(1)), {})[w] = float(tensor.reshape(()))
            continue
        if name.endswith(suffix):
            weight = name[:-len(suffix)] + ".weight"
            if plan.keeps(weight):
                if per_row:
                    tensor = _row_scales(tensor, headers.shape(weight)[0], name)
                yield weight + "_scale_inv", tensor
            continue
        if tensor.dtype == FP8_DTYPE and not plan.keeps(name):
            scale_name = name[:-len(".weight")] + suffix
            scale = headers.get(scale_name)
            if scale is not None and per_row and tensor.dim() == 2:
                scale = _row_scales(scale, tensor.shape[0], scale_name)
            if scale is None or tensor.dim() != 2 \
                    or tuple(scale.shape) != scale_shape(*tensor.shape, plan.block):
                raise ValueError(f"checkpoint tensor {name!r} is FP8 {tuple(tensor.shape)} without a scale "
                                 f"{scale_name!r} of blocks {list(plan.block)} "
                                 f"(found {None if scale is None else tuple(scale.shape)})")
            tensor = dequantize(tensor.to(device), scale.to(device), plan.block, dtype)
            dequantised += 1
        yield name, tensor
    if dequantised:
        logger.info("FP8 checkpoint: %d FP8 tensors outside FP8 layers (latent attention's kv_b_proj, routers, "
                    "fused-layout experts) dequantised to %s; %d linear layers and the experts of %d layers hold FP8 "
                    "weights", dequantised, str(dtype).split(".")[-1], len(plan.layers), len(plan.expert_layers))
    if unused:
        logger.info("FP8 checkpoint: %d activation scale tensors not used (activations run in %s)", unused,
                    str(dtype).split(".")[-1])


def _no_fp8_tensors(weights, path: str):
    """A checkpoint without quantization_config carries no FP8 tensors or block scales (read as plain
    numbers they would give a wrong model without a word)."""
    from meshserve.kernels.fp8 import FP8_DTYPE
    for name, tensor in weights:
        if tensor.dtype == FP8_DTYPE or name.endswith(("_scale_inv", ".weight_scale")):
            raise ValueError(f"checkpoint tensor {name!r} ({str(tensor.dtype).split('.')[-1]}) is part of FP8 "
                             f"quantisation, but {os.path.join(path, 'config.json')} has no quantization_config; "
                             f"accepted: an FP8 quantization_config there (docs/fp8.md), or unquantised tensors")
        yield name, tensor


def build_model(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, parallel=None,
                layer_range=None, is_first: bool = True, is_last: bool = True,
                moe_backend: str = "auto") -> torch.nn.Module:
    """This rank's shard of the model; `parallel` is its ParallelState (None: one rank);
    `moe_backend` is moe_config.backend (models with experts)."""
    cls = model_class(cfg.architecture)
    with torch.device(device):
        return cls(cfg, parallel, dtype, layer_range, is_first, is_last, moe_backend=moe_backend).eval()


def load_weights(model: torch.nn.Module, path: str, load_format: str = "auto", seed: int = 0,
                 show_progress: bool = True, fp8: Optional[Fp8Plan] = None) -> None:
    """Fill `model` from `path`; `fp8`: plan_fp8's plan (its layers already FP8)."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format={load_format!r} is not supported; accepted: {', '.join(LOAD_FORMATS)}")
    if load_format == "dummy":
        _init_dummy(model, seed)
        return
    weights = iter_safetensors(path, show_progress, shard_filter(model))
    if fp8 is not None and fp8.block is not None:
        device = next(model.parameters()).device
        weights = fp8_weights(weights, path, fp8, model.dtype, device)
    else:
        weights = _no_fp8_tensors(weights, path)
    loaded = model.load_weights(weights)
    expected = {n for n, _ in model.named_parameters()}
    if fp8 is not None and fp8.online:  # scales computed by their layer's loader from the weight
        loaded |= {n + "_scale_inv" for n in loaded if n.endswith(".weight")}
    missing = sorted(expected - loaded)
    if missing:
        raise ValueError(f"Checkpoint {path!r} lacks {len(missing)} weights this model needs, e.g. {missing[:5]}")


@torch.no_grad()
def _init_dummy(model: torch.nn.Module, seed: int) -> None:
    """Random weights of the right shapes: speed does not depend on their values. FP8 layers get
    random weights quantised on their block grid."""
    from meshserve.kernels.fp8 import FP8_DTYPE, quantize
    gens: dict = {}

    def gen(device):
        if device not in gens:
            gens[device] = torch.Generator(device=device).manual_seed(seed)
        return gens[device]
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
            continue
        if p.dtype == FP8_DTYPE or name.endswith("weight_scale_inv"):
            continue
        p.normal_(0.0, 0.02, generator=gen(p.device))
    for m in model.modules():
        block = getattr(m, "fp8_block", None)
        if block is not None and hasattr(m, "fp8_random_"):
            m.fp8_random_(gen(m.w13.device))
        elif block is not None:
            w = torch.empty(m.weight.shape, dtype=torch.float32, device=m.weight.device)
            q, scale = quantize(w.normal_(0.0, 0.02, generator=gen(w.device)), block)
            m.weight.data.copy_(q)
            m.weight_scale_inv.data.copy_(scale)
