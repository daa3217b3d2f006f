"""Tensor-parallel linear layers. Each parameter owns a `weight_loader` that slices the full
checkpoint tensor into this rank's shard, so the loader never needs to know the layout.

Column parallel: output features split over the tp group (no communication).
Row parallel: input features split; partial products are summed by one all-reduce.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from meshserve.distributed.comm import SOLO
from meshserve import kernels


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, except that a few rows on the GPU (batch-1 decode) take the skinny-GEMM kernel,
    which reads the weights at a higher fraction of the bandwidth than cuBLAS (kernels/gemv.py)."""
    if kernels.TRITON_AVAILABLE and x.is_cuda and x.dim() == 2 and 0 < x.shape[0] <= kernels.GEMV_MAX_M:
        from meshserve.kernels.gemv import gemv, use_gemv
        if use_gemv(x, weight):
            return gemv(x, weight, bias)
    return F.linear(x, weight, bias)


def _divide(a: int, b: int, what: str) -> int:
    if a % b != 0:
        raise ValueError(f"{what}={a} is not divisible by tensor parallel size {b}")
    return a // b


class LinearBase(nn.Module):
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

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        raise NotImplementedError


class ReplicatedLinear(LinearBase):
    def __init__(self, input_size: int, output_size: int, bias: bool = False, params_dtype=None):
        super().__init__(input_size, output_size, bias, SOLO, params_dtype)

    def weight_loader(self, param, loaded, shard_id=None):
        param.data.copy_(loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class ColumnParallelLinear(LinearBase):
    def __init__(self, input_size: int, output_size: int, bias: bool = False, tp_group=None,
                 gather_output: bool = False, params_dtype=None):
        tp = (tp_group or SOLO).size
        super().__init__(input_size, _divide(output_size, tp, "output_size"), bias, tp_group, params_dtype)
        self.gather_output = gather_output

    def weight_loader(self, param, loaded, shard_id=None):
        shard = param.data.size(0)
        param.data.copy_(loaded.narrow(0, self.tp_rank * shard, shard))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight, self.bias)
        return self.tp_group.all_gather(y, -1) if self.gather_output else y


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of one input fused into one GEMM (gate_up_proj)."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False, tp_group=None,
                 params_dtype=None):
        self.output_sizes = list(output_sizes)
        super().__init__(input_size, sum(output_sizes), bias, tp_group, params_dtype=params_dtype)

    def weight_loader(self, param, loaded, shard_id=None):
        if shard_id is None:  # already fused in the checkpoint: split it into its parts first
            for i, part in enumerate(loaded.split(self.output_sizes, 0)):
                self.weight_loader(param, part, i)
            return
        shard = self.output_sizes[shard_id] // self.tp_size
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        param.data.narrow(0, offset, shard).copy_(loaded.narrow(0, self.tp_rank * shard, shard))


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

    def weight_loader(self, param, loaded, shard_id=None):
        if shard_id is None:
            q = self.num_heads * self.tp_size * self.head_dim
            kv = self.total_num_kv_heads * self.head_dim
            for sid, part in zip("qkv", loaded.split([q, kv, kv], 0)):
                self.weight_loader(param, part, sid)
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
        param.data.narrow(0, offset, size).copy_(loaded.narrow(0, src * size, size))


class RowParallelLinear(LinearBase):
    def __init__(self, input_size: int, output_size: int, bias: bool = False, tp_group=None,
                 reduce_results: bool = True, params_dtype=None):
        tp = (tp_group or SOLO).size
        super().__init__(_divide(input_size, tp, "input_size"), output_size, bias, tp_group, params_dtype)
        self.reduce_results = reduce_results

    def weight_loader(self, param, loaded, shard_id=None):
        if param.dim() == 1:  # bias: added once, after the reduction
            param.data.copy_(loaded)
            return
        shard = param.data.size(1)
        param.data.copy_(loaded.narrow(1, self.tp_rank * shard, shard))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight)
        if self.reduce_results and self.tp_size > 1:
            y = self.tp_group.all_reduce(y)
        if self.bias is not None:
            y = y + self.bias
        return y
