"""Assemble an EngineCore from LlmArgs: model config, device, executor, KV pool size."""
from __future__ import annotations

import json
import logging
import os

import torch

from meshserve.config import LlmArgs
from meshserve.engine.engine_core import EngineCore
from meshserve.engine.executor import UniProcExecutor
from meshserve.distributed.launch import detect_launch
from meshserve.engine.scheduler import SchedulerConfig
from meshserve.models.config import ModelConfig
from meshserve.worker.model_runner import RunnerConfig

logger = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = torch.device(device)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was requested but no CUDA device is available")
    return d


def eos_token_ids(model_path: str, model_config: ModelConfig) -> list[int]:
    path = os.path.join(model_path, "generation_config.json")
    if os.path.exists(path):
        with open(path) as f:
            eos = json.load(f).get("eos_token_id")
        if eos is not None:
            return list(eos) if isinstance(eos, list) else [eos]
    return list(model_config.eos_token_ids)


def max_seq_len_for(args: LlmArgs, model_config: ModelConfig) -> int:
    limit = model_config.max_position_embeddings
    if args.max_seq_len is None:
        return limit
    if args.max_seq_len > limit:
        raise ValueError(f"max_seq_len={args.max_seq_len} exceeds the model's max_position_embeddings={limit}")
    return args.max_seq_len


def check_parallel_layout(args: LlmArgs, model_config: ModelConfig) -> None:
    if args.context_parallel_size > 1:
        raise ValueError(f"context_parallel_size={args.context_parallel_size}: context parallelism has not "
                         f"landed yet; use context_parallel_size=1")
    if (args.moe_expert_parallel_size or 1) > 1 or (args.moe_tensor_parallel_size or 1) > 1:
        raise ValueError("moe_expert_parallel_size / moe_tensor_parallel_size: no MoE architecture is "
                         f"supported yet ({model_config.architecture} has no experts); leave them unset")
    if args.enable_attention_dp:
        raise ValueError("enable_attention_dp=True: attention data parallelism has not landed yet")
    if args.cache_transceiver_config is not None:
        raise ValueError("cache_transceiver_config: disaggregated serving (context and generation servers "
                         "handing over the KV cache) has not landed yet; leave it unset")


def check_layout_fits_model(args: LlmArgs, model_config: ModelConfig) -> None:
    """Errors naming the numbers for a tp/pp layout this model cannot be split into."""
    from meshserve.mapping import Mapping

    tp, heads, kv = args.tensor_parallel_size, model_config.num_attention_heads, model_config.num_key_value_heads
    if heads % tp:
        raise ValueError(f"tensor_parallel_size={tp} must divide num_attention_heads={heads}")
    if kv % tp and tp % kv:
        raise ValueError(f"tensor_parallel_size={tp} and num_key_value_heads={kv}: one must divide the other")
    inter = model_config.intermediate_size
    if inter % tp:
        raise ValueError(f"tensor_parallel_size={tp} must divide intermediate_size={inter}")
    Mapping(tp_size=tp, pp_size=args.pipeline_parallel_size, pp_partition=args.pp_partition,
            num_layers=model_config.num_hidden_layers)  # validates pp_size and pp_partition


def runner_config(args: LlmArgs, model_path: str, model_config: ModelConfig, device: torch.device) -> RunnerConfig:
    graph_sizes = prefill_sizes = None
    cg = args.cuda_graph_config
    if device.type == "cuda" and cg is not None and cg.enable:
        from meshserve.worker.cuda_graph import default_batch_sizes, default_prefill_token_sizes
        limit = min(cg.max_batch_size, args.max_batch_size)
        graph_sizes = sorted({b for b in (cg.batch_sizes or default_batch_sizes(limit)) if 1 <= b <= limit})
        tokens = min(cg.prefill_max_tokens, args.max_num_tokens) if cg.enable_padding else 0
        prefill_sizes = sorted({t for t in (cg.prefill_token_sizes or default_prefill_token_sizes(tokens))
                                if 1 <= t <= tokens})
    return RunnerConfig(model_path=model_path, device=str(device),
                        dtype=model_config.torch_dtype(args.dtype, device),
                        block_size=args.kv_cache_config.tokens_per_block, max_num_tokens=args.max_num_tokens,
                        load_format="dummy" if args.load_format == "dummy" else "auto", seed=args.seed,
                        show_progress=args.show_progress, attention_backend=args.attention_backend,
                        cuda_graph_batch_sizes=graph_sizes, cuda_graph_prefill_sizes=prefill_sizes,
                        cuda_graph_padding=cg is not None and cg.enable_padding,
                        max_batch_size=args.max_batch_size, max_seq_len=max_seq_len_for(args, model_config),
                        overlap=args.overlap_scheduler and args.pipeline_parallel_size == 1)


def create_engine_core(args: LlmArgs, model_path: str) -> EngineCore:
    model_config = ModelConfig.from_pretrained(model_path)
    check_parallel_layout(args, model_config)
    device = resolve_device(args.device)
    max_seq_len = max_seq_len_for(args, model_config)
    rcfg = runner_config(args, model_path, model_config, device)
    launch = detect_launch() if args.orchestrator_type != "spawn" else None
    if launch is not None or args.world_size > 1 or args.orchestrator_type == "mp":
        from meshserve.distributed.executor import MultiProcExecutor, check_world, run_external_worker
        check_world(args, device.type, launch)
        check_layout_fits_model(args, model_config)
        if launch is not None and launch.rank != 0:
            run_external_worker(args, model_path, launch)  # serves rank 0, then exits the process
        executor = MultiProcExecutor(args, model_path, launch, device.type)
    else:
        executor = UniProcExecutor(model_config, rcfg)
    try:
        num_blocks = executor.initialize_cache(args.kv_cache_config, args.max_batch_size * max_seq_len)
        if num_blocks < 2:
            raise ValueError(f"no room for the KV cache: {num_blocks} blocks fit; lower max_num_tokens or raise "
                             f"kv_cache_config.free_gpu_memory_fraction")
        sched = SchedulerConfig(args.max_batch_size, args.max_num_tokens, max_seq_len, args.enable_chunked_prefill,
                                overlap=rcfg.overlap)
        core = EngineCore(executor, sched, num_blocks, rcfg.block_size, args.kv_cache_config.enable_block_reuse,
                          model_config.vocab_size, eos_token_ids(model_path, model_config))
    except BaseException:
        executor.shutdown()
        raise
    logger.info("KV cache: %d blocks of %d tokens (%d tokens)", num_blocks, rcfg.block_size,
                (num_blocks - 1) * rcfg.block_size)
    return core
