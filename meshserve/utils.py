"""Small helpers shared by the worker modules."""
from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device without stalling the host: a copy from pageable memory may wait for the
    stream to drain (defeating the overlap scheduler), so stage through pinned memory."""
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
