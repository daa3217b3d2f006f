"""Small helpers shared by the worker modules."""
from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device without stalling the host: a copy from pageable memory may wait for the
    stream to drain (defeating the overlap scheduler), so stage through pinned memory."""
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def all_ints(xs) -> bool:
    """`all(isinstance(x, int) for x in xs)`, with the per-element work in C (map/set): long
    token-id prompts are checked on every request."""
    return all(issubclass(t, int) for t in set(map(type, xs)))
