"""FusedMoE: the mixture-of-experts layer model files use (router -> dispatch -> experts -> combine).

Parameters, sharded by Mapping's MoE rule (see dispatch.py): `w13` [E_local, 2 * I_local, H]
(gate rows then up rows, HF Linear layout), `w2` [E_local, H, I_local]; with sigmoid scoring also
`e_score_correction_bias` [E] (fp32). `load_weight` takes either checkpoint layout: the Hub's
per-expert tensors (`experts.3.gate_proj.weight`, Mixtral's `experts.3.w1.weight`...) and
transformers 5's fused ones (`experts.gate_up_proj` [E, 2I, H], `experts.down_proj` [E, H, I]).

FP8 (`to_fp8(block)`, before loading): w13 / w2 in float8_e4m3fn with `w13_scale_inv` [E_local,
2I_local / bn, H / bk] and `w2_scale_inv` [E_local, H / bn, I_local / bk]; per-expert FP8 checkpoint
tensors and their `weight_scale_inv` load as they are (scales sliced in whole blocks), full-precision
ones are quantised per checkpoint tensor as they arrive (quantization="fp8").
"""
from __future__ import annotations

import re
from typing import Optional

import torch
from torch import nn

from meshserve.distributed.comm import SOLO_STATE
from meshserve.layers.moe.dispatch import EpDispatcher, ExpertPlacement
from meshserve.layers.moe.experts import create_experts
from meshserve.layers.moe.load import ExpertLoad
from meshserve.layers.moe.router import RouterConfig, select_experts

# checkpoint piece names -> which part of w13 / w2 they fill
_PARTS = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}
_PER_EXPERT = re.compile(r"experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w2|w3)\.(weight|weight_scale_inv)$")


class FusedMoE(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, router: RouterConfig,
                 parallel=None, dtype: torch.dtype = torch.float32, backend: str = "auto", layer_idx: int = 0,
                 load: Optional[ExpertLoad] = None):
        super().__init__()
        parallel = parallel or SOLO_STATE
        router.check(num_experts)
        self.router = router
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.layer_idx = layer_idx
        ep, tp = parallel.moe_ep, parallel.moe_tp
        self.placement = ExpertPlacement(num_experts, ep.size, ep.rank_in_group)
        if intermediate_size % tp.size:
            raise ValueError(f"the experts' intermediate size {intermediate_size} does not split over "
                             f"moe_tensor_parallel_size={tp.size}: it must divide it")
        self.tp_rank, self.i_local = tp.rank_in_group, intermediate_size // tp.size
        self.dispatcher_tp_size = tp.size
        e_local = self.placement.num_local
        self.w13 = nn.Parameter(torch.empty(e_local, 2 * self.i_local, hidden_size, dtype=dtype), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(e_local, hidden_size, self.i_local, dtype=dtype), requires_grad=False)
        if router.scoring == "sigmoid":
            self.e_score_correction_bias = nn.Parameter(torch.zeros(num_experts, dtype=torch.float32),
                                                        requires_grad=False)
        else:
            self.e_score_correction_bias = None
        device = self.w13.device
        self.experts = create_experts(backend, device, dtype)
        self.dispatcher = EpDispatcher(self.placement, ep, tp)
        # attention DP (layers/dp_attention.py): the slice's tokens are gathered here and each rank's
        # rows handed back; None (or inactive) when every rank of the slice runs the same tokens
        self.dp = getattr(parallel, "dp_tokens", None)
        self.load = load
        self._loaded: set[tuple[int, str]] = set()
        self._scaled: set[tuple[int, str]] = set()
        self.fp8_block: Optional[tuple[int, int]] = None
        # the fused norm + gate + router kernel's last-program counter (kernels/gemv.py norm_gemv)
        self.register_buffer("route_counter", torch.zeros(1, dtype=torch.int32), persistent=False)
        self._route_meta: Optional[dict] = None

    def to_fp8(self, block: tuple[int, int]) -> None:
        """Hold the experts' weights in FP8 blocks of `block` (before loading)."""
        from meshserve.kernels.fp8 import FP8_DTYPE, WHOLE, scale_shape
        bn, bk = block
        i, h, tp = self.i_local, self.hidden_size, self.dispatcher_tp_size
        if i % bn or (tp > 1 and i % bk and bk < WHOLE):  # (per-row scales: bk is WHOLE)
            raise ValueError(f"FP8 experts in blocks of {list(block)}: this rank's intermediate size {i} "
                             f"(moe_intermediate_size {self.intermediate_size} over moe_tensor_parallel_size={tp}) "
                             f"must be whole blocks; accepted: a moe_tensor_parallel_size that leaves multiples "
                             f"of {bn}")
        if self.experts.name == "CUTLASS":
            raise ValueError("moe_config.backend='CUTLASS' has no FP8 experts (torch._grouped_mm takes bf16 weights); "
                             "accepted with FP8 experts: auto, TRITON, VANILLA")
        e, device = self.placement.num_local, self.w13.device
        self.w13 = nn.Parameter(torch.empty(e, 2 * i, h, dtype=FP8_DTYPE, device=device), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(e, h, i, dtype=FP8_DTYPE, device=device), requires_grad=False)
        self.w13_scale_inv = nn.Parameter(torch.ones(e, *scale_shape(2 * i, h, block), device=device),
                                          requires_grad=False)
        self.w2_scale_inv = nn.Parameter(torch.ones(e, *scale_shape(h, i, block), device=device), requires_grad=False)
        self.fp8_block = block

    @torch.no_grad()
    def fp8_random_(self, gen: torch.Generator) -> None:
        """Random FP8 weights (load_format dummy), each expert quantised on its grid."""
        from meshserve.kernels.fp8 import quantize
        for w, s in ((self.w13, self.w13_scale_inv), (self.w2, self.w2_scale_inv)):
            for e in range(w.shape[0]):
                full = torch.empty(w.shape[1:], dtype=torch.float32, device=w.device).normal_(0.0, 0.02, generator=gen)
                q, scale = quantize(full, self.fp8_block)
                w.data[e].copy_(q)
                s.data[e].copy_(scale)

    @property
    def backend_name(self) -> str:
        return self.experts.name

    def _run(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        fp8 = None if self.fp8_block is None else (self.w13_scale_inv, self.w2_scale_inv, self.fp8_block)
        return self.experts.apply(x, self.w13, self.w2, weights, ids, fp8=fp8)

    def forward(self, hidden: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        dp = self.dp if self.dp is not None and self.dp.active else None
        if dp is not None and dp.direct:  # each rank dispatches its own tokens (layers/dp_attention.py)
            rows = hidden.shape[0]
            ids_out = self.load.ids_out(self.layer_idx, rows) if self.load is not None else None
            weights, ids = select_experts(router_logits, self.router, self.e_score_correction_bias, ids_out)
            x, weights, ids = dp.pad_own(hidden, weights, ids)
            return self.dispatcher.own_tokens(x, weights, ids, self._run)[:rows]
        if dp is not None:
            if router_logits.dtype == hidden.dtype:  # one collective for both
                both = dp.gather(torch.cat([hidden, router_logits], dim=1))
                hidden, router_logits = both.split([hidden.shape[1], router_logits.shape[1]], dim=1)
                hidden, router_logits = hidden.contiguous(), router_logits.contiguous()
            else:
                hidden, router_logits = dp.gather(hidden), dp.gather(router_logits)
        ids_out = self.load.ids_out(self.layer_idx, hidden.shape[0]) if self.load is not None else None
        weights, ids = select_experts(router_logits, self.router, self.e_score_correction_bias, ids_out)
        out = self.dispatcher(hidden, weights, ids, self._run)
        return dp.scatter(out) if dp is not None else out

    def route_args(self, hidden: torch.Tensor):
        """The `route` argument of kernels/gemv.py norm_gemv for one row of this layer's tokens (the
        router's top-k inside the gate's kernel), or None where the router kernel does not take this
        router or the tokens are exchanged with other ranks first (attention DP)."""
        if (self.dp is not None and self.dp.active) or hidden.shape[0] != 1:
            return None
        from meshserve.layers.moe import router as router_mod
        from meshserve.kernels.moe_router import route_constexprs, supports
        cfg = self.router
        if router_mod.USE_KERNEL is False or not supports(self.num_experts, cfg.top_k):
            return None
        if self._route_meta is None:
            sigmoid = cfg.scoring == "sigmoid"
            self._route_meta = route_constexprs(
                self.num_experts, cfg.top_k, sigmoid=sigmoid, renormalize=cfg.renormalize,
                has_bias=sigmoid and self.e_score_correction_bias is not None, n_group=cfg.n_group,
                topk_group=cfg.topk_group, scale=cfg.routed_scaling_factor)
        bias = self.e_score_correction_bias if self._route_meta["HAS_BIAS"] else None
        ids_out = self.load.ids_out(self.layer_idx, 1) if self.load is not None else None
        return self.route_counter, self._route_meta, bias, cfg.routed_scaling_factor, ids_out

    def forward_routed(self, hidden: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """forward() with the router's (weights, ids) computed already (route_args' kernel)."""
        return self.dispatcher(hidden, weights, ids, self._run)

    # ---- weights --------------------------------------------------------------------------------
    def load_weight(self, name: str, tensor: torch.Tensor) -> bool:
        """Fill this shard from one checkpoint tensor named `name` (the part after `mlp.` or
        `block_sparse_moe.`); False if the name is not an expert weight of this layer."""
        m = _PER_EXPERT.search(name)
        if m:
            expert, part = int(m.group(1)), _PARTS[m.group(2)]
            if expert >= self.num_experts:
                raise ValueError(f"checkpoint tensor {name!r} names expert {expert}, the model has {self.num_experts}")
            if self.placement.owns(expert):
                if m.group(3) == "weight":
                    self._load_part(expert - self.placement.first, part, tensor)
                elif self.fp8_block is not None:
                    self._load_scale(expert - self.placement.first, part, tensor)
                else:
                    raise ValueError(f"checkpoint tensor {name!r}: a block scale for experts that are not FP8")
            return True
        if name.endswith("experts.gate_up_proj"):
            self._check_fused(name, tensor, (self.num_experts, 2 * self.intermediate_size, self.hidden_size))
            gate, up = tensor.split(self.intermediate_size, dim=1)
            for le in range(self.placement.num_local):
                self._load_part(le, "gate", gate[self.placement.first + le])
                self._load_part(le, "up", up[self.placement.first + le])
            return True
        if name.endswith("experts.down_proj"):
            self._check_fused(name, tensor, (self.num_experts, self.hidden_size, self.intermediate_size))
            for le in range(self.placement.num_local):
                self._load_part(le, "down", tensor[self.placement.first + le])
            return True
        if name.endswith("e_score_correction_bias") and self.e_score_correction_bias is not None:
            self.e_score_correction_bias.data.copy_(tensor)
            return True
        return False

    def _check_fused(self, name: str, tensor: torch.Tensor, shape: tuple) -> None:
        if tuple(tensor.shape) != shape:
            raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, expected {shape} "
                             f"(experts, out features, in features)")

    def _load_part(self, local: int, part: str, full: torch.Tensor) -> None:
        i, r = self.i_local, self.tp_rank
        if self.fp8_block is not None and full.dtype != self.w13.dtype:  # quantised on its own grid
            from meshserve.kernels.fp8 import quantize
            full, scale = quantize(full.to(self.w13.device), self.fp8_block)
            self._load_scale(local, part, scale)
        if part == "down":
            self.w2.data[local].copy_(full.narrow(1, r * i, i))
        else:
            offset = 0 if part == "gate" else i
            self.w13.data[local].narrow(0, offset, i).copy_(full.narrow(0, r * i, i))
        self._loaded.add((local, part))

    def _load_scale(self, local: int, part: str, full: torch.Tensor) -> None:
        from meshserve.layers.linear import _narrow
        i, r, block = self.i_local, self.tp_rank, self.fp8_block
        full = full.to(torch.float32)
        if part == "down":
            self.w2_scale_inv.data[local].copy_(_narrow(full, 1, r * i, i, block))
        else:
            dst = _narrow(self.w13_scale_inv.data[local], 0, 0 if part == "gate" else i, i, block)
            dst.copy_(_narrow(full, 0, r * i, i, block))
        self._scaled.add((local, part))

    def fully_loaded(self) -> bool:
        """Whether every local expert got its gate, up and down weights (and FP8 scales)."""
        n = 3 * self.placement.num_local
        return len(self._loaded) == n and (self.fp8_block is None or len(self._scaled) == n)
