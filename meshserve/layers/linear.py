"""Tensor-parallel linear layers. Each parameter owns a `weight_loader` that slices the full
checkpoint tensor into this rank's shard, so the loader never needs to know the layout.

Column parallel: output features split over the tp group (no communication).
Row parallel: input features split; partial products are summed by one all-reduce.

FP8: `to_fp8(block)` turns a layer's weight into float8_e4m3fn with one fp32 scale per block
(`weight_scale_inv`, the checkpoints' name and layout: kernels/fp8.py); its loaders then take FP8
checkpoint tensors and their scales (the scale sliced like the weight, in whole blocks), or full
precision tensors, which they quantise on the block grid of the checkpoint tensor itself (so an
online-quantised layer equals the same checkpoint quantised offline, at any tensor parallel size).
"""
from __future__ import annotations


from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from meshserve.distributed.comm import SOLO
from meshserve.kernels.fp8 import WHOLE
from meshserve import kernels


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           prefetch: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, except that a few rows on the GPU (batch-1 decode) take the skinny-GEMM kernel,
    which reads the weights at a higher fraction of the bandwidth than cuBLAS (kernels/gemv.py).
    prefetch: a weight read soon after, which that kernel asks for in L2 (cuBLAS cannot: ignored)."""
    if kernels.TRITON_AVAILABLE and x.is_cuda and x.dim() == 2 and 0 < x.shape[0] <= kernels.GEMV_MAX_M:
        from meshserve.kernels.gemv import gemv, use_gemv
        if use_gemv(x, weight):
            return gemv(x, weight, bias, prefetch=prefetch)
    return F.linear(x, weight, bias)


def _narrow(t: torch.Tensor, dim: int, off: int, size: int, block=None) -> torch.Tensor:
    """t.narrow(dim, off, size) in weight units; with `block` (t a block-scale tensor), the blocks of
    those rows / columns, which must start on a block (a partial block only at t's end)."""
    if block is None:
        return t.narrow(dim, off, size)
    b = block[dim]
    if t.shape[dim] == 1 and b >= WHOLE:  # a scale that does not vary along this dim (per-row scales)
        return t
    start, count = off // b, -(-size // b)
    if off % b or (size % b and start + count != t.shape[dim]):
        what = "rows" if dim == 0 else "columns"
        raise ValueError(f"FP8 weights in blocks of {list(block)}: a tensor parallel shard or fused part of {size} "
                         f"{what} at {what[:-1]} {off} does not start on a block of {b}; accepted: tensor parallel "
                         f"sizes whose shards are whole blocks")
    return t.narrow(dim, start, count)


def _divide(a: int, b: int, what: str) -> int:
    if a % b != 0:
        raise ValueError(f"{what}={a} is not divisible by tensor parallel size {b}")
    return a // b


class LinearBase(nn.Module):
    fp8_ok = True  # may hold FP8 weights (False: its weight is read as a matrix elsewhere, or a router)

    def __init__(self, input_size: int, output_size: int, bias: bool, tp_group, params_dtype=None):
        super().__init__()
        self.tp_group = tp_group or SOLO
        self.tp_size = self.tp_group.size
        self.tp_rank = self.tp_group.rank_in_group
        self.weight = nn.Parameter(torch.empty(output_size, input_size, dtype=params_dtype), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size, dtype=params_dtype), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)
        self.fp8_block: tuple[int, int] | None = None  # (rows, columns) of a scale block once FP8
        # (linear,): a layer whose weight this one's one-row kernel prefetches into L2 where
        # kernel_config.l2_prefetch_next_layer is on (a MoE router gate: the next layer's q/k/v); a
        # tuple, so nn.Module does not register that layer as a submodule of this one
        self.prefetch_after: tuple | None = None

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None, block=None) -> None:
        """Copy this rank's part of checkpoint tensor `loaded` (part `shard_id` of a fused layer)
        into `param`; `block`: param and loaded are FP8 block scales of that block size."""
        raise NotImplementedError

    def to_fp8(self, block: tuple[int, int]) -> None:
        """Hold the weight in FP8 with one fp32 scale per `block` (before loading)."""
        from meshserve.kernels.fp8 import FP8_DTYPE, scale_shape
        n, k = self.weight.shape
        device = self.weight.device
        self.weight = nn.Parameter(torch.empty(n, k, dtype=FP8_DTYPE, device=device), requires_grad=False)
        self.weight.weight_loader = self._fp8_weight_loader
        self.weight_scale_inv = nn.Parameter(torch.ones(scale_shape(n, k, block), dtype=torch.float32, device=device),
                                             requires_grad=False)
        self.weight_scale_inv.weight_loader = partial(self._scale_loader, block=block)
        self.fp8_block = block

    def _scale_loader(self, param, loaded, shard_id=None, block=None):
        self.weight_loader(param, loaded.to(torch.float32), shard_id, block=block)

    def _fp8_weight_loader(self, param, loaded, shard_id=None):
        from meshserve.kernels.fp8 import FP8_DTYPE, quantize
        if loaded.dtype != FP8_DTYPE:  # full precision: quantised on its own block grid, then sliced
            loaded, scale = quantize(loaded.to(param.device), self.fp8_block)
            self.weight_loader(self.weight_scale_inv, scale, shard_id, block=self.fp8_block)
        self.weight_loader(param, loaded, shard_id)

    def _mm(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.fp8_block is not None:
            if kernels.TRITON_AVAILABLE and x.is_cuda:
                from meshserve.kernels.fp8_gemm import fp8_linear
                return fp8_linear(x, self.weight, self.weight_scale_inv, self.fp8_block, bias)
            from meshserve.kernels.fp8 import fp8_linear_ref
            return fp8_linear_ref(x, self.weight, self.weight_scale_inv, self.fp8_block, bias)
        return linear(x, self.weight, bias, self.l2_prefetch(x))

    def l2_prefetch(self, x: torch.Tensor) -> torch.Tensor | None:
        """The weight this layer's kernel should prefetch into L2 for input x, or None: one row on a GPU,
        kernel_config.l2_prefetch_next_layer on, a `prefetch_after` layer set."""
        if self.prefetch_after is None or not kernels.L2_PREFETCH_NEXT_LAYER or not x.is_cuda or x.shape[0] != 1:
            return None
        return self.prefetch_after[0].weight

    def fp8_aligned_sizes(self) -> tuple[list[int], list[int]]:
        """Row and column counts that must be whole blocks for this layer's loaders (fused parts,
        tensor parallel shards): what an online-quantised layer's block must divide."""
        return [], []


class ReplicatedLinear(LinearBase):
    def __init__(self, input_size: int, output_size: int, bias: bool = False, params_dtype=None):
        super().__init__(input_size, output_size, bias, SOLO, params_dtype)

    def weight_loader(self, param, loaded, shard_id=None, block=None):
        param.data.copy_(loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._mm(x, self.bias)


class ColumnParallelLinear(LinearBase):
    def __init__(self, input_size: int, output_size: int, bias: bool = False, tp_group=None,
                 gather_output: bool = False, params_dtype=None):
        tp = (tp_group or SOLO).size
        super().__init__(input_size, _divide(output_size, tp, "output_size"), bias, tp_group, params_dtype)
        self.gather_output = gather_output

    def weight_loader(self, param, loaded, shard_id=None, block=None):
        shard = self.weight.shape[0]  # rows of this rank (of the weight, its bias, its scales' blocks)
        param.data.copy_(_narrow(loaded, 0, self.tp_rank * shard, shard, block))

    def fp8_aligned_sizes(self):
        return ([self.weight.shape[0]] if self.tp_size > 1 else []), []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._mm(x, self.bias)
        return self.tp_group.all_gather(y, -1) if self.gather_output else y


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of one input fused into one GEMM (gate_up_proj)."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False, tp_group=None,
                 params_dtype=None):
        self.output_sizes = list(output_sizes)
        super().__init__(input_size, sum(output_sizes), bias, tp_group, params_dtype=params_dtype)

    def weight_loader(self, param, loaded, shard_id=None, block=None):
        if shard_id is None:  # already fused in the checkpoint: split it into its parts first
            offset = 0
            for i, size in enumerate(self.output_sizes):
                self.weight_loader(param, _narrow(loaded, 0, offset, size, block), i, block)
                offset += size
            return
        shard = self.output_sizes[shard_id] // self.tp_size
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        _narrow(param.data, 0, offset, shard, block).copy_(_narrow(loaded, 0, self.tp_rank * shard, shard, block))

    def fp8_aligned_sizes(self):
        parts = [s // self.tp_size for s in self.output_sizes]
        return (parts if self.tp_size > 1 else parts[:-1]), []


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q/k/v projection. Query heads split over tp; when there are fewer kv heads than tp
    ranks, each kv head is replicated on tp/num_kv_heads consecutive ranks."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False, tp_group=None, params_dtype=None):
        tp_group = tp_group or SOLO
        tp = tp_group.size
        if num_heads % tp != 0:
            raise ValueError(f"num_attention_heads={num_heads} is not divisible by tensor parallel size {tp}")
        if num_kv_heads >= tp and num_kv_heads % tp != 0:
            raise ValueError(f"num_key_value_heads={num_kv_heads} is not divisible by tensor parallel size {tp}")
        if num_kv_heads < tp and tp % num_kv_heads != 0:
            raise ValueError(f"tensor parallel size {tp} is not a multiple of num_key_value_heads={num_kv_heads}")
        self.head_dim = head_dim
        self.num_heads = num_heads // tp
        self.num_kv_heads = max(1, num_kv_heads // tp)
        self.total_num_kv_heads = num_kv_heads
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp
        super().__init__(hidden_size, out, bias, tp_group, params_dtype=params_dtype)

    def weight_loader(self, param, loaded, shard_id=None, block=None):
        if shard_id is None:
            q = self.num_heads * self.tp_size * self.head_dim
            kv = self.total_num_kv_heads * self.head_dim
            for sid, off, size in (("q", 0, q), ("k", q, kv), ("v", q + kv, kv)):
                self.weight_loader(param, _narrow(loaded, 0, off, size, block), sid, block)
            return
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        if shard_id == "q":
            offset, size, src = 0, q_size, self.tp_rank
        else:
            offset = q_size + (0 if shard_id == "k" else kv_size)
            size = kv_size
            replicas = max(1, self.tp_size // self.total_num_kv_heads)
            src = self.tp_rank // replicas
        _narrow(param.data, 0, offset, size, block).copy_(_narrow(loaded, 0, src * size, size, block))

    def fp8_aligned_sizes(self):
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return ([q, kv, kv] if self.tp_size > 1 else [q, kv]), []


class RowParallelLinear(LinearBase):
    def __init__(self, input_size: int, output_size: int, bias: bool = False, tp_group=None,
                 reduce_results: bool = True, params_dtype=None):
        tp = (tp_group or SOLO).size
        super().__init__(_divide(input_size, tp, "input_size"), output_size, bias, tp_group, params_dtype)
        self.reduce_results = reduce_results

    def weight_loader(self, param, loaded, shard_id=None, block=None):
        if param.dim() == 1:  # bias: added once, after the reduction
            param.data.copy_(loaded)
            return
        shard = self.weight.shape[1]
        param.data.copy_(_narrow(loaded, 1, self.tp_rank * shard, shard, block))

    def fp8_aligned_sizes(self):
        return [], ([self.weight.shape[1]] if self.tp_size > 1 else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._mm(x, None)
        if self.reduce_results and self.tp_size > 1:
            y = self.tp_group.all_reduce(y)
        if self.bias is not None:
            y = y + self.bias
        return y
