"""Small helpers shared by the worker modules."""
from __future__ import annotations

import gc
import logging
import os
import time
from typing import Optional

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


class GCPauses:
    """Python's cyclic garbage collector stops the process while it scans: a full (generation 2)
    collection walks every tracked object, and a serving process holds millions (the model's
    modules, Triton and graph caches, the tokenizer), so one collection can stall a step or a
    stream by tens of milliseconds. `freeze()` moves everything alive at startup into the
    permanent generation (as vLLM and SGLang do), so later collections scan only what serving
    allocates; `install()` times every collection and logs the ones over `warn_ms`
    (MESHSERVE_GC_WARN_MS, default 20; 0 logs none)."""

    def __init__(self, where: str, warn_ms: Optional[float] = None):
        self.where = where
        self.warn_ms = float(os.environ.get("MESHSERVE_GC_WARN_MS", "20")) if warn_ms is None else warn_ms
        self.count = 0
        self.total_s = 0.0
        self.max_s = 0.0
        self._t0 = 0.0
        self._log = logging.getLogger("meshserve.gc")

    @staticmethod
    def freeze() -> int:
        """Collect once, then exempt every surviving object from later collections; returns how
        many objects were frozen."""
        gc.collect()
        gc.freeze()
        return gc.get_freeze_count()

    def install(self) -> "GCPauses":
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)
        return self

    def uninstall(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
            return
        dt = time.perf_counter() - self._t0
        self.count += 1
        self.total_s += dt
        self.max_s = max(self.max_s, dt)
        if self.warn_ms and dt * 1000 >= self.warn_ms:
            self._log.warning("%s: a generation-%d garbage collection paused the process %.1f ms "
                              "(%d collected; %d collections, %.0f ms in all so far)", self.where,
                              info.get("generation", -1), dt * 1000, info.get("collected", 0),
                              self.count, self.total_s * 1000)
