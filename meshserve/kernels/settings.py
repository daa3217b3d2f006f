"""Kernel settings: the Triton kernels' switches and tile shapes, resolved for one GPU.

The user's `kernel_config` (config.py KernelConfig, part of LlmArgs, so every rank receives it)
names the fields to set; a field left None takes this GPU's default from DEVICE_DEFAULTS. Each
rank's ModelRunner resolves them once for its device and hands the result to its attention
backend and to `kernels.configure` (the fused ops' switch and the skinny-GEMM row limit).
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Union

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class KernelSettings:
    """Concrete values; the defaults are the H200's (benchmarks/attention_kernel.py, benchmarks/gemv.py).

    Attention tiles: decode tiles (the GQA group's rows) read `attn_decode_block_n`-token KV tiles
    with `attn_decode_warps` warps, and a KV split covers at least `attn_decode_split_tiles` tiles
    (0: chosen by the step's batch, below). Prefill tiles hold `attn_prefill_rows`
    (query token, head) rows in steps of more than `attn_prefill_large_tokens` tokens (an 8k prompt:
    256-row tiles, 2 stages, 456 TFLOP/s against 366 with 128 rows) and `attn_prefill_rows_small`
    rows in smaller steps: there, 256-row tiles leave SMs idle (a 467-token prompt is 64 programs on
    132 SMs) and each decode row of a mixed step pays for a whole tile. Prefill query tiles launch
    last to first (`attn_heavy_first`): the tiles that see the most keys start first, so short
    ones fill the end of the grid. Tiles too large for a GPU's shared memory shrink at launch.
    """
    disable_triton: bool = False  # True: norm, rotary, activation, argmax and linears take torch ops
    gemv_max_m: int = 1  # rows of input up to which CUDA linears take the skinny GEMM; 0: never
    # 0: by the step's number of sequences (paged_attention.decode_tiles)
    attn_decode_split_tiles: int = 0
    attn_decode_block_n: int = 0
    attn_decode_warps: int = 0
    attn_prefill_rows: int = 256
    attn_prefill_stages: int = 2
    attn_prefill_rows_small: int = 128
    attn_prefill_stages_small: int = 3
    attn_prefill_large_tokens: int = 2048
    attn_prefill_block_n: int = 128
    attn_prefill_warps: int = 8
    attn_heavy_first: bool = True
    pdl: bool = False  # programmatic dependent launch (kernels/pdl.py): off until measured on the H200
    pdl_max_tokens: int = 64  # PDL only in steps of up to this many tokens (kernels.step_tokens)
    fuse_rope_attention: bool = False  # decode steps: the rotary + KV write inside the attention kernel; off until measured
    # one-row steps: RMSNorm inside the skinny GEMM after it (kernels/gemv.py); "attention" / "mlp": only the
    # norm before q/k/v, or before the MLP's first linear (an MoE router gate with its top-k); off until measured
    fuse_norm_linear: Union[bool, str] = False
    # decode steps of up to paged_attention.SMALL_DECODE sequences: attention prefetches the layer's o_proj
    # weight into L2 while it runs (kernels/prefetch.py); off until measured
    decode_l2_prefetch: bool = False
    # one-row steps of MoE models: the router gate's skinny GEMM prefetches the next layer's q/k/v weight
    # into L2, the experts' decode kernels load theirs evict-first (kernels/prefetch.py); off until measured
    l2_prefetch_next_layer: bool = False

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


H200 = KernelSettings()
# Matched as a substring of the CUDA device name, first match wins. A GPU not listed takes the
# H200's values (its reference); add a row once benchmarks/attention_kernel.py has run on it.
DEVICE_DEFAULTS: dict[str, KernelSettings] = {"H200": H200}
FIELDS = tuple(f.name for f in dataclasses.fields(KernelSettings))


def device_defaults(device_name: str) -> KernelSettings:
    for key, settings in DEVICE_DEFAULTS.items():
        if key in device_name:
            return settings
    return H200


def resolve(overrides: Optional[Mapping[str, Any]], device_name: str) -> KernelSettings:
    """This GPU's defaults with the fields of `overrides` that are not None (unknown names: an error)."""
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = sorted(set(given) - set(FIELDS))
    if unknown:
        raise ValueError(f"kernel_config: unknown field(s) {', '.join(unknown)}; accepted: {', '.join(FIELDS)}")
    settings = dataclasses.replace(device_defaults(device_name), **given)
    if "pdl_max_tokens" in given and not settings.pdl:
        raise ValueError(f"kernel_config.pdl_max_tokens={given['pdl_max_tokens']} applies only with "
                         f"kernel_config.pdl=true (PDL is off on {device_name}); accepted: set pdl too, or leave "
                         f"pdl_max_tokens unset")
    return settings


def device_name(device) -> str:
    """The CUDA device's name (e.g. 'NVIDIA H200'), else the device type ('cpu': Triton's interpreter)."""
    import torch

    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def for_device(overrides: Optional[Mapping[str, Any]], device) -> KernelSettings:
    name = device_name(device)
    settings = resolve(overrides, name)
    if settings.pdl:
        check_pdl(device)
    logger.debug("kernel settings for %s: %s", name, settings)
    return settings


def check_pdl(device) -> None:
    """kernel_config.pdl needs Triton kernels on a CUDA GPU of compute capability 9.0+ (Hopper)."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"kernel_config.pdl=true needs a CUDA GPU of compute capability 9.0 or newer; this rank "
                         f"runs on {device.type}")
    major, minor = torch.cuda.get_device_capability(device)
    if major < 9:
        raise ValueError(f"kernel_config.pdl=true needs a GPU of compute capability 9.0 or newer; "
                         f"{device_name(device)} is {major}.{minor}")


def describe(settings: KernelSettings, device) -> dict[str, Any]:
    """What a result file or /version records: the values and the device they were resolved for."""
    return {"device": device_name(device), **settings.as_dict()}
