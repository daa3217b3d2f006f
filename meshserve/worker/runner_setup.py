"""A rank's settings from the user's LlmArgs: its Mapping, device, dtype, sequence limit, CUDA-graph
sizes (RunnerConfig).

Shared by rank 0 (engine/setup.py) and every worker rank (worker/worker.py builds its runner from
the same LlmArgs), so both sides derive identical settings.
"""
from __future__ import annotations

import torch

from meshserve.config import LlmArgs
from meshserve.mapping import Mapping
from meshserve.models.config import ModelConfig
from meshserve.worker.cuda_graph import default_batch_sizes, default_prefill_token_sizes
from meshserve.worker.kv_transfer import model_id
from meshserve.worker.model_runner import RunnerConfig


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = torch.device(device)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was requested but no CUDA device is available")
    return d


def max_seq_len_for(args: LlmArgs, model_config: ModelConfig) -> int:
    limit = model_config.max_position_embeddings
    if args.max_seq_len is None:
        return limit
    if args.max_seq_len > limit:
        raise ValueError(f"max_seq_len={args.max_seq_len} exceeds the model's max_position_embeddings={limit}")
    return args.max_seq_len


def runner_config(args: LlmArgs, model_path: str, model_config: ModelConfig, device: torch.device) -> RunnerConfig:
    graph_sizes = prefill_sizes = None
    cg = args.cuda_graph_config
    if device.type == "cuda" and cg is not None and cg.enable:
        limit = min(cg.max_batch_size, args.max_batch_size)
        graph_sizes = sorted({b for b in (cg.batch_sizes or default_batch_sizes(limit)) if 1 <= b <= limit})
        tokens = min(cg.prefill_max_tokens, args.max_num_tokens) if cg.enable_padding else 0
        prefill_sizes = sorted({t for t in (cg.prefill_token_sizes or default_prefill_token_sizes(tokens))
                                if 1 <= t <= tokens})
    return RunnerConfig(model_path=model_path, device=str(device),
                        dtype=model_config.torch_dtype(args.dtype, device),
                        block_size=args.kv_cache_config.tokens_per_block, max_num_tokens=args.max_num_tokens,
                        load_format="dummy" if args.load_format == "dummy" else "auto", seed=args.seed,
                        quantization=args.quantization, kv_cache_dtype=args.kv_cache_config.dtype,
                        show_progress=args.show_progress, attention_backend=args.attention_backend,
                        kernel_config=args.kernel_config.model_dump(),
                        cuda_graph_batch_sizes=graph_sizes, cuda_graph_prefill_sizes=prefill_sizes,
                        cuda_graph_padding=cg is not None and cg.enable_padding,
                        max_batch_size=args.max_batch_size, max_seq_len=max_seq_len_for(args, model_config),
                        overlap=args.overlap_scheduler and args.pipeline_parallel_size == 1,
                        moe_backend=args.moe_config.backend,
                        kv_transfer=(args.cache_transceiver_config.model_dump()
                                     if args.cache_transceiver_config is not None else None),
                        model_id=(model_id(model_path, model_config, args.load_format, args.seed)
                                  if args.cache_transceiver_config else ""),
                        cp_type=(args.cp_config or {}).get("cp_type", "ULYSSES"))


def mapping_for(args: LlmArgs, model_config: ModelConfig, world_size: int | None = None, rank: int = 0) -> Mapping:
    """The Mapping of the user's parallel sizes (rank 0's when no rank is given)."""
    return Mapping(world_size=world_size, rank=rank, tp_size=args.tensor_parallel_size,
                   pp_size=args.pipeline_parallel_size, cp_size=args.context_parallel_size,
                   moe_tp_size=args.moe_tensor_parallel_size, moe_ep_size=args.moe_expert_parallel_size,
                   enable_attention_dp=args.enable_attention_dp, pp_partition=args.pp_partition,
                   num_layers=model_config.num_hidden_layers)
