"""Which latent-attention backend a rank runs (DeepSeek MLA layers): `attention_backend` (auto |
triton | torch) against its device, decided as for other layers (selector.py): the Triton decode
kernel on CUDA, the torch reference elsewhere."""
from __future__ import annotations

import torch

from meshserve.kernels.settings import H200, KernelSettings
from meshserve.layers.attention.backend import AttentionShape
from meshserve.layers.attention.mla import MLABackend, TorchMLABackend
from meshserve.layers.attention.selector import choose_backend_name


def select_mla_backend(name: str, shape: AttentionShape, block_size: int, device: torch.device,
                       settings: KernelSettings = H200) -> MLABackend:
    device = torch.device(device)
    if choose_backend_name(name, device) == "torch":
        return TorchMLABackend(shape, block_size, device, settings)
    from meshserve.layers.attention.backends.mla_triton import TritonMLABackend  # imports Triton
    return TritonMLABackend(shape, block_size, device, settings)
