"""Executors run a SchedulerOutput on every rank and return the sampling rank's ModelRunnerOutput.

`UniProcExecutor`: one rank, in this process. The multi-rank executor (distributed/executor.py)
keeps rank 0 here and the other ranks in their own processes. Both expose `execute_async`, whose
handle's `result()` blocks; the engine keeps a queue of these for pipeline micro-batches.
"""
from __future__ import annotations

import logging


from meshserve.engine.messages import SchedulerOutput
from meshserve.models.config import ModelConfig
from meshserve.worker.model_runner import ModelRunner, RunnerConfig

logger = logging.getLogger(__name__)


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

    def initialize_cache(self, kv_config, max_tokens_needed: int) -> int:
        raise NotImplementedError

    def execute_async(self, so: SchedulerOutput):
        raise NotImplementedError

    def stage_busy_fractions(self) -> list[float]:
        return []

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


class UniProcExecutor(Executor):
    def __init__(self, model_config: ModelConfig, runner_config: RunnerConfig):
        self.runner = ModelRunner(model_config, runner_config)
        self.max_inflight = 2 if runner_config.overlap else 1

    def initialize_cache(self, kv_config, max_tokens_needed: int) -> int:
        available = self.runner.available_kv_blocks(kv_config.free_gpu_memory_fraction,
                                                    int(kv_config.cpu_kv_cache_gb * 2**30))
        blocks = choose_num_blocks(available, kv_config, self.runner.cfg.block_size, max_tokens_needed)
        self.runner.init_kv_cache(blocks)
        return blocks

    def execute_async(self, so: SchedulerOutput):
        out = self.runner.execute(so)
        return out if hasattr(out, "result") else Done(out)
