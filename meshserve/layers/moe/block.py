"""The sparse MLP block model files build around `FusedMoE`: router gate -> experts -> shared experts.

`MoEBlock` holds what Qwen2/3-MoE, Mixtral and DeepSeek's blocks share: HELIX context parallelism
(1/cp of the tokens through the experts, every token's output gathered back), and
`forward_normed`, the one-row path where the decoder layer's norm, the router gate and the router's
top-k run as one kernel (layers/norm.py `RMSNorm.then_linear`). Subclasses set `gate` and `experts`
and say how the gate reads its input (`router_logits`) and how shared experts add in (`add_shared`).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class MoEBlock(nn.Module):
    gate: nn.Module
    experts: nn.Module  # FusedMoE

    def __init__(self, parallel):
        super().__init__()
        split = getattr(parallel, "cp_split", None)  # HELIX: 1/cp of the tokens through the experts
        self.cp = split if split is not None and split.helix else None

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(x)

    def add_shared(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The routed experts' output `out` plus any shared experts' output on the block's input x."""
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cp is not None:  # HELIX: this rank's share of the tokens, every token's output back
            return self.cp.gather(self._forward(self.cp.split(x)))
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_shared(x, self.experts(x, self.router_logits(x)))

    def forward_normed(self, x: torch.Tensor, residual: Optional[torch.Tensor], norm):
        """(forward(norm(x + residual)), x + residual) with the norm, the router gate and its top-k in
        one kernel, or None where that does not apply (the caller then runs them apart): HELIX,
        a gate the kernel does not take (DeepSeek's fp32 gate on bf16 rows), a router it lacks."""
        if self.cp is not None or type(self).router_logits is not MoEBlock.router_logits \
                or not norm.fuses_with(x, self.gate, "mlp"):
            return None
        route = self.experts.route_args(x)
        if route is None:
            return None
        (weights, ids), residual, h = norm.then_linear(x, residual, self.gate, want_h=True, route=route)
        return self.add_shared(h, self.experts.forward_routed(h, weights, ids)), residual
