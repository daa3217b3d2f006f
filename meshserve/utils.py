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


class RateLimitedLog:
    """Logs at most one record per `interval_s` (default 30 s); the next record that passes says how
    many were held back meanwhile. For diagnostics that can recur every step (slow steps, GC pauses):
    one line tells the reader; a hundred bury everything else."""

    def __init__(self, logger: logging.Logger, level: int = logging.INFO, interval_s: float = 30.0,
                 clock=time.monotonic):
        self.logger, self.level, self.interval_s, self.clock = logger, level, interval_s, clock
        self.num_suppressed = 0
        self._last: Optional[float] = None

    def __call__(self, msg: str, *args) -> bool:
        """Log `msg % args` unless one was logged less than interval_s ago; returns whether it was."""
        if not self.logger.isEnabledFor(self.level):
            return False
        now = self.clock()
        if self._last is not None and now - self._last < self.interval_s:
            self.num_suppressed += 1
            return False
        if self.num_suppressed:
            msg += " (%d more like it in the previous %.0f s not logged)"
            args = (*args, self.num_suppressed, now - self._last)
        self.logger.log(self.level, msg, *args)
        self._last, self.num_suppressed = now, 0
        return True


class GCPauses:
    """Python's cyclic garbage collector stops the process while it scans: a full (generation 2)
    collection walks every tracked object, and a serving process holds millions (the model's
    modules, Triton and graph caches, the tokenizer), so one collection can stall a step or a
    stream by tens of milliseconds. `freeze()` moves everything alive at startup into the
    permanent generation (as vLLM and SGLang do), so later collections scan only what serving
    allocates; `install()` times every collection and logs the ones over `warn_ms`
    (MESHSERVE_GC_WARN_MS, default 20; 0 logs none) at INFO, at most one line per 30 s."""

    def __init__(self, where: str, warn_ms: Optional[float] = None):
        self.where = where
        self.warn_ms = float(os.environ.get("MESHSERVE_GC_WARN_MS", "20")) if warn_ms is None else warn_ms
        self.count = 0
        self.total_s = 0.0
        self.max_s = 0.0
        self._t0 = 0.0
        self._log = RateLimitedLog(logging.getLogger("meshserve.gc"))

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
            self._log("%s: a generation-%d garbage collection paused the process %.1f ms "
                      "(%d collected; %d collections, %.0f ms in all so far)", self.where,
                      info.get("generation", -1), dt * 1000, info.get("collected", 0),
                      self.count, self.total_s * 1000)
