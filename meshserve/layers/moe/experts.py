"""The expert FFNs of a MoE layer: given each token's top-k (local) experts and weights, the weighted
sum of those experts' SwiGLU outputs. One class per `moe_config.backend`:

- VANILLA: a per-expert torch loop in fp32. The reference the others are tested against; runs
  anywhere (eager only: it gathers each expert's tokens with `nonzero`, a host sync).
- TRITON: a fused grouped GEMM (`kernels/moe.py`): assignments sorted by expert and padded to the
  kernel's row block, one kernel for gate_up, silu_and_mul, one for down with the routing weight
  multiplied in, a sum over k. No host sync: a decode step can be captured in a CUDA graph. CUDA,
  or CPU under Triton's interpreter (TRITON_INTERPRET=1, for tests).
- CUTLASS: `torch._grouped_mm` (CUTLASS grouped GEMMs on Hopper and newer) on the assignments sorted
  by expert, with int32 offsets from a cumsum (no host sync). torch 2.13 also runs `_grouped_mm` on
  CPU (fp32, bf16, fp16; every stride a multiple of 16 bytes), so it is tested there too.

Layouts (HF Linear, out x in): hidden [T, H]; w13 [E_local, 2*I, H] (rows :I gate_proj, I: up_proj);
w2 [E_local, H, I]; topk_weights [T, K] float32; topk_ids [T, K] int32/int64 local expert indices,
-1 for an assignment that belongs to another rank (skipped). `apply` returns [T, H] in hidden's
dtype; a row with no local assignment is 0. See docs/moe.md.

FP8 experts (`fp8=(w13_scale, w2_scale, (bn, bk))`, w13 / w2 float8_e4m3fn with one fp32 scale per
block, kernels/fp8.py's format per expert): TRITON applies the scales in its kernels, VANILLA
dequantises one expert at a time; CUTLASS refuses them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from meshserve import kernels

BACKENDS = ("VANILLA", "TRITON", "CUTLASS")
_ACCEPTED = ("auto",) + BACKENDS


class Experts:
    """Base class: `apply(hidden, w13, w2, topk_weights, topk_ids) -> [T, H]`."""
    name: str = ""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device = torch.device(device)
        self.dtype = dtype

    def apply(self, hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
              topk_weights: torch.Tensor, topk_ids: torch.Tensor, fp8=None) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(device={self.device}, dtype={self.dtype})"


def check_shapes(hidden, w13, w2, topk_weights, topk_ids) -> tuple[int, int, int, int, int]:
    """(T, H, I, E_local, K) of a call, or a ValueError naming the mismatching shapes (shapes only:
    nothing here reads device data)."""
    if hidden.dim() != 2 or w13.dim() != 3 or w2.dim() != 3 or topk_ids.dim() != 2:
        raise ValueError(f"MoE experts expect hidden [T, H], w13 [E, 2I, H], w2 [E, H, I], topk [T, K]; got "
                         f"{tuple(hidden.shape)}, {tuple(w13.shape)}, {tuple(w2.shape)}, {tuple(topk_ids.shape)}")
    T, H = hidden.shape
    E, two_i, h13 = w13.shape
    I = two_i // 2
    if two_i % 2 or h13 != H or tuple(w2.shape) != (E, H, I) or tuple(topk_weights.shape) != tuple(topk_ids.shape) \
            or topk_ids.shape[0] != T:
        raise ValueError(f"MoE experts: inconsistent shapes hidden {tuple(hidden.shape)}, w13 {tuple(w13.shape)}, "
                         f"w2 {tuple(w2.shape)}, topk_weights {tuple(topk_weights.shape)}, "
                         f"topk_ids {tuple(topk_ids.shape)} (want w13 [E, 2I, H], w2 [E, H, I], topk [T, K])")
    return T, H, I, E, topk_ids.shape[1]


class VanillaExperts(Experts):
    """Per-expert torch loop, fp32 throughout (weights upcast one expert at a time)."""
    name = "VANILLA"

    def apply(self, hidden, w13, w2, topk_weights, topk_ids, fp8=None):
        T, H, I, E, _ = check_shapes(hidden, w13, w2, topk_weights, topk_ids)
        out = torch.zeros(T, H, dtype=torch.float32, device=hidden.device)
        ids = topk_ids.long()
        x = hidden.float()
        if fp8 is not None:
            from meshserve.kernels.fp8 import dequantize
            s13, s2, block = fp8
        for e in range(E):
            tok, kk = torch.nonzero(ids == e, as_tuple=True)
            if tok.numel() == 0:
                continue
            if fp8 is None:
                a, b = w13[e].float(), w2[e].float()
            else:
                a, b = dequantize(w13[e], s13[e], block), dequantize(w2[e], s2[e], block)
            gu = x[tok] @ a.t()
            h = F.silu(gu[:, :I]) * gu[:, I:]
            y = (h @ b.t()) * topk_weights[tok, kk].float()[:, None]
            out.index_add_(0, tok, y)
        return out.to(hidden.dtype)


def _triton_refusal(device: torch.device) -> str | None:
    """Why TRITON cannot run on `device`, or None."""
    interpret = device.type == "cpu" and kernels.interpreting()
    if device.type != "cuda" and not interpret:
        return (f"it needs a CUDA device (this one is {device.type!r}) or a CPU with TRITON_INTERPRET=1 "
                f"(Triton's interpreter, for tests)")
    if not kernels.TRITON_INSTALLED:
        return "Triton is not installed"
    if device.type == "cuda" and not kernels.TRITON_AVAILABLE:
        return "Triton is switched off (kernel_config.disable_triton)"
    return None


def _cutlass_refusal(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why CUTLASS (torch._grouped_mm) cannot run on `device` / `dtype`, or None."""
    if not hasattr(torch, "_grouped_mm"):
        return f"this torch ({torch.__version__}) has no torch._grouped_mm"
    if device.type == "cpu":
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return f"torch._grouped_mm on CPU takes float32, bfloat16 or float16, not {dtype}"
        return None
    if device.type != "cuda":
        return f"it needs a CUDA device (Hopper or newer) or a CPU, not {device.type!r}"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 9:
        return (f"torch._grouped_mm's CUTLASS kernels need a Hopper or newer GPU (compute capability >= 9.0); "
                f"this one is {major}.{minor}")
    if dtype != torch.bfloat16:
        return f"torch._grouped_mm on CUDA takes bfloat16 only, not {dtype}"
    return None


def auto_backend(device: torch.device, dtype: torch.dtype) -> str:
    """The backend `moe_config.backend='auto'` picks (the one place that choice is made).

    CUDA, compute capability >= 9.0, bf16/fp16: TRITON for now (a benchmark against CUTLASS on the
    H200 may switch bf16 to it). Other CUDA GPUs / dtypes: TRITON as well where Triton runs (VANILLA
    syncs the host per expert and cannot be captured in a CUDA graph). CPU, or no Triton: VANILLA."""
    device = torch.device(device)
    if device.type != "cuda" or _triton_refusal(device) is not None:
        return "VANILLA"
    # Hopper-or-newer in bf16 is where CUTLASS may win (torch._grouped_mm's fast path); until the
    # H200 benchmark says so, TRITON everywhere on CUDA.
    return "TRITON"


def create_experts(backend: str, device: torch.device, dtype: torch.dtype) -> Experts:
    """The experts object for `moe_config.backend`: "auto", "VANILLA", "TRITON" or "CUTLASS"
    (case-insensitive). An explicit backend that cannot run on this device/dtype is a ValueError
    saying why."""
    device = torch.device(device)
    name = str(backend).upper() if isinstance(backend, str) else backend
    if name == "AUTO":
        name = auto_backend(device, dtype)
    if name not in BACKENDS:
        raise ValueError(f"moe_config.backend={backend!r} is not supported; accepted: {', '.join(_ACCEPTED)}")
    if name == "VANILLA":
        return VanillaExperts(device, dtype)
    why = _triton_refusal(device) if name == "TRITON" else _cutlass_refusal(device, dtype)
    if why is not None:
        raise ValueError(f"moe_config.backend={backend!r} cannot run here: {why}; accepted: "
                         f"{', '.join(_ACCEPTED)}")
    if name == "TRITON":
        return TritonExperts(device, dtype)
    return CutlassExperts(device, dtype)


class TritonExperts(Experts):
    """The fused grouped GEMM of kernels/moe.py."""
    name = "TRITON"

    def __init__(self, device, dtype, configs=None):
        super().__init__(device, dtype)
        self.configs = configs  # None: kernels/moe.py's table

    def apply(self, hidden, w13, w2, topk_weights, topk_ids, fp8=None):
        check_shapes(hidden, w13, w2, topk_weights, topk_ids)
        from meshserve.kernels.moe import fused_experts
        return fused_experts(hidden, w13, w2, topk_weights, topk_ids, configs=self.configs, fp8=fp8)


class CutlassExperts(Experts):
    """Grouped GEMMs through torch._grouped_mm: the assignments sorted by expert (the -1 ones last,
    outside every group), int32 group ends from a scatter_add + cumsum, gate_up, silu_and_mul, down,
    then weight and index_add back per token in fp32. No host sync on CUDA (torch's bf16 CUTLASS path
    on sm90/sm100 reads the group ends on the device), so it can be captured in a CUDA graph.

    What torch 2.13 does with `_grouped_mm(a [M, K], b [G, K, N], offs=int32 [G])`, probed on CPU:
    fp32, bf16 and fp16 run (torch's fallback: one mm per group, reading offs on the host), every
    stride must be a multiple of 16 bytes ("strides should be multiple of 16 bytes"), offs must be
    int32, out_dtype must equal a's dtype (no fp32 output for bf16 inputs), empty groups are fine,
    and rows past offs[-1] are left uninitialised (garbage, not zero), so they are masked here. On
    CUDA, per torch's source (not checked here): bf16 on compute capability 9.x/10.x takes the
    CUTLASS kernel with no device-to-host sync; any other dtype or GPU takes the same per-group
    fallback, which syncs (offs.cpu()) and cannot be captured, so create_experts refuses those."""
    name = "CUTLASS"

    def apply(self, hidden, w13, w2, topk_weights, topk_ids, fp8=None):
        T, H, I, E, K = check_shapes(hidden, w13, w2, topk_weights, topk_ids)
        if fp8 is not None:
            raise ValueError("moe_config.backend='CUTLASS' has no FP8 experts (torch._grouped_mm takes bf16 "
                             "weights); accepted with FP8 experts: auto, TRITON, VANILLA")
        align = 16 // hidden.element_size()
        if H % align or I % align:
            raise ValueError(f"moe_config.backend='CUTLASS' (torch._grouped_mm) needs hidden size {H} and "
                             f"intermediate size {I} to be multiples of {align} for {hidden.dtype} "
                             f"(16-byte strides); use TRITON or VANILLA")
        if T == 0 or K == 0:
            return hidden.new_zeros(T, H)
        flat = topk_ids.reshape(-1).long()
        key = torch.where(flat < 0, E, flat)  # another rank's assignments sort last, outside the groups
        sorted_key, order = torch.sort(key, stable=True)
        counts = torch.zeros(E + 1, dtype=torch.int32, device=hidden.device)
        counts.scatter_add_(0, key, torch.ones_like(key, dtype=torch.int32))
        offs = torch.cumsum(counts[:E], 0, dtype=torch.int32)
        tok = order // K
        x = hidden.index_select(0, tok)
        if w13.dtype != hidden.dtype or w2.dtype != hidden.dtype:
            w13, w2 = w13.to(hidden.dtype), w2.to(hidden.dtype)
        gate_up = torch._grouped_mm(x, w13.transpose(-2, -1), offs=offs)  # [T*K, 2I]
        h = F.silu(gate_up[:, :I]) * gate_up[:, I:]
        y = torch._grouped_mm(h, w2.transpose(-2, -1), offs=offs)  # [T*K, H]
        w = topk_weights.reshape(-1).float().index_select(0, order)
        # where, not a multiply: rows past the last group are uninitialised and may hold NaN/inf.
        y = torch.where((sorted_key < E)[:, None], y.float() * w[:, None], 0.0)
        out = torch.zeros(T, H, dtype=torch.float32, device=hidden.device)
        out.index_add_(0, tok, y)
        return out.to(hidden.dtype)
