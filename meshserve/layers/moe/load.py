"""Expert load: how many tokens each expert of each MoE layer received, for /metrics.

The MoE layers count into a per-step device table (scatter-adds of fixed shape, so they run
inside CUDA graphs), masking the padding rows of a graph-sized batch through `num_valid`. The
runner opens each step (`begin_step`), closes it (`end_step`: adds the step into the running
totals and keeps the step's max/mean load ratio), and every `every` steps takes the totals to the
host without waiting on the device: the copy is queued behind the step and read one collection
later, so no step ever waits for it.
"""
from __future__ import annotations

from typing import Optional

import torch


class ExpertLoad:
    def __init__(self, layer_ids: list[int], num_experts: int, device: torch.device, every: int = 32):
        self.layer_ids = list(layer_ids)
        self.slot = {layer: i for i, layer in enumerate(self.layer_ids)}
        self.num_experts = num_experts
        self.device = device
        self.every = every
        n = len(self.layer_ids)
        self.step_counts = torch.zeros(n, num_experts, dtype=torch.int64, device=device)
        self.totals = torch.zeros(n, num_experts, dtype=torch.int64, device=device)
        self.num_valid = torch.zeros((), dtype=torch.int64, device=device)
        self.ratio_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.ratio_max = torch.zeros((), dtype=torch.float64, device=device)
        self.hit_sum = torch.zeros((), dtype=torch.float64, device=device)  # distinct experts hit per layer
        self.steps = 0
        self._pending: Optional[tuple] = None  # host copies queued at the last collection

    # ---- inside the model (graph-safe) -------------------------------------------------------------
    def record(self, layer_idx: int, ids: torch.Tensor) -> None:
        t, k = ids.shape
        mask = (torch.arange(t, device=ids.device) < self.num_valid).to(torch.int64)
        self.step_counts[self.slot[layer_idx]].scatter_add_(0, ids.reshape(-1), mask.repeat_interleave(k))

    # ---- around each step (runner) -----------------------------------------------------------------
    def begin_step(self, num_tokens: int) -> None:
        self.step_counts.zero_()
        self.num_valid.fill_(num_tokens)

    def end_step(self) -> Optional[dict]:
        """Account the step; every `every` steps returns the window collected `every` steps ago
        (None otherwise)."""
        self.totals += self.step_counts
        counts = self.step_counts.to(torch.float64)
        mean = counts.mean(dim=1).clamp_min(1e-9)
        ratio = (counts.amax(dim=1) / mean).mean()
        self.ratio_sum += ratio
        self.hit_sum += (self.step_counts > 0).to(torch.float64).sum(dim=1).mean()
        torch.maximum(self.ratio_max, ratio, out=self.ratio_max)
        self.steps += 1
        if self.steps % self.every:
            return None
        return self.collect()

    def collect(self) -> Optional[dict]:
        """Queue a host copy of the totals since the last collection and reset them; returns the
        previous collection's figures (on CPU, where copies are synchronous, this one's)."""
        steps = self.steps
        copies = tuple(_to_host(t) for t in (self.totals, self.ratio_sum, self.ratio_max, self.hit_sum))
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        self.totals.zero_()
        self.ratio_sum.zero_()
        self.ratio_max.zero_()
        self.hit_sum.zero_()
        self.steps = 0
        ready, self._pending = self._pending, (copies, event, steps)
        if self.device.type != "cuda":
            ready, self._pending = self._pending, None
        if ready is None:
            return None
        (totals, ratio_sum, ratio_max, hit_sum), event, steps = ready
        if event is not None:
            event.synchronize()  # recorded `every` steps ago: long done
        if steps == 0:
            return None
        return {"layers": self.layer_ids, "tokens": totals.tolist(),
                "ratio_mean": float(ratio_sum) / steps, "ratio_max": float(ratio_max),
                "experts_hit_mean": float(hit_sum) / steps, "steps": steps}


    def flush(self) -> list[dict]:
        """Everything counted so far, now (waits for the device): the pending window and the
        current one. For LLM.get_stats; the step loop never calls it."""
        out = []
        first = self.collect()
        if first is not None:
            out.append(first)
        if self._pending is not None:
            second = self.collect()  # hands back the window queued just above
            if second is not None:
                out.append(second)
            self._pending = None
        return out


def _to_host(t: torch.Tensor) -> torch.Tensor:
    if t.device.type != "cuda":
        return t.clone()
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host
