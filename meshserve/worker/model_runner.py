"""ModelRunner: one rank's model shard, its paged KV cache, and one step's forward + sampling.

Input: a SchedulerOutput (the same on every rank; with attention DP each rank runs its own part). A
first pipeline stage embeds tokens; a later stage receives hidden states from the previous one; the
last stage computes logits and its tp-rank 0 samples, returning a ModelRunnerOutput. Other ranks
return None. Attention runs on the rank's attention backend (layers/attention), which builds each
step's metadata; kernel settings are resolved once for this rank's GPU from the user's
kernel_config.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from meshserve import kernels
from meshserve.distributed.comm import SOLO, SOLO_STATE, PipelineChannel
from meshserve.engine.kv_spec import layer_slots, model_kv_groups
from meshserve.engine.messages import ModelRunnerOutput, SchedulerOutput
from meshserve.models.config import ModelConfig
from meshserve.models.loader import build_model, load_weights, plan_fp8
from meshserve.kernels import settings as kernel_settings
from meshserve.layers.attention.backend import AttentionMetadata, AttentionShape
from meshserve.layers.attention.selector import select_attention_backend
from meshserve.layers.sampler import Sampler, SamplingBatch
from meshserve.utils import to_device
from meshserve.worker.input_batch import InputBatch

logger = logging.getLogger(__name__)


@dataclass
class RunnerConfig:
    model_path: str
    device: str
    dtype: torch.dtype
    block_size: int
    max_num_tokens: int
    load_format: str = "auto"
    quantization: Optional[str] = None  # "fp8": linears quantised at load (models/loader.py plan_fp8)
    kv_cache_dtype: str = "auto"  # kv_cache_config.dtype: "auto" (the model's dtype) or "fp8"
    seed: int = 0
    show_progress: bool = True
    attention_backend: str = "auto"  # auto: triton on CUDA, torch elsewhere
    kernel_config: dict = field(default_factory=dict)  # KernelConfig's fields; None: this GPU's default
    cuda_graph_batch_sizes: Optional[list] = None  # None or []: no CUDA graphs
    cuda_graph_prefill_sizes: Optional[list] = None  # token buckets of mixed-step graphs; None or []: eager
    cuda_graph_padding: bool = True  # False: a decode batch replays a graph only at exactly a captured size
    max_batch_size: int = 256
    max_seq_len: int = 4096
    overlap: bool = False  # outputs come back as handles; placeholder inputs read the last step's tokens
    moe_backend: str = "auto"  # moe_config.backend: the expert kernels of models with experts
    # disaggregated serving: cache_transceiver_config's fields (None: off) and the model's identity
    kv_transfer: Optional[dict] = None
    model_id: str = ""
    cp_type: str = "ULYSSES"  # cp_config's cp_type with context parallelism: ULYSSES, RING or HELIX


class BusyWindow:
    """Busy seconds over wall seconds, in windows of about `window_s`."""

    def __init__(self, window_s: float = 1.0):
        self.window_s = window_s
        self.start = time.perf_counter()
        self.busy_s = 0.0
        self.last_fraction: Optional[float] = None

    def add(self, seconds: float) -> None:
        self.busy_s += seconds

    def poll(self) -> Optional[float]:
        """The fraction of the window just closed, or None while the window is still open."""
        now = time.perf_counter()
        if now - self.start < self.window_s:
            return None
        self.last_fraction = min(1.0, self.busy_s / (now - self.start))
        self.start, self.busy_s = now, 0.0
        return self.last_fraction


class PendingOutput:
    """A step's sampled ids on their way to the host: the copy is queued behind the step on the
    device, so the engine can schedule the next step before this one finishes."""

    def __init__(self, step_id: int, req_ids: list[str], tokens: torch.Tensor, lp, want: list, prompt_lp: dict):
        self.step_id, self.req_ids, self.want, self.prompt_lp = step_id, req_ids, want, prompt_lp
        self.event = None
        if tokens.is_cuda:
            tokens = _to_host(tokens)
            lp = None if lp is None else tuple(_to_host(t) for t in lp)
            self.event = torch.cuda.Event()
            self.event.record()
        self.tokens, self.lp = tokens, lp

    def done(self) -> bool:
        """Whether the step has finished on the device (never blocks)."""
        return self.event is None or self.event.query()

    def result(self) -> ModelRunnerOutput:
        if self.event is not None:
            self.event.synchronize()
        out = ModelRunnerOutput(self.step_id, self.req_ids, self.tokens.tolist(), prompt_logprobs=self.prompt_lp)
        if self.lp is not None:
            ids, vals, ranks = (t.tolist() for t in self.lp)
            out.logprobs = [None if k is None else (ids[i][:k + 1], vals[i][:k + 1], ranks[i])
                            for i, k in enumerate(self.want)]
        return out


def _to_host(t: torch.Tensor) -> torch.Tensor:
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


class ModelRunner:
    def __init__(self, model_config: ModelConfig, cfg: RunnerConfig, parallel=None,
                 layer_range: Optional[range] = None):
        """parallel: this rank's ParallelState (None: a one-rank job); layer_range: this pipeline
        stage's layers (None: all)."""
        self.model_config = model_config
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.parallel = parallel or SOLO_STATE
        self.tp_group = self.parallel.attn_tp  # the tp group, or one rank with attention DP
        self.pp_group = PipelineChannel(self.parallel.pp) if self.parallel.pp.size > 1 else SOLO
        pp_rank, pp_size = self.pp_group.rank_in_group, self.pp_group.size
        self.is_first = pp_rank == 0
        self.is_last = pp_rank == pp_size - 1
        # Attention DP (enable_attention_dp): this rank runs its own requests, the part of each
        # SchedulerOutput at its attn_dp rank; the MoE layers gather the slice's tokens (DpTokens)
        m = self.parallel.mapping
        self.dp = m.enable_attention_dp and self.parallel.attn_dp.size > 1
        self.dp_rank = self.parallel.attn_dp.rank_in_group if self.dp else 0
        self.dp_lockstep = self.dp and model_config.is_moe  # every rank must run each step's MoE collectives
        if self.dp:
            from meshserve.layers.dp_attention import DpTokens
            p = self.parallel  # the experts split over exactly the DP ranks: dispatch each rank's own tokens
            direct = p.moe_tp.size == 1 and p.moe_ep.ranks == p.attn_dp.ranks
            self.parallel.dp_tokens = DpTokens(p.attn_dp, self.device, direct=direct)
        # context parallelism: each cp rank takes 1/cp of every step's tokens between attentions;
        # RING also shards the KV cache by sequence: this rank's cache blocks hold 1/cp of each block;
        # HELIX shards it so too but runs every token, the layers after attention over tp x cp
        self.cp_split = None
        self.kv_block_size = cfg.block_size
        # kv_cache_config.dtype fp8: K/V stored as float8_e4m3fn (divided by the checkpoint's calibrated
        # k / v scales, or 1), upcast where attention reads them
        self.kv_dtype = torch.float8_e4m3fn if cfg.kv_cache_dtype == "fp8" else cfg.dtype
        if self.parallel.cp.size > 1:
            from meshserve.layers.context_parallel import CpSplit
            helix = cfg.cp_type == "HELIX"
            self.cp_split = self.parallel.cp_split = CpSplit(self.parallel.cp, ring=cfg.cp_type == "RING",
                                                             helix=helix)
            if self.cp_split.ring:
                self.kv_block_size = cfg.block_size // self.parallel.cp.size
        # samples: tp-rank 0 of the last stage, in the first attention replica (the MoE "replicate"
        # layout runs moe_ep replicas of the attention TP group on the same batch); with attention DP
        # every replica samples its own requests
        self.is_driver = self.is_last and self.tp_group.rank_in_group == 0 and self.parallel.cp.rank_in_group == 0 \
            and (self.dp or self.parallel.attn_dp.rank_in_group == 0)
        self.model = build_model(model_config, self.device, cfg.dtype, self.parallel, layer_range,
                                 self.is_first, self.is_last, moe_backend=cfg.moe_backend)
        # expert load (models with experts): counted on the device, reported by one rank per stage
        self.expert_load = getattr(self.model, "expert_load", None)
        if self.expert_load is not None:  # with attention DP an MoE layer sees the whole slice's tokens
            dp_size = self.parallel.attn_dp.size if self.dp else 1
            self.expert_load.reserve(max(cfg.max_num_tokens, cfg.max_batch_size) * dp_size)
        self.reports_expert_load = self.expert_load is not None and m.tp_rank == 0 and m.attn_dp_rank == 0 \
            and m.cp_rank == 0
        self.expert_reports: list[dict] = []
        fp8 = plan_fp8(self.model, model_config, cfg.model_path, cfg.quantization, cfg.load_format)
        load_weights(self.model, cfg.model_path, cfg.load_format, cfg.seed, cfg.show_progress, fp8)
        self.attn_layers = self.model.attention_layers()
        self.layer_ids = layer_range if layer_range is not None else range(model_config.num_hidden_layers)
        if fp8 is not None:  # an FP8 checkpoint's calibrated KV-cache scales, for an FP8 cache
            fp8.apply_kv_scales(self.layer_ids, self.attn_layers, self.kv_dtype == torch.float8_e4m3fn)
        self.kernel_settings = kernel_settings.for_device(cfg.kernel_config, self.device)
        kernels.configure(self.kernel_settings)  # the fused ops' switch and the skinny-GEMM rows
        a = self.attn_layers[0] if self.attn_layers else None  # a stage without layers plans for nothing
        shape = AttentionShape(a.num_heads, a.num_kv_heads, a.head_dim) if a else AttentionShape(1, 1, 1)
        # with RING / HELIX its blocks are this rank's sub-blocks (kv_block_size tokens)
        if getattr(a, "latent", False):  # latent attention (DeepSeek MLA): its own metadata and kernels
            from meshserve.layers.attention.mla_selector import select_mla_backend
            self.attn_backend = select_mla_backend(cfg.attention_backend, shape, self.kv_block_size, self.device,
                                                   self.kernel_settings)
        else:
            self.attn_backend = select_attention_backend(cfg.attention_backend, shape, self.kv_block_size,
                                                         self.device, self.kernel_settings)
        # KV cache groups (engine/kv_spec.py), formed as the engine forms them: each layer reads its
        # group's block table and shares its cache tensor (slot) with the same-index layer of the others
        self.kv_groups = model_kv_groups(model_config, cfg.max_seq_len, a.num_kv_heads if a else None)
        slots = layer_slots(self.kv_groups)
        self.kv_slots = [slots[i] for i in self.layer_ids]  # (group, slot) of each of attn_layers
        for attn, (group, _) in zip(self.attn_layers, self.kv_slots):
            attn.kv_group = group
        self.batch = InputBatch(cfg.block_size, self.device, model_config.vocab_size, self.attn_backend,
                                self.kv_groups)
        if self.cp_split is not None and self.cp_split.ring:  # attention reads this rank's sub-blocks
            self.batch.ring = (self.cp_split.rank, self.cp_split.size)
        self.graphs = None
        self.prefill_graphs = None
        self.prev_tokens: Optional[torch.Tensor] = None  # last step's sampled ids, on the device
        self.prev_rows: dict[str, int] = {}
        # each attention-DP rank draws its own noise for unseeded requests (the same seed on every
        # rank would give two requests sampled in the same step on two ranks the same draws)
        self.sampler = Sampler(self.device, cfg.seed + 7919 * self.dp_rank)
        self.kv_caches: list[torch.Tensor] = []
        self.kv_transfer = None  # worker/kv_transfer.py RankTransfer, with cfg.kv_transfer, once the cache exists
        self.busy = BusyWindow()  # compute time of this stage, excluding waits for the previous one

    # ---- KV cache -----------------------------------------------------------------------------
    def kv_bytes_per_block(self) -> int:
        """Bytes of one block id on this rank: a block of every cache slot its layers use, sized by
        the slot's spec (a latent layer's token is kv_lora_rank + rope dims, not 2 x heads x dim)."""
        size = torch.empty((), dtype=self.kv_dtype).element_size()
        per_slot = {slot: self.kv_groups[g].spec.bytes_per_token(size) for g, slot in self.kv_slots}
        return self.kv_block_size * sum(per_slot.values())

    def available_kv_blocks(self, free_fraction: float, cpu_budget_bytes: int) -> int:
        """How many blocks this rank can hold: GPU from free memory after a profiling forward of
        `max_num_tokens` tokens; CPU from a fixed byte budget."""
        per_block = max(1, self.kv_bytes_per_block())
        if self.device.type != "cuda":
            return cpu_budget_bytes // per_block
        self.profile_run()
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info(self.device)
        peak_extra = torch.cuda.max_memory_allocated(self.device) - torch.cuda.memory_allocated(self.device)
        return int(max(0, free * free_fraction - peak_extra) // per_block)

    def kernel_config_report(self) -> dict:
        """The kernel settings this rank runs with and the device they were resolved for (/version)."""
        return kernel_settings.describe(self.kernel_settings, self.device)

    def capture_cuda_graphs(self) -> None:
        sizes = self.cfg.cuda_graph_batch_sizes
        if not sizes or self.device.type != "cuda" or self.pp_group.size > 1 \
                or not self.attn_backend.supports_cuda_graphs:
            return
        if self.dp or self.cp_split is not None:  # batches differ per rank / collectives sized per step
            logger.info("CUDA graphs are off with %s: steps run eagerly",
                        "enable_attention_dp" if self.dp else "context parallelism")
            return
        blocks = self.model.moe_blocks() if hasattr(self.model, "moe_blocks") else {}
        eager = sorted({b.experts.backend_name for b in blocks.values()} & {"VANILLA"})
        if eager:  # its per-expert gather reads counts on the host: nothing to capture
            logger.warning("CUDA graphs are off: moe_config.backend %s runs eagerly (TRITON and CUTLASS "
                           "replay in graphs)", eager[0])
            return
        if len(self.kv_groups) > 1:  # the graph runners hold one static block table
            logger.info("CUDA graphs are off: this model has %d KV cache groups", len(self.kv_groups))
            return
        from meshserve.worker.cuda_graph import CudaGraphRunner, PrefillGraphRunner
        pool = torch.cuda.graph_pool_handle()  # one pool: each capture reuses the memory of the last
        # a backend without mixed-step graphs (latent attention) runs steps with prompt tokens eagerly
        if self.cfg.cuda_graph_prefill_sizes and getattr(self.attn_backend, "supports_mixed_graphs", True):
            self.prefill_graphs = PrefillGraphRunner(self, self.cfg.cuda_graph_prefill_sizes,
                                                     self.cfg.max_batch_size, self.cfg.max_seq_len)
            self.prefill_graphs.capture(pool)
        self.graphs = CudaGraphRunner(self, sizes, self.cfg.max_seq_len, self.cfg.cuda_graph_padding)
        self.graphs.capture(pool)

    def init_kv_cache(self, num_blocks: int) -> None:
        self._alloc_kv(num_blocks)
        if self.cfg.cuda_graph_batch_sizes:
            self.capture_cuda_graphs()
        if self.cfg.kv_transfer is not None:
            from meshserve.worker.kv_transfer import RankTransfer, rank_layout
            t = self.cfg.kv_transfer
            self.kv_transfer = RankTransfer([a.kv_cache for a in self.attn_layers],
                                            rank_layout(self, self.cfg.model_id), t["backend"], t["host"],
                                            t.get("max_tokens_in_buffer"),
                                            verify_payload=t.get("verify_payload", "auto"),
                                            cuda_ipc=t.get("cuda_ipc", "auto"))

    def close_kv_transfer(self) -> None:
        if self.kv_transfer is not None:
            self.kv_transfer.close()

    def _alloc_kv(self, num_blocks: int) -> None:
        by_slot: dict[int, torch.Tensor] = {}  # one tensor per cache slot, bound to the layers using it
        for attn, (group, slot) in zip(self.attn_layers, self.kv_slots):
            if slot not in by_slot:
                shape = self.kv_groups[group].spec.cache_shape(num_blocks, self.kv_block_size)
                by_slot[slot] = torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
            attn.kv_cache = by_slot[slot]
        self.kv_caches = list(by_slot.values())

    @torch.no_grad()
    def profile_run(self) -> None:
        """A forward pass over max_num_tokens tokens so peak activation memory is known."""
        n, bs = self.cfg.max_num_tokens, self.cfg.block_size
        kernels.step_tokens(n)
        nblk = -(-n // bs) + 1
        self._alloc_kv(nblk)
        ring_empty = None
        if self.batch.ring is not None:  # RING / HELIX: the metadata over this rank's KV shard
            from meshserve.layers.context_parallel import ring_metadata
            md, ring_empty = ring_metadata(np.arange(n), np.zeros(n, np.int64), np.arange(1, nblk)[None], bs,
                                           *self.batch.ring, self.attn_backend, self.device)
        else:
            md = self.attn_backend.build(AttentionMetadata(
                slot_mapping=torch.arange(bs, bs + n, device=self.device),
                query_start_loc=torch.tensor([0, n], dtype=torch.int32, device=self.device),
                seq_lens=torch.tensor([n], dtype=torch.int32, device=self.device),
                block_tables=torch.arange(1, nblk, dtype=torch.int32, device=self.device)[None],
                max_query_len=n, max_seq_len=n, block_size=bs), [n])
        ids = torch.zeros(n, dtype=torch.int64, device=self.device)
        pos = torch.arange(n, device=self.device) % self.cfg.max_seq_len
        hidden = residual = None
        if not self.is_first:
            rows = -(-n // self.cp_split.size) if self.cp_split is not None and not self.cp_split.helix else n
            hidden = torch.zeros(rows, self.model_config.hidden_size, dtype=self.cfg.dtype, device=self.device)
            residual = torch.zeros_like(hidden)
        if self.dp_lockstep:  # every rank at its largest step: the MoE layers see all their tokens
            self.parallel.dp_tokens.set_step([n] * self.parallel.attn_dp.size)
        if self.cp_split is not None:
            self.cp_split.set_step(n, ring_empty)
        try:
            hidden, _ = self.model(ids, pos, md, hidden, residual)
        finally:
            if self.dp:
                self.parallel.dp_tokens.clear()
        if self.is_last:
            logits = self.model.compute_logits(hidden[-1:])
            if self.is_driver:
                self._dummy_sampler_run(logits)
        self.kv_caches = []
        for attn in self.attn_layers:
            attn.kv_cache = None

    def _dummy_sampler_run(self, logits: torch.Tensor) -> None:
        """Run each sampler path once at start-up (greedy on the model-dtype logits, greedy on fp32
        with logprobs, top-k + top-p and top-p-only draws), so that their kernels compile and load
        here and not in the first user's request, as vLLM's dummy sampler run does. The random
        generator's state is put back: the draws users get do not depend on it."""
        zero, one = torch.zeros(1, device=self.device), torch.ones(1, device=self.device)
        top_k = torch.full((1,), 50, dtype=torch.int64, device=self.device)
        state = self.sampler.generator.get_state()
        try:
            self.sampler(logits, SamplingBatch(temperature=zero, all_greedy=True))
            self.sampler(logits, SamplingBatch(temperature=zero, all_greedy=True, max_num_logprobs=1))
            self.sampler(logits, SamplingBatch(temperature=one, top_k=top_k, max_top_k=50, top_p=one * 0.9))
            self.sampler(logits, SamplingBatch(temperature=one, top_p=one * 0.9))
        finally:
            self.sampler.generator.set_state(state)

    # ---- one step -----------------------------------------------------------------------------
    @torch.no_grad()
    def execute(self, so: SchedulerOutput) -> Optional[ModelRunnerOutput]:
        if self.dp:
            return self._execute_dp(so)
        return self._execute(so)

    def _execute_dp(self, so: SchedulerOutput):
        """Attention DP: run this rank's part of the step (engine/dp_coordinator.py); every DP
        driver answers every step. A rank without requests in a step with work elsewhere runs a
        one-token dummy forward for the MoE layers' collectives (contributing no rows)."""
        part = so.dp[self.dp_rank] if so.dp else SchedulerOutput(so.step_id)
        dp_tokens = self.parallel.dp_tokens
        counts = [sum(r.num_new_tokens for r in p.reqs) for p in so.dp]
        if self.dp_lockstep and any(counts):
            dp_tokens.set_step(counts, dummy=not part.reqs)
        try:
            if part.reqs or not dp_tokens.active:
                return self._execute(part)
            if self.kv_transfer is not None and (part.kv_pulls or part.kv_register or part.kv_unregister):
                self.kv_transfer.on_step(part)  # disaggregated serving: this DP rank's transfers
            self.batch.update(part)
            self._dummy_forward()
            return ModelRunnerOutput(so.step_id) if self.is_driver else None
        finally:
            dp_tokens.clear()

    def _dummy_forward(self) -> None:
        """One token at position 0, its KV written into the null block 0 (never read unmasked)."""
        dev, bs = self.device, self.cfg.block_size
        md = self.attn_backend.build(AttentionMetadata(
            slot_mapping=torch.zeros(1, dtype=torch.int64, device=dev),
            query_start_loc=torch.tensor([0, 1], dtype=torch.int32, device=dev),
            seq_lens=torch.tensor([1], dtype=torch.int32, device=dev),
            block_tables=torch.zeros(1, 1, dtype=torch.int32, device=dev),
            max_query_len=1, max_seq_len=1, block_size=bs), [1])
        ids = torch.zeros(1, dtype=torch.int64, device=dev)
        self.model(ids, torch.zeros_like(ids), md, None, None)
        self._end_expert_step(0)

    def _execute(self, so: SchedulerOutput) -> Optional[ModelRunnerOutput]:
        if self.kv_transfer is not None and (so.kv_pulls or so.kv_register or so.kv_unregister):
            self.kv_transfer.on_step(so)
        self.batch.update(so)
        if not so.reqs:
            return ModelRunnerOutput(so.step_id) if self.is_driver else None
        inp = self.batch.prepare(so)
        kernels.step_tokens(inp.num_tokens)  # eager launches (graphs baked theirs in at capture)
        if inp.placeholders:
            self._fill_placeholders(inp)
        hidden = residual = None
        rows = inp.num_tokens
        if self.cp_split is not None:  # between stages a cp rank's hidden states are its share of the tokens
            self.cp_split.set_step(inp.num_tokens, inp.ring_empty)
            rows = inp.num_tokens if self.cp_split.helix else self.cp_split.chunk
        if not self.is_first:
            hidden, residual = self.pp_group.recv_hidden(rows, self.model_config.hidden_size, self.cfg.dtype,
                                                         self.device)
        t0 = time.perf_counter()
        if self.graphs is not None and not inp.prompt_lp:
            if inp.attn.num_decodes == len(so.reqs):
                if self.graphs.can_run(len(so.reqs)):
                    logits = self.graphs.run(inp)
                    self._end_expert_step(inp.num_tokens)
                    return self._sample(so, inp, logits, {})
            elif self.prefill_graphs is not None:
                key = self.prefill_graphs.bucket(inp)
                if key is not None:
                    logits = self.prefill_graphs.run(inp, key)
                    self._end_expert_step(inp.num_tokens)
                    return self._sample(so, inp, logits, {})
        hidden, residual = self.model(inp.input_ids, inp.positions, inp.attn, hidden, residual)
        self._end_expert_step(inp.num_tokens)
        if not self.is_last:
            self._account(t0)
            self.pp_group.send_hidden(hidden, residual)
            return None
        logits = self.model.compute_logits(hidden[inp.logits_indices])
        prompt_lp = self._prompt_logprobs(hidden, inp) if inp.prompt_lp else {}
        out = self._sample(so, inp, logits, prompt_lp)
        self._account(t0)
        return out

    def _end_expert_step(self, num_tokens: int) -> None:
        if self.expert_load is None:
            return
        if self.dp:  # the MoE layers routed the rows of every DP rank
            dp, ids = self.parallel.dp_tokens, self.expert_load.ids
            num_tokens = dp.total if dp.active else 0
            if num_tokens and dp.direct and ids is not None and dp.group.size * dp.max <= ids.shape[1]:
                ids[:, :dp.total] = dp.gather_rows(ids, dim=1)  # each rank routed its own: count them all
        elif self.cp_split is not None and num_tokens:  # each cp rank routed its share: gather the ids
            split, ids = self.cp_split, self.expert_load.ids
            if ids is not None and split.size * split.chunk <= ids.shape[1]:
                every = self.parallel.cp.all_gather(ids[:, :split.chunk].contiguous(), dim=1)
                ids[:, :split.total] = every[:, :split.total]
        report = self.expert_load.end_step(num_tokens)
        if report is not None and self.reports_expert_load:
            self.expert_reports.append(report)

    def take_expert_reports(self, flush: bool = False) -> list[dict]:
        """Expert-load windows collected since the last call (layers/moe/load.py); with `flush`
        also the steps of the window still open (waits for the device)."""
        if flush and self.reports_expert_load:
            self.expert_reports.extend(self.expert_load.flush())
        reports, self.expert_reports = self.expert_reports, []
        return reports

    def _sample(self, so, inp, logits, prompt_lp):
        """Sample on the driver; with overlap, share the ids with the other tp ranks (their next
        step may read them as placeholders) and return a handle instead of waiting for the copy."""
        if self.is_driver:
            tokens, lp = self.sampler(logits, self.batch.sampling_batch(so))
        else:
            tokens, lp = torch.empty(len(inp.req_ids), dtype=torch.int64, device=self.device), None
        if self.cfg.overlap:
            if self.parallel.attn_dp.size > 1 and not self.dp:  # first to tp-rank 0 of every attention replica
                self.parallel.attn_dp.broadcast(tokens, 0)
            if self.parallel.cp.size > 1:  # the cp ranks run the same batch
                self.parallel.cp.broadcast(tokens, 0)
            if self.tp_group.size > 1:
                self.tp_group.broadcast(tokens, 0)
            self.prev_tokens = tokens
            self.prev_rows = {rid: i for i, rid in enumerate(inp.req_ids)}
        if not self.is_driver:
            return None
        want = [self.batch.reqs[r].sampling.logprobs for r in inp.req_ids]
        pending = PendingOutput(so.step_id, inp.req_ids, tokens, lp, want, prompt_lp)
        return pending if self.cfg.overlap else pending.result()

    def _fill_placeholders(self, inp) -> None:
        dst_list = [i for i, _ in inp.placeholders]
        src_list = [self.prev_rows[r] for _, r in inp.placeholders]
        n = len(dst_list)
        if dst_list == src_list == list(range(n)):
            # The usual decode step: the same requests in the same order as the step before, so the
            # first n inputs are the previous step's first n ids: one device copy instead of two
            # host-to-device index copies and a gather/scatter.
            inp.input_ids[:n].copy_(self.prev_tokens[:n])
            return
        dst = torch.tensor(dst_list, dtype=torch.int64)
        src = torch.tensor(src_list, dtype=torch.int64)
        inp.input_ids[to_device(dst, self.device)] = self.prev_tokens[to_device(src, self.device)]

    def _account(self, t0: float) -> None:
        if self.pp_group.size > 1:  # only pipelines report utilization; it costs a sync on GPU
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.busy.add(time.perf_counter() - t0)

    def _prompt_logprobs(self, hidden: torch.Tensor, inp) -> dict:
        result = {}
        for rid, idx, targets in inp.prompt_lp:
            k = self.batch.reqs[rid].sampling.prompt_logprobs
            logits = self.model.compute_logits(hidden[torch.tensor(idx, device=hidden.device)]).float()
            lps = torch.log_softmax(logits, dim=-1)
            tgt = torch.tensor(targets, device=lps.device)
            chosen = lps.gather(1, tgt[:, None])
            ranks = (lps > chosen).sum(dim=1) + 1  # the prompt token's rank in the vocabulary (vLLM's)
            if k:
                vals, ids = lps.topk(k, dim=-1)
                ids, vals = torch.cat([tgt[:, None], ids], 1), torch.cat([chosen, vals], 1)
            else:
                ids, vals = tgt[:, None], chosen
            result[rid] = list(zip(ids.tolist(), vals.tolist(), ranks.tolist()))
        return result
