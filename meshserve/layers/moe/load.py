"""Expert load: how many tokens each expert of each MoE layer received, for /metrics.

Each MoE layer's router writes its top-k ids straight into a reserved device table (`ids_out`:
topk's `out=`, no extra kernel inside the model or its CUDA graphs). After the step the runner
counts the real rows of all layers at once (`end_step`: one scatter-add, the running totals, the
step's max/mean load ratio and distinct experts hit; the padding rows of a graph-sized batch are
left out), and every `every` steps takes the totals to the host without waiting on the device: the
copy is queued behind the step and read one collection later, so no step ever waits for it.
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
        self.totals = torch.zeros(n, num_experts, dtype=torch.int64, device=device)
        self.ratio_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.ratio_max = torch.zeros((), dtype=torch.float64, device=device)
        self.hit_sum = torch.zeros((), dtype=torch.float64, device=device)  # distinct experts hit per layer
        self.steps = 0
        self._pending: Optional[tuple] = None  # host copies queued at the last collection

    def reserve(self, max_tokens: int) -> None:
        """Room for the ids of a step of up to `max_tokens` tokens (before any forward or capture)."""
        self.ids = torch.zeros(len(self.layer_ids), max_tokens, self.top_k, dtype=torch.int64, device=self.device)

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
        counts = torch.zeros(len(self.layer_ids), self.num_experts, dtype=torch.int64, device=self.device)
        counts.scatter_add_(1, ids, torch.ones_like(ids))
        self.totals += counts
        c = counts.to(torch.float64)
        ratio = (c.amax(dim=1) / c.mean(dim=1).clamp_min(1e-9)).mean()
        self.ratio_sum += ratio
        torch.maximum(self.ratio_max, ratio, out=self.ratio_max)
        self.hit_sum += (counts > 0).to(torch.float64).sum(dim=1).mean()
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
