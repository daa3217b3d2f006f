"""Batched sampling on the device.

Order (as HF's logits processors): logit bias, min-tokens masking, repetition / presence /
frequency penalties, then temperature, top-k, top-p, min-p, and a draw by the exponential race
(argmax of p / q with q ~ Exp(1)), which samples exactly from p with one random number per token.
Rows with temperature 0 take the argmax. A seeded request draws its noise from its own generator,
reseeded from (seed, number of tokens generated so far), so its output does not depend on what
else is in the batch, nor on preemption, nor on a failover (a resumed request counts the tokens it
was given back as generated: engine/request.py). Logprobs are of the raw model distribution.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from meshserve.kernels import use_triton

_MIX = 0x9E3779B97F4A7C15


def seed_for_step(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step * _MIX + 12345) & 0x7FFF_FFFF_FFFF_FFFF


@dataclass
class SamplingBatch:
    temperature: torch.Tensor  # [B] float32; 0 means greedy
    top_k: Optional[torch.Tensor] = None  # [B] int64; vocab size where disabled
    max_top_k: int = 0  # host copy of top_k.max(): reading it from the device would stall the host
    top_p: Optional[torch.Tensor] = None  # [B] float32
    min_p: Optional[torch.Tensor] = None  # [B] float32
    all_greedy: bool = False
    # penalties and biases, present only when some row uses them
    repetition_penalty: Optional[torch.Tensor] = None  # [B]
    presence_penalty: Optional[torch.Tensor] = None  # [B]
    frequency_penalty: Optional[torch.Tensor] = None  # [B]
    output_counts: Optional[torch.Tensor] = None  # [B, V] how often each token was generated
    seen_mask: Optional[torch.Tensor] = None  # [B, V] token appears in prompt or output
    logit_bias: Optional[torch.Tensor] = None  # [B, V] added to the logits
    banned_mask: Optional[torch.Tensor] = None  # [B, V] True: -inf (min_tokens stop ids)
    seeded_rows: list = field(default_factory=list)  # [(row, seed for this step)]
    max_num_logprobs: int = -1  # -1: none wanted


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    """Row argmax (first maximal index): the two-kernel Triton version on CUDA, else torch."""
    if use_triton(logits) and logits.dim() == 2:
        from meshserve.kernels.fused import argmax_rows
        return argmax_rows(logits)
    return logits.argmax(dim=-1)


def _changes_logits(b: SamplingBatch) -> bool:
    return (b.logit_bias is not None or b.banned_mask is not None or b.repetition_penalty is not None
            or b.frequency_penalty is not None)


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0):
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.row_generator = torch.Generator(device=device)

    @torch.no_grad()
    def __call__(self, logits: torch.Tensor, b: SamplingBatch):
        """logits: [B, V]. Returns (token ids [B] int64, (topk ids [B, k+1], logprobs [B, k+1], the chosen
        token's rank in the vocabulary [B], 1 = the likeliest) or None)."""
        if b.all_greedy and b.max_num_logprobs < 0 and not _changes_logits(b):
            # The argmax of the model's own dtype: widening to fp32 is exact, so the same ids, one
            # kernel fewer per decode step.
            return _argmax(logits), None
        logits = logits.float()
        raw_logprobs = torch.log_softmax(logits, dim=-1) if b.max_num_logprobs >= 0 else None
        logits = self._apply_penalties(logits, b)
        greedy = _argmax(logits)
        if b.all_greedy:
            tokens = greedy
        else:
            tokens = torch.where(b.temperature < 1e-5, greedy, self._draw(logits, b))
        lp = None
        if raw_logprobs is not None:
            chosen = raw_logprobs.gather(1, tokens[:, None])
            rank = (raw_logprobs > chosen).sum(dim=1) + 1  # vLLM's: ties share the better rank
            if b.max_num_logprobs > 0:
                top_vals, top_ids = raw_logprobs.topk(b.max_num_logprobs, dim=-1)
                lp = (torch.cat([tokens[:, None], top_ids], 1), torch.cat([chosen, top_vals], 1), rank)
            else:
                lp = (tokens[:, None], chosen, rank)
        return tokens, lp

    def _apply_penalties(self, logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
        if b.logit_bias is not None:
            logits = logits + b.logit_bias
        if b.banned_mask is not None:
            logits = logits.masked_fill(b.banned_mask, float("-inf"))
        if b.repetition_penalty is not None:
            rp = b.repetition_penalty[:, None]
            penalized = torch.where(logits > 0, logits / rp, logits * rp)
            logits = torch.where(b.seen_mask, penalized, logits)
        if b.frequency_penalty is not None:
            counts = b.output_counts
            logits = logits - b.frequency_penalty[:, None] * counts
            logits = logits - b.presence_penalty[:, None] * (counts > 0).to(logits.dtype)
        return logits

    def _draw(self, logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
        temp = torch.where(b.temperature < 1e-5, torch.ones_like(b.temperature), b.temperature)
        logits = logits / temp[:, None]
        if b.top_p is not None and b.top_k is not None and b.max_top_k < logits.shape[-1]:
            logits = self._top_p_within_top_k(logits, b.top_k, b.top_p, b.max_top_k)
        elif b.top_p is not None:
            logits = self._top_k_top_p(logits, b.top_k, b.top_p)
        elif b.top_k is not None:
            logits = self._top_k_only(logits, b.top_k, b.max_top_k or logits.shape[-1])
        probs = torch.softmax(logits, dim=-1)
        if b.min_p is not None:
            keep = probs >= b.min_p[:, None] * probs.max(dim=-1, keepdim=True).values
            probs = torch.where(keep, probs, torch.zeros_like(probs))
        q = torch.empty_like(probs).exponential_(generator=self.generator)
        for row, seed in b.seeded_rows:
            self.row_generator.manual_seed(seed)
            q[row].exponential_(generator=self.row_generator)
        return (probs / q).argmax(dim=-1)

    @staticmethod
    def _top_k_only(logits: torch.Tensor, top_k: torch.Tensor, max_k: int) -> torch.Tensor:
        """Top-k without sorting the vocabulary: the k-th largest value per row from one topk of
        the batch's largest k, then a threshold (ties at the threshold are kept, as HF does)."""
        if max_k >= logits.shape[-1]:
            return logits
        values = logits.topk(max_k, dim=-1).values  # [B, max_k], descending
        kth = values.gather(1, (top_k.clamp(max=max_k) - 1)[:, None])
        return logits.masked_fill(logits < kth, float("-inf"))

    @staticmethod
    def _top_p_within_top_k(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, max_k: int):
        """Top-k then top-p when every row's k is at most `max_k` < vocab (HF's own defaults, k=50 with
        p): only the batch's largest `max_k` logits per row are sorted (one topk), not the vocabulary;
        every other token is outside top-k anyway. Same result as `_top_k_top_p`."""
        vals, idx = logits.topk(max_k, dim=-1)  # [B, max_k], descending
        return Sampler._mask_sorted(logits, vals, idx, top_k, top_p)

    @staticmethod
    def _top_k_top_p(logits: torch.Tensor, top_k: Optional[torch.Tensor], top_p: Optional[torch.Tensor]):
        """Top-p (after top-k, if any) by sorting the whole vocabulary: the path for rows without a
        top-k, whose top-p set can be any size."""
        vals, idx = logits.sort(dim=-1, descending=True)
        return Sampler._mask_sorted(logits, vals, idx, top_k, top_p)

    @staticmethod
    def _mask_sorted(logits: torch.Tensor, vals: torch.Tensor, idx: torch.Tensor, top_k: Optional[torch.Tensor],
                     top_p: Optional[torch.Tensor]) -> torch.Tensor:
        """`vals` (at vocabulary ids `idx`): each row's best logits, descending. Drops ranks past the
        row's top-k and tokens whose better tokens already hold top-p of the mass; returns full-vocab
        logits with every other token at -inf."""
        if top_k is not None:
            ranks = torch.arange(vals.shape[-1], device=vals.device)
            vals = vals.masked_fill(ranks[None, :] >= top_k[:, None], float("-inf"))
        if top_p is not None:
            probs = vals.softmax(dim=-1)
            before = probs.cumsum(dim=-1) - probs  # mass of the better tokens
            drop = before >= top_p[:, None]
            drop[:, 0] = False
            vals = vals.masked_fill(drop, float("-inf"))
        return torch.full_like(logits, float("-inf")).scatter(1, idx, vals)
