"""RMSNorm, optionally fused with the residual add (returns the new residual too), as HF Llama
computes it: in float32, cast back before the weight multiply.

`RMSNorm.then_linear` is the norm followed by the linear that reads its output (a decoder layer's
q/k/v projection, its MLP's first projection or router gate). For one decode row on the GPU that is
one kernel (kernels/gemv.py norm_gemv: residual add, norm and skinny GEMM, and for a router the
top-k too); anywhere else the two ops as before.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from meshserve import kernels

# None: fuse on CUDA where eligible; True: on CPU too under Triton's interpreter (tests); False: never.
FUSE_LINEAR: Optional[bool] = None


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6, params_dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=params_dtype), requires_grad=False)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None):
        if kernels.use_triton(x):
            from meshserve.kernels.fused import rms_norm
            return rms_norm(x, self.weight, self.eps, residual)
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x

    def fuses_with(self, x: torch.Tensor, linear: nn.Module, part: str) -> bool:
        """Whether `then_linear(x, _, linear)` runs as one kernel: one row, a linear whose output
        needs no communication (column parallel without gather, replicated) in x's dtype, and
        kernel_config.fuse_norm_linear on for this `part` ("attention": q/k/v; "mlp": gate_up or router)."""
        fuse = kernels.FUSE_NORM_LINEAR
        if fuse is not True and fuse != part or FUSE_LINEAR is False or x.dim() != 2 or x.shape[0] != 1 \
                or not kernels.TRITON_INSTALLED or kernels.GEMV_MAX_M < 1:
            return False  # cheapest first: every layer of every eager step asks
        if x.is_cuda:
            if not kernels.TRITON_AVAILABLE or x.dtype not in (torch.bfloat16, torch.float16):
                return False
        elif not (FUSE_LINEAR and x.device.type == "cpu" and kernels.interpreting()):
            return False
        from meshserve.layers.linear import ColumnParallelLinear, ReplicatedLinear
        if not isinstance(linear, (ColumnParallelLinear, ReplicatedLinear)) or linear.fp8_block is not None \
                or getattr(linear, "gather_output", False):
            return False
        from meshserve.kernels.gemv import norm_gemv_supported
        return self.weight.dtype == x.dtype and norm_gemv_supported(x, linear.weight)

    def then_linear(self, x: torch.Tensor, residual: Optional[torch.Tensor], linear: nn.Module, *,
                    want_h: bool = False, route=None):
        """(linear(h), s, h or None) with s = x + residual (x when residual is None) and h = norm(s);
        h only with `want_h`. Call only where `fuses_with(x, linear)`; `route` as kernels/gemv.py
        norm_gemv (then the first item is the router's (weights, ids))."""
        from meshserve.kernels.gemv import norm_gemv
        return norm_gemv(x, residual, self.weight, self.eps, linear.weight, linear.bias, want_h=want_h, route=route,
                         prefetch=linear.l2_prefetch(x))
