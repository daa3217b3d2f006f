"""The executor interface: run a SchedulerOutput on every rank, return the sampling rank's output.

`execute_async` returns a handle whose `result()` blocks; the engine keeps up to `max_inflight`
handles outstanding (decided once, by `inflight_depth`). Implementations: `UniProcExecutor` (one
rank, in this process; uniproc.py) and `MultiProcExecutor` (rank 0 here, the other ranks in
worker processes; multiproc.py).
"""
from __future__ import annotations

from typing import Optional

from meshserve.engine.messages import SchedulerOutput


def inflight_depth(pp_size: int, overlap: bool, pipeline_micro_batches: Optional[int] = None) -> int:
    """Batches the engine keeps outstanding: the pipeline's micro-batches (one per stage unless
    set), 2 with the overlap scheduler (schedule N+1 while N runs), else 1."""
    if pp_size > 1:
        return pipeline_micro_batches or pp_size
    return 2 if overlap else 1


class Done:
    """An already-finished handle."""

    def __init__(self, value):
        self.value = value

    def done(self) -> bool:
        return True

    def result(self):
        return self.value


class Executor:
    max_inflight: int = 1  # batches the engine may have outstanding at once
    pipeline_stages: int = 1  # > 1: in-flight batches are pipeline micro-batches (disjoint requests)
    runner = None  # rank 0's ModelRunner (both executors run rank 0 in the engine's process)

    def kernel_settings(self) -> dict:
        """Rank 0's resolved kernel settings and the device they were resolved for (/version)."""
        return self.runner.kernel_config_report()

    def initialize_cache(self, kv_config, max_tokens_needed: int) -> int:
        raise NotImplementedError

    def execute_async(self, so: SchedulerOutput):
        raise NotImplementedError

    def stage_busy_fractions(self) -> list[float]:
        return []

    def expert_load_reports(self, flush: bool = False) -> list[dict]:
        """Expert-load windows (layers/moe/load.py) every stage reported since the last call;
        `flush` adds rank 0's open window (other ranks report theirs every window of steps)."""
        return self.runner.take_expert_reports(flush) if self.runner is not None else []

    # ---- disaggregated serving (cache_transceiver_config; worker/kv_transfer.py on each rank) -------
    def kv_layouts(self) -> list:
        """Every rank's RankLayout, by rank (the ranks built them with their KV cache)."""
        return [self.runner.kv_transfer.layout]

    def kv_releases(self) -> list[str]:
        """Context requests a generation server released since the last call (rank 0's source hears it)."""
        transfer = self.runner.kv_transfer if self.runner is not None else None
        return transfer.take_releases() if transfer is not None else []

    def kv_pull_results(self) -> list[tuple[str, bool, Optional[str]]]:
        """(request id, ok, error) of the pulls every rank has finished since the last call."""
        transfer = self.runner.kv_transfer if self.runner is not None else None
        return transfer.take_results() if transfer is not None else []

    def kv_release_remote(self, source_rank0, ctx_request_id: str) -> None:
        """Tell a context server (its rank 0's source) that a request's KV may be freed; in the background."""
        transfer = self.runner.kv_transfer if self.runner is not None else None
        if transfer is not None:
            transfer.release_remote(source_rank0, ctx_request_id)

    def check_health(self) -> None:
        """Raise if a worker rank died or reported an error; an idle engine calls it now and then
        (a busy one finds out in its next step), so /health turns 503 without a request."""

    def shutdown(self) -> None:
        pass


def choose_num_blocks(available: int, kv_config, block_size: int, max_tokens_needed: int) -> int:
    """Blocks for the pool: what memory allows, capped by kv_config.max_tokens and by what the
    configured batch could ever use."""
    blocks = available
    if kv_config.max_tokens is not None:
        blocks = min(blocks, -(-kv_config.max_tokens // block_size) + 1)
    blocks = min(blocks, -(-max_tokens_needed // block_size) + 1)
    return blocks
