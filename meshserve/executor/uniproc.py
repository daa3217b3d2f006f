"""UniProcExecutor: a one-rank job, its ModelRunner in the engine's own process."""
from __future__ import annotations

from meshserve.executor.base import Done, Executor, choose_num_blocks, inflight_depth
from meshserve.engine.messages import SchedulerOutput
from meshserve.models.config import ModelConfig
from meshserve.worker.model_runner import ModelRunner, RunnerConfig


class UniProcExecutor(Executor):
    def __init__(self, model_config: ModelConfig, runner_config: RunnerConfig):
        self.runner = ModelRunner(model_config, runner_config)
        self.max_inflight = inflight_depth(1, runner_config.overlap)

    def initialize_cache(self, kv_config, max_tokens_needed: int) -> int:
        available = self.runner.available_kv_blocks(kv_config.free_gpu_memory_fraction,
                                                    int(kv_config.cpu_kv_cache_gb * 2**30))
        blocks = choose_num_blocks(available, kv_config, self.runner.cfg.block_size, max_tokens_needed)
        self.runner.init_kv_cache(blocks)
        return blocks

    def execute_async(self, so: SchedulerOutput):
        out = self.runner.execute(so)
        return out if hasattr(out, "result") else Done(out)

    def shutdown(self) -> None:
        self.runner.close_kv_transfer()
