"""Which attention backend a rank runs: `attention_backend` (auto | triton | torch) against its
device. auto takes Triton on CUDA when it is installed, the torch reference elsewhere; Triton on a
CPU runs only under Triton's interpreter (TRITON_INTERPRET=1, Triton's own switch, for tests)."""
from __future__ import annotations

import logging

import torch

from meshserve import kernels
from meshserve.kernels.settings import H200, KernelSettings
from meshserve.layers.attention.backend import AttentionBackend, AttentionShape
from meshserve.layers.attention.backends.torch import TorchAttentionBackend

logger = logging.getLogger(__name__)

ACCEPTED = ("auto", "triton", "torch")


def choose_backend_name(name: str, device: torch.device) -> str:
    """'triton' or 'torch' for `attention_backend=name` on `device`; errors name the field and what is accepted."""
    if name not in ACCEPTED:
        raise ValueError(f"attention_backend={name!r} is not supported; accepted: {', '.join(ACCEPTED)}")
    if name == "torch" or (name == "auto" and device.type != "cuda"):
        return "torch"
    interpret = device.type == "cpu" and kernels.interpreting()
    if device.type != "cuda" and not interpret:
        raise ValueError(f"attention_backend='triton' needs a CUDA device (this engine's is "
                         f"{device.type!r}), or a CPU with TRITON_INTERPRET=1 (Triton's "
                         f"interpreter, for tests); accepted on this device: auto, torch")
    try:
        import triton  # noqa: F401
    except ImportError:
        if name == "triton":
            raise
        logger.warning("Triton is not installed: using the torch attention backend")
        return "torch"
    return "triton"


def select_attention_backend(name: str, shape: AttentionShape, block_size: int, device: torch.device,
                             settings: KernelSettings = H200) -> AttentionBackend:
    """The backend object a model runner builds metadata with and runs its attention layers on."""
    device = torch.device(device)
    if choose_backend_name(name, device) == "torch":
        return TorchAttentionBackend(shape, block_size, device, settings)
    from meshserve.layers.attention.backends.triton import TritonAttentionBackend
    return TritonAttentionBackend(shape, block_size, device, settings)
