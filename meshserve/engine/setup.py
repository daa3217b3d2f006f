"""Assemble an EngineCore from LlmArgs on rank 0: model config, device, executor, KV pool size.

Ranks other than 0 never come here: they enter through worker/main.py.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Optional

import torch

from meshserve.config import AttentionDpConfig, LlmArgs
from meshserve.distributed.launch import LaunchInfo, launch_for  # noqa: F401 - launch_for: its users import it here
from meshserve.engine.engine_core import EngineCore
from meshserve.engine.kv_spec import model_kv_groups
from meshserve.engine.scheduler import SchedulerConfig
from meshserve.executor.base import Executor
from meshserve.executor.multiproc import MultiProcExecutor
from meshserve.executor.uniproc import UniProcExecutor
from meshserve.layers.moe.experts import BACKENDS as EXPERT_BACKENDS
from meshserve.models.config import ModelConfig
from meshserve.worker.runner_setup import mapping_for, max_seq_len_for, resolve_device, runner_config

logger = logging.getLogger(__name__)


def eos_token_ids(model_path: str, model_config: ModelConfig) -> list[int]:
    path = os.path.join(model_path, "generation_config.json")
    if os.path.exists(path):
        with open(path) as f:
            eos = json.load(f).get("eos_token_id")
        if eos is not None:
            return list(eos) if isinstance(eos, list) else [eos]
    return list(model_config.eos_token_ids)


def check_context_parallel(args: LlmArgs, model_config: ModelConfig) -> None:
    """context_parallel_size / cp_config: ULYSSES and RING (layers/context_parallel.py) and what they run with."""
    cp = args.context_parallel_size
    cp_type = (args.cp_config or {}).get("cp_type", "ULYSSES")
    if args.cp_config is not None and cp == 1:
        raise ValueError(f"cp_config={args.cp_config!r} needs context_parallel_size > 1 (it says how the sequence "
                         f"splits over the cp ranks)")
    if cp == 1:
        return
    if cp_type not in ("ULYSSES", "RING", "HELIX"):
        raise ValueError(f"cp_config.cp_type={cp_type}: not supported yet; accepted: ULYSSES, RING, HELIX (STAR's "
                         f"approximate first phase has not landed)")
    ct = args.cache_transceiver_config
    others = [(args.enable_attention_dp, "enable_attention_dp=True"),
              (ct is not None and cp_type == "ULYSSES", f"cp_type {cp_type} and cache_transceiver_config (a "
               f"disaggregated server; accepted: cp_type RING or HELIX, on generation servers)"),
              (ct is not None and ct.backend.upper() == "NIXL", "cache_transceiver_config.backend NIXL (its "
               "reads land in whole blocks; accepted: DEFAULT, UCX, MPI)"),
              (model_config.kv_lora_rank is not None and cp_type == "ULYSSES",
               f"{model_config.architecture}'s latent attention and cp_type {cp_type} (its KV cache has no heads "
               f"to split; accepted: cp_type RING or HELIX, which split it by sequence)")]
    for bad, what in others:
        if bad:
            raise ValueError(f"context_parallel_size={cp} with {what} is not supported yet")
    if cp_type in ("RING", "HELIX"):
        block = args.kv_cache_config.tokens_per_block
        if block % cp:
            raise ValueError(f"kv_cache_config.tokens_per_block={block} must be a multiple of context_parallel_size="
                             f"{cp} with cp_type {cp_type} (each cp rank holds tokens_per_block / cp tokens of every "
                             f"block); accepted: {cp}, {2 * cp}, {4 * cp}, ...")
        windows = sorted({w for w in model_config.sliding_windows if w is not None})
        if windows:
            raise ValueError(f"cp_type {cp_type} with {model_config.architecture}'s sliding-window attention (window "
                             f"{windows[0]}) is not supported yet; accepted: ULYSSES for this model")
        if cp_type == "RING":
            return
        tp = args.tensor_parallel_size
        heads = model_config.num_attention_heads
        if heads % tp == 0 and (heads // tp) % cp:
            raise ValueError(f"context_parallel_size={cp} must divide the {heads // tp} attention heads of each tensor "
                             f"parallel rank with cp_type HELIX (o_proj splits them over tp x cp)")
        inter = model_config.intermediate_size
        dense = not model_config.is_moe or not all(model_config.moe_layers or [True])
        if dense and inter % (tp * cp):
            raise ValueError(f"cp_type HELIX splits the MLP over tensor_parallel_size x context_parallel_size = "
                             f"{tp * cp} ranks: intermediate_size={inter} does not divide by it")
        return
    tp = args.tensor_parallel_size
    heads, kv = model_config.num_attention_heads, model_config.num_key_value_heads
    if heads % tp == 0 and (heads // tp) % cp:
        raise ValueError(f"context_parallel_size={cp} must divide the {heads // tp} attention heads of each tensor "
                         f"parallel rank (num_attention_heads={heads} / tensor_parallel_size={tp})")
    kv_tp = max(1, kv // tp)
    if kv_tp % cp and cp % kv_tp:
        raise ValueError(f"context_parallel_size={cp} and the {kv_tp} KV heads of each tensor parallel rank: one "
                         f"must divide the other")


def check_parallel_layout(args: LlmArgs, model_config: ModelConfig) -> None:
    check_context_parallel(args, model_config)
    moe_sizes = {"moe_expert_parallel_size": args.moe_expert_parallel_size,
                 "moe_tensor_parallel_size": args.moe_tensor_parallel_size}
    if not model_config.is_moe:
        given = {k: v for k, v in moe_sizes.items() if v is not None and v > 1}
        if given:
            raise ValueError(f"{', '.join(f'{k}={v}' for k, v in given.items())}: {model_config.architecture} has no "
                             f"experts; leave them unset (expert parallelism is for mixture-of-experts models)")
    if args.enable_attention_dp:
        if args.pipeline_parallel_size > 1:
            raise ValueError(f"enable_attention_dp=True with pipeline_parallel_size={args.pipeline_parallel_size}: "
                             f"attention DP runs with one pipeline stage for now; use pipeline_parallel_size=1 or "
                             f"turn enable_attention_dp off")
    elif args.attention_dp_config != AttentionDpConfig():
        raise ValueError(f"attention_dp_config={args.attention_dp_config.model_dump()} needs "
                         f"enable_attention_dp=True (it balances the attention DP ranks' requests)")
    if args.cache_transceiver_config is not None:
        check_transfer_backend(args.cache_transceiver_config.backend)
        ctc = args.cache_transceiver_config
        check_transfer_host(ctc.host)
        from meshserve.disagg.mac import mac_threads
        mac_threads()  # MESHSERVE_KV_MAC_THREADS: a bad value is an error now, not in the first verified pull
        world = args.tensor_parallel_size * args.pipeline_parallel_size
        if ctc.backend.upper() == "MPI" and world > 1 and launch_for(args) is None:
            raise ValueError(f"cache_transceiver_config.backend='MPI' with tensor_parallel_size="
                             f"{args.tensor_parallel_size} x pipeline_parallel_size={args.pipeline_parallel_size}: "
                             f"mpirun must start every rank of this server (`-np {world}` for its app), since ranks "
                             f"spawned here would share one MPI rank; alternatives: DEFAULT, NIXL, UCX")
        if ctc.cuda_ipc is True and ctc.backend.upper() != "DEFAULT":
            raise ValueError(f"cache_transceiver_config.cuda_ipc=true: the CUDA IPC path is the DEFAULT backend's; "
                             f"backend={ctc.backend!r} moves the KV its own way (leave cuda_ipc unset, or auto)")
    if args.orchestrator_type == "ray":
        from meshserve.executor.ray import import_ray
        import_ray()  # installed, else the one-line error naming the alternatives
    accepted = ("auto",) + EXPERT_BACKENDS
    if args.moe_config.backend.upper() not in {a.upper() for a in accepted}:
        raise ValueError(f"moe_config.backend={args.moe_config.backend!r} is not supported; accepted: "
                         f"{', '.join(accepted)}")
    if args.moe_config.backend.lower() != "auto" and not model_config.is_moe:
        raise ValueError(f"moe_config.backend={args.moe_config.backend!r}: {model_config.architecture} has no "
                         f"experts; accepted for it: 'auto' (or leave it unset)")
    if args.backend not in (None, "pytorch"):
        raise ValueError(f"backend={args.backend!r} is not supported; accepted: 'pytorch' (or None)")
    check_device_settings(args, model_config)


def check_device_settings(args: LlmArgs, model_config: ModelConfig) -> None:
    """Settings the device cannot honour, refused before the model loads (they were refused only
    when the engine built the model or its KV transfer): TRITON experts without a GPU (or Triton's
    interpreter), `cache_transceiver_config.cuda_ipc: true` without CUDA caches."""
    device = resolve_device(args.device)
    backend = args.moe_config.backend.upper()
    if model_config.is_moe and backend == "TRITON":
        from meshserve.layers.moe.experts import _triton_refusal
        why = _triton_refusal(device)
        if why is not None:
            raise ValueError(f"moe_config.backend={args.moe_config.backend!r} cannot run here: {why}; accepted here: "
                             f"auto, VANILLA, CUTLASS")
    if args.kv_cache_config.dtype == "fp8" and model_config.kv_lora_rank is not None:
        raise ValueError(f"kv_cache_config.dtype='fp8' on {model_config.architecture}: the latent attention's "
                         f"cache and kernels have no FP8 path yet; accepted for this model: auto")
    ctc = args.cache_transceiver_config
    if ctc is not None and ctc.cuda_ipc is True and device.type != "cuda":
        raise ValueError(f"cache_transceiver_config.cuda_ipc=true: the CUDA IPC path moves GPU caches, and this "
                         f"server's are on {device.type}; accepted here: auto or false")


def host_memory_available() -> Optional[int]:
    """Bytes the kernel says a new allocation can take without swapping (MemAvailable), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def model_weight_bytes(model_config: ModelConfig, dtype: torch.dtype) -> int:
    """The bytes of the whole model's parameters and buffers in `dtype`. Built on the CPU and dropped:
    its weights are allocated but never written, so they take address space, not memory (the meta
    device would run the rotary tables' ops through torch's Python references, importing sympy and
    Inductor into the engine process)."""
    from meshserve.models.loader import build_model

    model = build_model(model_config, torch.device("cpu"), dtype)
    try:
        return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    finally:
        del model


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def check_host_memory(args: LlmArgs, model_config: ModelConfig, device: torch.device, launch: Optional[LaunchInfo],
                      available: Optional[int] = None) -> None:
    """On the CPU, when every rank runs on this host: refuse a model whose weights alone exceed the
    memory available, before loading (which would otherwise fill the memory for minutes until the
    kernel kills a rank). Sharding does not shrink the host's total, so the whole model's bytes are
    a lower bound of what the ranks need together. Launched or Ray ranks may span hosts, and FP8
    weights are sized at load: those are not checked."""
    if device.type != "cpu" or launch is not None or args.orchestrator_type == "ray":
        return
    if args.quantization is not None or model_config.fp8_block is not None:
        return
    available = host_memory_available() if available is None else available
    if available is None:
        return
    dtype = model_config.torch_dtype(args.dtype, device)
    name = str(dtype).removeprefix("torch.")
    try:
        need = model_weight_bytes(model_config, dtype)
    except RuntimeError as e:  # one weight alone is more than the kernel lets a process map
        if "can't allocate memory" not in str(e):
            raise
        raise ValueError(f"the model's weights do not fit this host's memory in {name}: one of its tensors alone is "
                         f"more than the {_size(available)} available (MemAvailable) allow; choose a smaller model "
                         f"or run it on GPUs (device='cuda')") from None
    if need <= available:
        return
    half = " or dtype='bfloat16' (half the bytes of float32)," if dtype == torch.float32 else ""
    raise ValueError(f"the model's weights need {_size(need)} in {name} on this host's CPU ranks (together, at "
                     f"least), and this host has {_size(available)} of memory available (MemAvailable): "
                     f"choose a smaller model,{half} or run it on GPUs (device='cuda')")


def check_transfer_backend(backend: str) -> None:
    """cache_transceiver_config.backend: DEFAULT (TCP), NIXL, UCX or MPI, usable here (the wheel is
    installed; MPI: started by mpirun); else a one-line ValueError naming why and the alternatives."""
    from meshserve.disagg import transceiver
    transceiver.check_backend(backend)


def check_transfer_host(host: str) -> None:
    """cache_transceiver_config.host: an address this host can listen on (every rank's KV transfer
    endpoint binds to it once the model is loaded); else a one-line ValueError naming it, before loading."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # as disagg/tcp.py's source binds it
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.bind((host, 0))
    except OSError as e:
        raise ValueError(f"cache_transceiver_config.host={host!r}: the KV transfer endpoints cannot listen there "
                         f"({e.strerror or e}); accepted: an address of this host, such as 127.0.0.1 (the "
                         f"default), one of its interfaces' addresses or names, or 0.0.0.0 (all of them)") from None
    finally:
        sock.close()


def check_layout_fits_model(args: LlmArgs, model_config: ModelConfig) -> None:
    """Errors naming the numbers for a tp/pp layout this model cannot be split into."""
    tp, heads, kv = args.tensor_parallel_size, model_config.num_attention_heads, model_config.num_key_value_heads
    if args.enable_attention_dp:  # attention and dense MLPs are replicated: only the experts split
        tp = 1
    if heads % tp:
        raise ValueError(f"tensor_parallel_size={tp} must divide num_attention_heads={heads}")
    if kv % tp and tp % kv:
        raise ValueError(f"tensor_parallel_size={tp} and num_key_value_heads={kv}: one must divide the other")
    inter = model_config.intermediate_size
    if inter % tp and not all(model_config.moe_layers or [False]):  # dense MLPs split over tp
        raise ValueError(f"tensor_parallel_size={tp} must divide intermediate_size={inter}")
    shared = model_config.shared_expert_intermediate_size
    if shared and shared % tp:
        raise ValueError(f"tensor_parallel_size={tp} must divide shared_expert_intermediate_size={shared}")
    mapping = mapping_for(args, model_config)  # validates pp_size and pp_partition against the layers
    if model_config.is_moe:
        experts, moe_inter = model_config.num_experts, model_config.moe_intermediate_size
        if experts % mapping.moe_ep_size:
            raise ValueError(f"moe_expert_parallel_size={mapping.moe_ep_size} must divide the model's "
                             f"{experts} experts (accepted: {_divisors(experts)})")
        if moe_inter % mapping.moe_tp_size:
            raise ValueError(f"moe_tensor_parallel_size={mapping.moe_tp_size} must divide the experts' "
                             f"intermediate size {moe_inter} (accepted: {_divisors(moe_inter)})")


def _divisors(n: int, most: int = 12) -> str:
    """n's divisors as a list for an error message (the first `most`, then '...')."""
    ds = [d for d in range(1, n + 1) if n % d == 0]
    return ", ".join(map(str, ds[:most])) + (", ..." if len(ds) > most else "")


def describe_layout(mapping, executor) -> str:
    """One line for the startup log: the parallel layout and, for MoE models, the experts' split
    and the backend `moe_config.backend` resolved to (rank 0's)."""
    parts = [f"world {mapping.world_size}: tp {mapping.tp_size} x pp {mapping.pp_size} x cp {mapping.cp_size}"]
    if mapping.enable_attention_dp:
        parts.append(f"attention DP over {mapping.attn_dp_size}")
    model = getattr(getattr(executor, "runner", None), "model", None)
    blocks = model.moe_blocks() if hasattr(model, "moe_blocks") else {}
    if blocks:
        parts.append(f"experts: moe_tp {mapping.moe_tp_size} x ep {mapping.moe_ep_size}, "
                     f"backend {next(iter(blocks.values())).experts.backend_name}")
    return "parallel layout: " + "; ".join(parts)


def no_room_for_kv(args: LlmArgs, device: torch.device, num_blocks: int, block_size: int) -> str:
    """The one-line error for a KV pool of fewer than 2 blocks, naming the setting that sized it."""
    kv = args.kv_cache_config
    if device.type == "cuda":
        where = (f"kv_cache_config.free_gpu_memory_fraction={kv.free_gpu_memory_fraction} of the GPU memory left "
                 f"after the weights and a max_num_tokens={args.max_num_tokens} forward")
        fix = "raise free_gpu_memory_fraction (at most 1.0) or lower max_num_tokens"
    else:
        where = f"kv_cache_config.cpu_kv_cache_gb={kv.cpu_kv_cache_gb} GiB"
        fix = "raise cpu_kv_cache_gb"
    return (f"no room for the KV cache: {num_blocks} blocks of {block_size} tokens fit in {where}; "
            f"at least 2 are needed: {fix}")


def create_executor(args: LlmArgs, model_path: str, model_config: ModelConfig, device: torch.device,
                    launch: Optional[LaunchInfo], log_level: str = "WARNING") -> Executor:
    """One rank in this process, or rank 0 of a multi-process job (spawned here or launched)."""
    world_size = mapping_for(args, model_config).world_size
    if launch is None and world_size == 1 and args.orchestrator_type != "mp":
        if args.orchestrator_type == "ray":
            logger.info("orchestrator_type='ray' with one rank: no worker rank for Ray to start; it runs here")
        return UniProcExecutor(model_config, runner_config(args, model_path, model_config, device))
    check_layout_fits_model(args, model_config)
    if launch is not None and launch.rank != 0:
        raise ValueError(f"rank {launch.rank} of {launch.world_size} ({launch.launcher}) cannot run the engine: "
                         f"only rank 0 does; other ranks enter through meshserve.worker.main.run_launched_rank")
    if args.orchestrator_type == "ray":
        from meshserve.executor.ray import RayExecutor
        return RayExecutor(args, model_path, launch, device.type, world_size, log_level)
    return MultiProcExecutor(args, model_path, launch, device.type, world_size, log_level)


def create_engine_core(args: LlmArgs, model_path: str, launch: Optional[LaunchInfo] = None,
                       log_level: str = "WARNING", tokenizer_path: Optional[str] = None) -> EngineCore:
    """The engine on rank 0; `launch` as from `launch_for(args)`; `log_level` reaches spawned ranks;
    `tokenizer_path`: the tokenizer structured outputs compile against (None: the model's folder,
    unless skip_tokenizer_init)."""
    model_config = ModelConfig.from_pretrained(model_path)
    check_parallel_layout(args, model_config)
    device = resolve_device(args.device)
    kv = args.kv_cache_config
    # against the default, not model_fields_set: the server's engine gets its args as JSON, every field set
    default_fraction = type(kv).model_fields["free_gpu_memory_fraction"].default
    if device.type != "cuda" and kv.free_gpu_memory_fraction != default_fraction:
        logger.warning("kv_cache_config.free_gpu_memory_fraction=%s is ignored on %s: the KV cache there is sized "
                       "by kv_cache_config.max_tokens, else cpu_kv_cache_gb (%s GiB)", kv.free_gpu_memory_fraction,
                       device.type, kv.cpu_kv_cache_gb)
    max_seq_len = max_seq_len_for(args, model_config)
    check_host_memory(args, model_config, device, launch)
    executor = create_executor(args, model_path, model_config, device, launch, log_level)
    block_size = args.kv_cache_config.tokens_per_block
    overlap = args.overlap_scheduler and args.pipeline_parallel_size == 1
    kv_groups = model_kv_groups(model_config, max_seq_len)  # every group holds its own blocks of a request
    try:
        num_blocks = executor.initialize_cache(args.kv_cache_config,
                                               args.max_batch_size * max_seq_len * max(1, len(kv_groups)))
        if num_blocks < 2:
            raise ValueError(no_room_for_kv(args, device, num_blocks, block_size))
        sched = SchedulerConfig(args.max_batch_size, args.max_num_tokens, max_seq_len, args.enable_chunked_prefill,
                                overlap=overlap, policy=args.scheduling_policy)
        mapping = mapping_for(args, model_config)
        dp_size = mapping.attn_dp_size if args.enable_attention_dp else 1
        if args.enable_attention_dp and dp_size == 1:
            logger.info("enable_attention_dp with one rank per MoE slice (tensor_parallel_size=%d): one scheduler, "
                        "as without it", args.tensor_parallel_size)
        core = EngineCore(executor, sched, num_blocks, block_size, args.kv_cache_config.enable_block_reuse,
                          model_config.vocab_size, eos_token_ids(model_path, model_config), kv_groups,
                          max_n=args.max_n, slow_step_ms=args.slow_step_ms,
                          kv_transfer=args.cache_transceiver_config, dp_size=dp_size,
                          attention_dp_config=args.attention_dp_config,
                          tokenizer_path=None if args.skip_tokenizer_init else (tokenizer_path or model_path))
        core.structured.disable_any_whitespace = args.structured_outputs_config.disable_any_whitespace
    except BaseException:
        executor.shutdown()
        raise
    logger.info("%s", describe_layout(mapping, executor))
    per_rank = f" on each of {core.dp_size} attention DP ranks" if core.dp_size > 1 else ""
    logger.info("KV cache: %d blocks of %d tokens (%d tokens for sequences: one block is the null block)%s",
                num_blocks, block_size, (num_blocks - 1) * block_size, per_rank)
    return core
