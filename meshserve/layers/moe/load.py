"""Expert load: how many tokens each expert of each MoE layer received, for /metrics.

Each MoE layer's router writes its top-k ids straight into a reserved device table (`ids_out`:
topk's `out=`, no extra kernel inside the model or its CUDA graphs). After the step the runner
counts the real rows of all layers at once (`end_step`: one scatter-add into the step's row of a
window of `every` steps; the padding rows of a graph-sized batch are left out), and every `every`
steps reduces the window (totals, each step's max/mean load ratio, distinct experts hit) and takes
it to the host without waiting on the device: the copy is queued behind the step and read one
collection later, so no step ever waits for it.
"""
from __future__ import annotations

from typing import Optional

import torch


class ExpertLoad:
    def __init__(self, layer_ids: list[int], num_experts: int, top_k: int, device: torch.device, every: int = 32):
        self.layer_ids = list(layer_ids)
        self.slot = {layer: i for i, layer in enumerate(self.layer_ids)}
        self.num_experts, self.top_k = num_experts, top_k
        self.device = device
        self.every = every
        n = len(self.layer_ids)
        self.ids: Optional[torch.Tensor] = None  # [layers, max tokens, top_k]: the routers write here
        # one row of counts per step of the window: a step adds one scatter-add (and the copy of
        # its ids), the window's totals and ratios are reduced once per collection
        self.window = torch.zeros(every, n, num_experts, dtype=torch.int32, device=device)
        self._ones: Optional[torch.Tensor] = None
        self.steps = 0
        self._pending: Optional[tuple] = None  # host copies queued at the last collection

    def reserve(self, max_tokens: int) -> None:
        """Room for the ids of a step of up to `max_tokens` tokens (before any forward or capture)."""
        self.ids = torch.zeros(len(self.layer_ids), max_tokens, self.top_k, dtype=torch.int64, device=self.device)
        self._ones = torch.ones(len(self.layer_ids), max_tokens * self.top_k, dtype=torch.int32, device=self.device)

    # ---- inside the model (graph-safe) -------------------------------------------------------------
    def ids_out(self, layer_idx: int, num_tokens: int) -> Optional[torch.Tensor]:
        """Where layer `layer_idx`'s router writes the ids of a step of `num_tokens` rows (None:
        nothing reserved, or a step larger than reserved; such steps are not counted)."""
        if self.ids is None or num_tokens > self.ids.shape[1]:
            return None
        return self.ids[self.slot[layer_idx], :num_tokens]

    # ---- after each step (runner) ------------------------------------------------------------------
    def end_step(self, num_tokens: int) -> Optional[dict]:
        """Count the step's first `num_tokens` rows (the rest pad a graph-sized batch); every
        `every` steps returns the window collected `every` steps ago (None otherwise)."""
        if self.ids is None or num_tokens > self.ids.shape[1] or num_tokens == 0:
            return None
        ids = self.ids[:, :num_tokens].reshape(len(self.layer_ids), -1)
        self.window[self.steps].scatter_add_(1, ids, self._ones[:, :ids.shape[1]])
        self.steps += 1
        if self.steps < self.every:
            return None
        return self.collect()

    def collect(self) -> Optional[dict]:
        """Reduce the window (totals per layer and expert, each step's max/mean load ratio averaged
        over layers, distinct experts hit), queue its host copy and reset it; returns the previous
        collection's figures (on CPU, where copies are synchronous, this one's)."""
        steps = self.steps
        copies = None
        if steps:
            w = self.window[:steps]
            c = w.to(torch.float64)
            ratio = (c.amax(dim=2) / c.mean(dim=2).clamp_min(1e-9)).mean(dim=1)  # [steps]
            hit = (w > 0).sum(dim=2).to(torch.float64).mean(dim=1)
            stats = torch.stack([ratio.sum(), ratio.max(), hit.sum()])
            copies = (_to_host(w.sum(dim=0, dtype=torch.int64)), _to_host(stats))
            w.zero_()
        event = None
        if copies is not None and self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        self.steps = 0
        ready, self._pending = self._pending, ((copies, event, steps) if copies is not None else None)
        if self.device.type != "cuda":
            ready, self._pending = self._pending, None
        if ready is None:
            return None
        (totals, stats), event, steps = ready
        if event is not None:
            event.synchronize()  # recorded `every` steps ago: long done
        ratio_sum, ratio_max, hit_sum = stats.tolist()
        return {"layers": self.layer_ids, "tokens": totals.tolist(),
                "ratio_mean": ratio_sum / steps, "ratio_max": ratio_max,
                "experts_hit_mean": hit_sum / steps, "steps": steps}

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
