"""SiLU-and-mul for the merged gate_up projection: [.., 2*d] -> [.., d]."""
import torch
import torch.nn.functional as F


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
