"""Attention data parallelism, engine side: one scheduler and one KV cache per DP rank.

With `enable_attention_dp` each of the `attn_dp` ranks runs its own requests through replicated
attention (layers/dp_attention.py). `DpScheduler` stands where the `Scheduler` stands in the
EngineCore: it places each new request on one rank (`place`), asks every rank's `Scheduler`
(each over its own `KVCacheManager`, same size: the ranks' KV pools are alike) for its part of
the step, and sends the ranks one `SchedulerOutput` whose `dp` list holds the parts; each rank
runs `dp[its attn_dp rank]`, and the token counts of all parts tell the MoE layers how many rows
every rank brings. All ranks step together (their MoE layers exchange tokens), a rank without
work in a step runs a dummy token. The merged outputs go back to every rank's scheduler, which
reads its own requests' rows.

Placement: the rank with the fewest requests (running + waiting); among ranks within one request
of that, the one holding the longest cached prefix of the prompt, then the most free blocks, then
the lowest rank. `attention_dp_config.enable_balance` (TensorRT-LLM's knob) holds new prompts
back while requests run, so that ranks start prefills in the same step instead of one rank's
prefill stalling the others' decodes: until every rank with room has a prompt waiting, for at
most `timeout_iters` steps, and in any case `batching_wait_iters` steps so that prompts gather.
An idle engine never holds a prompt.
"""
from __future__ import annotations

from collections import ChainMap
from typing import Optional

from meshserve.engine.kv_cache import KVCacheManager
from meshserve.engine.messages import ModelRunnerOutput, SchedulerOutput
from meshserve.engine.request import Request
from meshserve.engine.scheduler import Scheduler, SchedulerConfig


class DpKvView:
    """The DP ranks' KV caches seen as one for the engine's figures; `capacity_tokens` is one
    rank's (a request lives on one rank)."""

    def __init__(self, kvs: list[KVCacheManager]):
        self.kvs = kvs
        self.block_size = kvs[0].block_size
        self.num_blocks = kvs[0].num_blocks  # per rank
        self.specs = kvs[0].specs

    @property
    def capacity_tokens(self) -> int:
        return min(kv.capacity_tokens for kv in self.kvs)

    @property
    def num_free_blocks(self) -> int:
        return sum(kv.num_free_blocks for kv in self.kvs)

    @property
    def num_usable_blocks(self) -> int:
        return sum(kv.num_usable_blocks for kv in self.kvs)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_usable_blocks

    @property
    def prefix_queries(self) -> int:
        return sum(kv.prefix_queries for kv in self.kvs)

    @property
    def prefix_hits(self) -> int:
        return sum(kv.prefix_hits for kv in self.kvs)

    @property
    def prefix_hit_rate(self) -> float:
        q = self.prefix_queries
        return self.prefix_hits / q if q else 0.0

    def reset_prefix_cache(self) -> None:
        for kv in self.kvs:
            kv.reset_prefix_cache()


class DpScheduler:
    """`Scheduler`'s interface over the schedulers of the DP ranks (see the module docstring)."""

    def __init__(self, config: SchedulerConfig, kvs: list[KVCacheManager], enable_balance: bool = False,
                 timeout_iters: int = 50, batching_wait_iters: int = 10):
        self.config = config
        self.ranks = [Scheduler(config, kv) for kv in kvs]
        self.owner: dict[str, int] = {}  # request id -> its DP rank
        self.enable_balance = enable_balance
        self.timeout_iters, self.batching_wait_iters = timeout_iters, batching_wait_iters
        self.held_iters = 0  # steps new prompts have been held back (enable_balance)
        self.num_placed = [0] * len(kvs)  # requests each rank was given since start
        # the views EngineCore reads; disaggregated serving: each rank's scheduler pins, pulls and
        # registers its own requests' KV (its part of the SchedulerOutput tells its ranks)
        self.requests = ChainMap(*[s.requests for s in self.ranks])
        self.pinned = ChainMap(*[s.pinned for s in self.ranks])
        self.kv_pulling = ChainMap(*[s.kv_pulling for s in self.ranks])

    @property
    def kv_waiting(self) -> list[Request]:
        return [r for s in self.ranks for r in s.kv_waiting]

    @property
    def num_waiting(self) -> int:
        return sum(s.num_waiting for s in self.ranks)

    @property
    def num_running(self) -> int:
        return sum(s.num_running for s in self.ranks)

    @property
    def num_preemptions(self) -> int:
        return sum(s.num_preemptions for s in self.ranks)

    def rank_stats(self) -> list[dict]:
        return [{"dp_rank": d, "num_running": s.num_running, "num_waiting": s.num_waiting,
                 "kv_cache_usage": s.kv.usage, "num_requests_placed": self.num_placed[d]}
                for d, s in enumerate(self.ranks)]

    # ---- requests ---------------------------------------------------------------------------------
    def place(self, req: Request) -> int:
        """The DP rank a new request goes to (the module docstring's rule)."""
        loads = [s.num_running + s.num_waiting for s in self.ranks]
        low = min(loads)
        best, best_key = 0, None
        for d, s in enumerate(self.ranks):
            if loads[d] > low + 1:
                continue
            key = (-self._cached_blocks(s.kv, req), loads[d], -s.kv.num_free_blocks, d)
            if best_key is None or key < best_key:
                best, best_key = d, key
        return best

    @staticmethod
    def _cached_blocks(kv: KVCacheManager, req: Request) -> int:
        if not kv.enable_prefix_caching or req.params.prompt_logprobs is not None:
            return 0
        return kv._hit_length(kv._block_hashes(req, (req.num_tokens - 1) // kv.block_size))

    def add_request(self, req: Request) -> None:
        d = self.place(req)
        self.owner[req.request_id] = d
        self.num_placed[d] += 1
        self.ranks[d].add_request(req)

    def abort_request(self, request_id: str) -> Optional[Request]:
        d = self.owner.pop(request_id, None)
        return None if d is None else self.ranks[d].abort_request(request_id)

    # ---- disaggregated serving: each rank's scheduler keeps its own requests' transfers ---------------
    @property
    def kv_timeout_s(self) -> float:
        return self.ranks[0].kv_timeout_s

    @kv_timeout_s.setter
    def kv_timeout_s(self, value: float) -> None:
        for s in self.ranks:
            s.kv_timeout_s = value

    def unpin(self, request_id: str) -> bool:
        return any(s.unpin(request_id) for s in self.ranks)  # a finished context request has no owner left

    def expire_pinned(self, now: Optional[float] = None) -> list[str]:
        return [rid for s in self.ranks for rid in s.expire_pinned(now)]

    def next_pinned_deadline(self) -> Optional[float]:
        return min((d for d in (s.next_pinned_deadline() for s in self.ranks) if d is not None), default=None)

    def pinned_kv(self, request_id: str) -> Optional[dict]:
        """A pinned context request's KV (Scheduler.pinned_kv) with the DP rank that holds it."""
        for d, s in enumerate(self.ranks):
            kv = s.pinned_kv(request_id)
            if kv is not None:
                return {**kv, "dp_rank": d}
        return None

    def pull_done(self, request_id: str, ok: bool, error: Optional[str] = None):
        for s in self.ranks:
            if request_id in s.kv_pulling:
                return s.pull_done(request_id, ok, error)
        return None

    def has_unfinished(self) -> bool:
        return any(s.has_unfinished() for s in self.ranks)

    def has_transfers(self) -> bool:
        return any(s.has_transfers() for s in self.ranks)

    # ---- one step ---------------------------------------------------------------------------------
    def _admit_new(self) -> bool:
        """enable_balance: whether this step may start new prompts (the module docstring)."""
        if not self.enable_balance or not any(s.waiting for s in self.ranks):
            self.held_iters = 0
            return True
        if not any(s.running for s in self.ranks):  # nothing to decode meanwhile: never hold
            self.held_iters = 0
            return True
        with_room = [s for s in self.ranks if s.num_running < self.config.max_batch_size]
        everyone = all(s.waiting for s in with_room)
        if (everyone and self.held_iters >= self.batching_wait_iters) or self.held_iters >= self.timeout_iters:
            self.held_iters = 0
            return True
        self.held_iters += 1
        return False

    def schedule(self, max_seqs: Optional[int] = None) -> SchedulerOutput:
        admit = self._admit_new()
        parts = [s.schedule(max_seqs, admit_new=admit) for s in self.ranks]
        return SchedulerOutput(step_id=parts[0].step_id, dp=parts)

    def carry_over(self, so: SchedulerOutput) -> None:
        for s, part in zip(self.ranks, so.dp):
            s.carry_over(part)

    def update_from_output(self, so: SchedulerOutput, result: ModelRunnerOutput) -> list:
        outputs = []
        rows = dict(zip(result.req_ids, range(len(result.req_ids))))  # built once, not once per rank
        for d, (s, part) in enumerate(zip(self.ranks, so.dp)):
            for out in s.update_from_output(part, result, rows):
                if out.kv_transfer_params is not None:  # context_only: its KV lives on this DP rank's ranks
                    out.kv_transfer_params = {**out.kv_transfer_params, "dp_rank": d}
                outputs.append(out)
        for out in outputs:
            if out.finish_reason is not None:
                self.owner.pop(out.request_id, None)
        return outputs
