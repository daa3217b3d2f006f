"""SiLU-and-mul for the merged gate_up projection: [.., 2*d] -> [.., d]."""
import torch
import torch.nn.functional as F


from meshserve.kernels import use_triton


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if use_triton(x):
        from meshserve.kernels import fused
        return fused.silu_and_mul(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
