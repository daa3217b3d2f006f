"""Attention data parallelism: the token exchange around the expert layers.

With `enable_attention_dp` every rank of an MoE slice runs its own requests (its own scheduler
and KV cache, engine/dp_coordinator.py): attention, the dense MLPs, the embedding and the LM head
are replicated (their group is `attn_tp`, of one rank), so those layers need no collective at all.
The experts stay split over the slice by Mapping's MoE rule, so each MoE layer gathers the slice's
tokens before it and hands every rank its own rows back after it:

    rank r: x [n_r, H] --all-gather over attn_dp (padded to max n)--> [sum n, H] --FusedMoE
    (dispatch / experts / combine as without DP: every rank sees every token)--> rows of rank r

Every rank learns the step's token counts of all ranks from the SchedulerOutput (no collective for
them); a rank with no request in a step that has work elsewhere runs a one-token dummy forward so
that it takes part in the layers' collectives (worker/model_runner.py).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


class DpTokens:
    """This step's rows of every attention-DP rank, shared by the MoE layers of one model."""

    def __init__(self, group, device: torch.device, direct: bool = False):
        self.group = group  # the attn_dp GroupCoordinator: the ranks whose tokens an MoE layer sees
        self.device = device
        # direct: the experts split over exactly these ranks with no moe_tp (moe_ep group == attn_dp
        # group, moe_tp 1), so an MoE layer sends each rank's own tokens straight to their experts
        # (one all-to-all each way, 1/N of the bytes of the gather) instead of gathering the slice's
        self.direct = direct
        self.counts: list[int] = []
        self.start = self.num = self.local = self.total = self.max = 0
        self._rows: Optional[torch.Tensor] = None  # where the real rows sit in the padded gather

    @property
    def active(self) -> bool:
        return bool(self.counts)

    def set_step(self, counts: list[int], dummy: bool = False) -> None:
        """The step's token count on every DP rank. `dummy`: this rank has no request and runs one
        token through the model only to take part in the collectives; it contributes no rows."""
        r = self.group.rank_in_group
        self.counts = list(counts)
        self.start, self.num = sum(counts[:r]), counts[r]
        self.local = 1 if dummy else self.num  # rows this rank's forward carries
        self.total, self.max = sum(counts), max(counts)
        self._rows = None
        if any(c != self.max for c in counts):
            rows = [i * self.max + j for i, c in enumerate(counts) for j in range(c)]
            self._rows = torch.tensor(rows, dtype=torch.int64).to(self.device, non_blocking=True)

    def clear(self) -> None:
        self.counts = []

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """[rows of this rank, ...] on each rank -> [sum of counts, ...] on every rank (rank order)."""
        if x.shape[0] != self.local:
            raise RuntimeError(f"attention DP: {x.shape[0]} rows on rank {self.group.rank_in_group}, the step "
                               f"planned {self.local}")
        x = x[:self.num]
        if self.num < self.max:
            x = F.pad(x, (0, 0) * (x.dim() - 1) + (0, self.max - self.num))
        return self._gather_padded(x, 0)

    def scatter(self, y: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a [sum of counts, ...] result (zeros for a dummy step's token)."""
        if self.local != self.num:
            return y.new_zeros(self.local, *y.shape[1:])
        return y[self.start:self.start + self.num]

    def pad_own(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor):
        """Direct dispatch: this rank's rows padded to the largest rank's count (the all-to-all's
        buffers are sized by it on every rank); padding rows and a dummy token route nowhere (-1)."""
        if self.num < self.local:  # a dummy token: computed, never routed
            ids = torch.full_like(ids, -1)
        pad = self.max - self.local
        if pad > 0:
            x = F.pad(x, (0, 0, 0, pad))
            weights = F.pad(weights, (0, 0, 0, pad))
            ids = F.pad(ids, (0, 0, 0, pad), value=-1)
        return x, weights, ids

    def gather_rows(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Every rank's first `num` rows along `dim` of `t` (at least `max` long there), in rank
        order: [sum of counts] along dim (the expert-load ids of a direct step)."""
        return self._gather_padded(t.narrow(dim, 0, self.max), dim)

    def _gather_padded(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """`t` holds `max` rows along dim on every rank (the real ones first): all ranks' real rows."""
        g = self.group.all_gather(t.contiguous(), dim=dim)
        return g if self._rows is None else g.index_select(dim, self._rows)
