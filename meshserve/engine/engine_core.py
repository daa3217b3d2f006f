"""EngineCore: scheduler + executor + the one step loop.

`step()` schedules a batch, hands it to the executor, and turns finished batches into
EngineCoreOutputs. Up to `executor.max_inflight` batches may be outstanding (pipeline stages each
working on their own micro-batch); with one, it is the plain synchronous loop. Requests arrive
already tokenized and validated against the model's limits (`validate`).
"""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Optional

from meshserve.executor.base import Executor
from meshserve.engine.kv_cache import KVCacheManager
from meshserve.engine.disagg import context_only_params
from meshserve.engine.dp_coordinator import DpKvView, DpScheduler
from meshserve.engine.messages import DisaggRequest, EngineCoreOutput, EngineCoreRequest
from meshserve.engine.request import Request
from meshserve.engine.scheduler import Scheduler, SchedulerConfig
from meshserve.engine.structured_output import StructuredOutputs
from meshserve.sampling_params import SamplingParams
from meshserve.utils import RateLimitedLog, all_ints

logger = logging.getLogger(__name__)


@dataclass
class EngineLimits:
    vocab_size: int
    max_seq_len: int
    max_num_tokens: int
    enable_chunked_prefill: bool
    kv_capacity_tokens: int
    eos_token_ids: list
    max_n: Optional[int] = None  # most sequences one request may fan out to (SamplingParams.n); None: no cap
    scheduling_policy: str = "fcfs"  # LlmArgs.scheduling_policy: "priority" takes a request's priority


# How much earlier than strictly needed a deferred batch is launched (late launch), on top of
# twice the host time: covers the poll timer's granularity and the period's jitter.
LATE_LAUNCH_SLACK_S = 0.0005


def validate(lim: EngineLimits, prompt_token_ids: list[int], params: SamplingParams,
             resume_output_token_ids=(), kv_capacity: bool = True) -> None:
    """Raise ValueError, naming the field and the numbers, for a request an engine with these
    limits can't run. Used by EngineCore and, with the limits the engine reported, by the API
    server's front (so a bad request fails before it reaches the engine process).
    `resume_output_token_ids`: a resumed request's outputs so far (engine/request.py), counted
    against max_tokens as in the run they come from. `kv_capacity=False` leaves out the check of
    prompt + max_tokens against this engine's KV cache: a context_only request's client params are
    checked so (the whole request must fit max_seq_len, as on the generation server, which would
    refuse it only after this server pinned the prompt's KV; the output's KV is that server's)."""
    n = len(prompt_token_ids)
    if n == 0:
        raise ValueError("prompt is empty: it must contain at least one token")
    # Ints in range, checked in C (all_ints, min, max); the scan below only finds what to name.
    ok = all_ints(prompt_token_ids) and min(prompt_token_ids) >= 0 and max(prompt_token_ids) < lim.vocab_size
    bad = [] if ok else [t for t in prompt_token_ids if not isinstance(t, int) or t < 0 or t >= lim.vocab_size]
    if bad:
        raise ValueError(f"prompt_token_ids contains token id {bad[0]!r} outside the vocabulary "
                         f"(valid ids are 0..{lim.vocab_size - 1})")
    params.validate_for_model(lim.vocab_size, lim.max_n)
    if n >= lim.max_seq_len:
        raise ValueError(f"prompt has {n} tokens, but max_seq_len is {lim.max_seq_len}: "
                         f"the prompt must be shorter to leave room for at least one output token")
    max_tokens = params.max_tokens if params.max_tokens is not None else 1
    if n + max_tokens > lim.max_seq_len:
        raise ValueError(f"prompt ({n} tokens) + max_tokens ({max_tokens}) = {n + max_tokens} tokens exceeds "
                         f"max_seq_len={lim.max_seq_len}; lower max_tokens to at most {lim.max_seq_len - n}")
    if kv_capacity and n + max_tokens > lim.kv_capacity_tokens:
        raise ValueError(f"prompt ({n} tokens) + max_tokens ({max_tokens}) needs {n + max_tokens} KV slots, "
                         f"but the KV cache holds {lim.kv_capacity_tokens}; raise kv_cache_config.max_tokens "
                         f"or lower max_tokens")
    if not lim.enable_chunked_prefill and n > lim.max_num_tokens:
        raise ValueError(f"prompt has {n} tokens, more than max_num_tokens={lim.max_num_tokens}; enable "
                         f"chunked prefill (enable_chunked_prefill=True) or raise max_num_tokens")
    if resume_output_token_ids:
        _validate_resume(lim, n, params, resume_output_token_ids)


def check_priority(lim: EngineLimits, priority) -> None:
    """A request's `priority` (vLLM's: lower runs first), which only scheduling_policy "priority" takes."""
    if isinstance(priority, bool) or not isinstance(priority, int) or not -2**63 <= priority < 2**63:
        raise ValueError(f"priority={priority!r} is invalid: expected an integer (int64; lower runs first)")
    if priority and lim.scheduling_policy != "priority":
        raise ValueError(f"priority={priority}: this engine schedules first come, first served "
                         f"(scheduling_policy={lim.scheduling_policy!r}); start it with scheduling_policy='priority' "
                         f"to use priorities")


def _validate_resume(lim: EngineLimits, n: int, params: SamplingParams, resume) -> None:
    k = len(resume)
    ok = all_ints(resume) and min(resume) >= 0 and max(resume) < lim.vocab_size
    bad = [] if ok else [t for t in resume if not isinstance(t, int) or not 0 <= t < lim.vocab_size]
    if bad:
        raise ValueError(f"resume_output_token_ids contains token id {bad[0]!r} outside the vocabulary "
                         f"(valid ids are 0..{lim.vocab_size - 1})")
    if params.n != 1:
        raise ValueError(f"n={params.n}: a resumed request (resume_output_token_ids) has exactly one sequence")
    limit = min(params.max_tokens or lim.max_seq_len, lim.max_seq_len - n)
    if k >= limit:
        raise ValueError(f"resume_output_token_ids has {k} tokens, but this request may generate {limit} "
                         f"(max_tokens counts the resumed tokens too): nothing is left to generate")
    if n + k + 1 > lim.kv_capacity_tokens:
        raise ValueError(f"prompt ({n} tokens) + resume_output_token_ids ({k}) + one more token needs {n + k + 1} KV "
                         f"slots, but the KV cache holds {lim.kv_capacity_tokens}")
    if not lim.enable_chunked_prefill and n + k > lim.max_num_tokens:
        raise ValueError(f"prompt ({n} tokens) + resume_output_token_ids ({k}) is more than max_num_tokens="
                         f"{lim.max_num_tokens}; enable chunked prefill (enable_chunked_prefill=True) or raise "
                         f"max_num_tokens")


def _find_seq(seq: list[int], sub: list[int]) -> Optional[int]:
    """The index just past the first appearance of `sub` in `seq`, or None."""
    n, i = len(sub), -1
    while True:
        try:
            i = seq.index(sub[0], i + 1)  # C-speed scan to each candidate start
        except ValueError:
            return None
        if seq[i:i + n] == sub:
            return i + n


class EngineCore:
    def __init__(self, executor: Executor, sched_config: SchedulerConfig, num_blocks: int, block_size: int,
                 enable_prefix_caching: bool, vocab_size: int, eos_token_ids: list, kv_groups: Optional[list] = None,
                 max_n: Optional[int] = None, slow_step_ms: float = 1000.0, kv_transfer=None,
                 dp_size: int = 1, attention_dp_config=None, tokenizer_path: Optional[str] = None):
        # kv_groups: the model's KV cache groups (engine/kv_spec.py); None: one full-attention group
        # max_n: LlmArgs.max_n; None: max_batch_size (n sequences beyond one step's batch stall everyone)
        # kv_transfer: LlmArgs.cache_transceiver_config (disaggregated serving); None: refused
        # dp_size > 1: attention DP, a scheduler and KV cache per rank (engine/dp_coordinator.py);
        # attention_dp_config: LlmArgs.attention_dp_config (its balancing knobs)
        # tokenizer_path: the model's tokenizer, which structured outputs compile against (None: refused)
        self.executor = executor
        self.dp_size = dp_size
        if dp_size > 1:
            kvs = [KVCacheManager(num_blocks, block_size, enable_prefix_caching, kv_groups) for _ in range(dp_size)]
            self.kv = DpKvView(kvs)
            dpc = attention_dp_config
            self.scheduler = DpScheduler(sched_config, kvs, **({} if dpc is None else dict(
                enable_balance=dpc.enable_balance, timeout_iters=dpc.timeout_iters,
                batching_wait_iters=dpc.batching_wait_iters)))
        else:
            self.kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching, kv_groups)
            self.scheduler = Scheduler(sched_config, self.kv)
        self.kv_transfer = kv_transfer
        # every rank's RankLayout, rank 0 first (what a context request's opaque_state carries)
        self.kv_layouts: list = executor.kv_layouts() if kv_transfer is not None else []
        if kv_transfer is not None:
            self.scheduler.kv_timeout_s = kv_transfer.kv_transfer_timeout_ms / 1000
        self.kv_events = 0  # KV handovers done (pins released, pulls finished): the caller reports stats
        self.limits = EngineLimits(vocab_size, sched_config.max_seq_len, sched_config.max_num_tokens,
                                   sched_config.enable_chunked_prefill, self.kv.capacity_tokens,
                                   list(eos_token_ids), max_n or sched_config.max_batch_size, sched_config.policy)
        # structured outputs: xgrammar over the model's tokenizer (loaded from tokenizer_path on first use;
        # LLM hands its own over as `structured.tokenizer`)
        self.structured = StructuredOutputs(vocab_size, list(eos_token_ids), tokenizer_path)
        self.batch_queue: deque = deque()
        # Time from a batch's launch (or the previous batch's completion, when the launch came while
        # that one still ran) to its outputs: with batches in flight, the period between outputs.
        self.iteration_latency_s = 0.0
        self.num_iterations = 0
        # a step slower than this is logged with its shape at INFO, one line per 30 s at most
        # (LlmArgs.slow_step_ms, serve --slow_step_ms; 0 = never): on a busy CPU every step may be slow
        self.slow_step_s = slow_step_ms / 1000
        self._slow_step_log = RateLimitedLog(logger)
        self._last_done = 0.0
        # Late launch (overlap scheduler, server): hold the next batch back until shortly before the
        # running one is due to finish, so that requests arriving meanwhile join it instead of the
        # batch after. defer_until: when the caller should call step() again (0: no deferral).
        self.late_launch = False
        self.defer_until = 0.0
        # expert load of MoE models: tokens routed per expert per layer since start, and the
        # max/mean load ratio of the last reported window (layers/moe/load.py)
        self.expert_tokens: dict[int, list[int]] = {}
        self.expert_load_ratio: dict[str, float] = {}
        self._periods: deque = deque(maxlen=8)  # recent launch-to-output periods
        self._host_s: deque = deque(maxlen=8)  # recent schedule + launch host times

    # ---- requests -------------------------------------------------------------------------------
    def validate(self, prompt_token_ids: list[int], params: SamplingParams, resume_output_token_ids=(),
                 kv_capacity: bool = True) -> None:
        validate(self.limits, prompt_token_ids, params, resume_output_token_ids, kv_capacity)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    arrival_time: Optional[float] = None, disagg: Optional[DisaggRequest] = None,
                    resume_output_token_ids=(), cache_salt: Optional[str] = None, priority: int = 0) -> None:
        """`resume_output_token_ids`: the outputs of an earlier run of this request, which this one
        continues as that run would have (engine/request.py); `params` are that run's, max_tokens
        and min_tokens counting from its start. `cache_salt`: its prefix is reused only by requests
        of the same salt. `priority`: its place under scheduling_policy "priority" (lower first)."""
        check_priority(self.limits, priority)
        if request_id in self.scheduler.requests or request_id in self.scheduler.pinned:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if disagg is not None:
            if resume_output_token_ids:
                raise ValueError("resume_output_token_ids and disaggregated_params do not go together")
            params = self._check_disagg(prompt_token_ids, params, disagg)
        self.validate(prompt_token_ids, params, resume_output_token_ids)
        req = Request(request_id, prompt_token_ids, params, self.limits.eos_token_ids, self.limits.max_seq_len,
                      arrival_time, disagg, resume_output_token_ids, cache_salt, priority)
        if params.structured_outputs is not None:
            stops = list(dict.fromkeys(req.eos_token_ids + params.stop_token_ids))
            feed = self._grammar_start(req, params.structured_outputs.reasoning_end_token_ids)
            req.grammar = self.structured.state(params.structured_outputs, stops, feed)
        self.scheduler.add_request(req)
        if disagg is not None:
            logger.info("request %s: %s, %d prompt tokens%s", request_id, disagg.kind, len(prompt_token_ids),
                        f", KV from {disagg.sources[0].endpoint} ({disagg.ctx_request_id})"
                        if disagg.kind == "generation_only" else "")

    @staticmethod
    def _grammar_start(req: Request, end: Optional[list]) -> list[int]:
        """The outputs the new matcher must take. A reasoning model's grammar (`end`: the tokens that
        end its thinking) holds from after their first appearance in the outputs, or from the start
        when the prompt holds them already (as vLLM decides)."""
        if not end or _find_seq(req.prompt_token_ids, end) is not None:
            return req.output_token_ids
        req.grammar_after = list(end)
        k = _find_seq(req.output_token_ids, end)
        req.grammar_active = k is not None
        return req.output_token_ids[k:] if k is not None else []

    def _check_disagg(self, prompt_token_ids: list[int], params: SamplingParams,
                      disagg: DisaggRequest) -> SamplingParams:
        if self.kv_transfer is None:
            raise ValueError("disaggregated_params needs cache_transceiver_config, which this engine was "
                             "started without")
        if params.n != 1:
            raise ValueError(f"n={params.n}: a {disagg.kind} request has exactly one sequence")
        if disagg.kind == "context_only":
            # the prompt and the first token (its EOS still banned under min_tokens); a generation server does the rest
            return context_only_params(params)
        if disagg.kind != "generation_only":
            raise ValueError(f"disaggregated_params.request_type={disagg.kind!r}: expected context_only or "
                             f"generation_only")
        if not disagg.sources:
            raise ValueError("a generation_only request needs the context server's rank layouts")
        if disagg.src_num_tokens != len(prompt_token_ids):
            raise ValueError(f"the context server holds KV of {disagg.src_num_tokens} tokens, but the prompt has "
                             f"{len(prompt_token_ids)}")
        if params.prompt_logprobs is not None and disagg.prompt_logprobs is None:
            raise ValueError("prompt_logprobs: a generation_only request does not compute its prompt; its context "
                             "server's params must carry them")
        if params.logprobs is not None and disagg.first_logprobs is None:
            raise ValueError("logprobs: the context server's params carry no logprobs of the first token")
        return params

    def add_core_request(self, req: EngineCoreRequest) -> None:
        self.add_request(req.request_id, req.prompt_token_ids, SamplingParams(**req.params), req.arrival_time or None,
                         req.disagg, req.resume_output_token_ids, req.cache_salt, req.priority)

    def abort_requests(self, request_ids) -> list[EngineCoreOutput]:
        outs = []
        for rid in request_ids:
            if self.scheduler.abort_request(rid) is not None:
                outs.append(EngineCoreOutput(rid, finish_reason="abort"))
            elif rid in self.scheduler.pinned and self.scheduler.unpin(rid):  # e.g. its token hit a stop string
                self.kv_events += 1
                logger.info("request %s: pinned KV released (aborted)", rid)
        return outs

    def reset_prefix_cache(self) -> bool:
        """vLLM's: forget every cached prefix block, so the next prompts are computed from scratch (a
        benchmark's runs independent of each other). Only when no request holds a KV block (nothing
        running, pinned or pulling): a held block would stay cached and the reset be partial, so
        then nothing changes and the answer is False."""
        held = self.kv.num_usable_blocks - self.kv.num_free_blocks
        if held or self.batch_queue:
            logger.warning("the prefix cache was not reset: requests hold KV blocks (%d in use, %d steps in flight)",
                           held, len(self.batch_queue))
            return False
        self.kv.reset_prefix_cache()
        logger.info("prefix cache reset")
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self.batch_queue)

    def has_transfers(self) -> bool:
        """KV handovers are pending (pinned context KV, pulls): `step()` should be called now and
        then even while `has_unfinished()` is False (see `transfer_poll_s`)."""
        return self.scheduler.has_transfers()

    def transfer_poll_s(self) -> Optional[float]:
        """How often an otherwise idle loop should call `step()` for the pending KV handovers
        (None: nothing pending): often while pulls run, rarely while only pinned KV waits."""
        sched = self.scheduler
        if sched.kv_pulling or sched.kv_waiting:
            return 0.002
        if sched.pinned:
            deadline = sched.next_pinned_deadline()
            return max(0.001, min(0.05, deadline - time.monotonic()))
        return None

    # ---- disaggregated serving ---------------------------------------------------------------------
    def _poll_transfers(self) -> list[EngineCoreOutput]:
        """Releases from generation servers, expired pins, and finished pulls (their outputs)."""
        sched = self.scheduler
        outputs = []
        if sched.pinned:
            for rid in self.executor.kv_releases():
                if sched.unpin(rid):
                    self.kv_events += 1
                    logger.info("request %s: KV released by the generation server", rid)
            for rid in sched.expire_pinned():
                self.kv_events += 1
                logger.warning("request %s: KV released after kv_transfer_timeout_ms=%d without a release from a "
                               "generation server", rid, self.kv_transfer.kv_transfer_timeout_ms)
        if sched.kv_pulling:
            for rid, ok, error in self.executor.kv_pull_results():
                req = sched.kv_pulling.get(rid)
                if req is None:
                    continue
                d = req.disagg
                out = sched.pull_done(rid, ok, error)
                self.kv_events += 1
                if ok:
                    logger.info("request %s: KV of %d tokens pulled from %s", rid, d.src_num_tokens,
                                d.sources[0].endpoint)
                else:
                    logger.warning("request %s: KV transfer from %s failed: %s", rid, d.sources[0].endpoint, error)
                if out is not None:
                    outputs.append(out)
                self.executor.kv_release_remote(d.release_to or d.sources[0], d.ctx_request_id)
        return outputs

    # ---- the loop ---------------------------------------------------------------------------------
    def step(self) -> list[EngineCoreOutput]:
        if not self.scheduler.has_transfers():
            return self._step()
        outputs = self._poll_transfers()
        return outputs + self._step() if outputs else self._step()

    def _step(self) -> list[EngineCoreOutput]:
        scheduled = False
        self.defer_until = 0.0
        if len(self.batch_queue) < self.executor.max_inflight and self.scheduler.has_unfinished():
            if self.late_launch and self._defer_launch():
                return []
            depth = self.executor.max_inflight
            cap = None
            if self.executor.pipeline_stages > 1:  # share the requests out over the micro-batches
                active = self.scheduler.num_running + self.scheduler.num_waiting
                cap = max(1, -(-min(active, self.scheduler.config.max_batch_size) // depth))
            t0 = time.perf_counter()
            so = self.scheduler.schedule(cap)
            if so.has_work():  # a step with no requests may still tell the ranks of KV handovers
                self.batch_queue.append((so, self.executor.execute_async(so), t0))
                self._host_s.append(time.perf_counter() - t0)
                scheduled = True
            elif so.finished_req_ids:
                self.scheduler.carry_over(so)  # deliver with the next batch
        if not self.batch_queue:
            return []
        if scheduled and len(self.batch_queue) < self.executor.max_inflight:
            return []  # keep filling the pipeline before waiting on the oldest batch
        so, handle, t0 = self.batch_queue.popleft()
        result = handle.result()
        done = time.perf_counter()
        self.iteration_latency_s = done - max(t0, self._last_done)
        if self.slow_step_s and self.iteration_latency_s >= self.slow_step_s:
            reqs = so.all_reqs()
            tokens = sum(r.num_new_tokens for r in reqs)
            self._slow_step_log("step %d took %.1f ms: %d sequences, %d tokens (%d in steps of one), "
                                "%d running, %d waiting", so.step_id, self.iteration_latency_s * 1000,
                                len(reqs), tokens, sum(r.num_new_tokens == 1 for r in reqs),
                                self.scheduler.num_running, self.scheduler.num_waiting)
        self._periods.append(self.iteration_latency_s)
        self._last_done = done
        outputs = self.scheduler.update_from_output(so, result)
        self.num_iterations += 1
        return outputs

    def _defer_launch(self) -> bool:
        """Whether to hold the next batch back for now (late launch; sets defer_until). Only while
        one batch runs, nobody waits to be admitted, and the running batch is known to be unfinished:
        it is due at its start plus the shortest recent period; the next batch must be launched
        before that by twice the longest recent host time plus LATE_LAUNCH_SLACK_S."""
        if (self.executor.pipeline_stages > 1 or len(self.batch_queue) != 1 or self.scheduler.num_waiting
                or len(self._periods) < 3):
            return False
        _, handle, launched = self.batch_queue[0]
        finished = getattr(handle, "done", None)
        if finished is None or finished():
            return False
        until = (max(launched, self._last_done) + min(self._periods) - 2 * max(self._host_s)
                 - LATE_LAUNCH_SLACK_S)
        if time.perf_counter() >= until:
            return False
        self.defer_until = until
        return True

    def _fold_expert_load(self, flush: bool = False) -> list[dict]:
        reports = self.executor.expert_load_reports(flush)
        for rep in reports:
            for layer, counts in zip(rep["layers"], rep["tokens"]):
                have = self.expert_tokens.setdefault(layer, [0] * len(counts))
                self.expert_tokens[layer] = [a + b for a, b in zip(have, counts)]
            self.expert_load_ratio = {"mean": rep["ratio_mean"], "max": rep["ratio_max"],
                                      "experts_hit_mean": rep.get("experts_hit_mean", 0.0)}
        return reports

    def stats(self) -> dict:
        """The engine's figures; `expert_load_reports` holds the expert-load windows that arrived
        since the previous call (the server adds them to its counters), `expert_tokens` the totals.
        Once the engine has nothing left to run, rank 0's open window is flushed too, so /metrics
        counts every step of a burst of requests without waiting for the next window to fill."""
        reports = self._fold_expert_load(flush=not self.batch_queue and not self.has_unfinished())
        extra = {}
        if reports:
            extra["expert_load_reports"] = reports
        if self.expert_tokens:
            extra["expert_load_ratio"] = self.expert_load_ratio
        if self.dp_size > 1:
            extra["attention_dp_ranks"] = self.scheduler.rank_stats()
        return extra | {
            "num_running": self.scheduler.num_running,
            "num_waiting": self.scheduler.num_waiting,
            "num_waiting_for_kv": len(self.scheduler.kv_waiting) + len(self.scheduler.kv_pulling),
            "num_pinned_kv": len(self.scheduler.pinned),
            "kv_cache_usage": self.kv.usage,
            "num_free_blocks": self.kv.num_free_blocks,
            "num_blocks": self.kv.num_usable_blocks,
            "prefix_cache_hit_rate": self.kv.prefix_hit_rate,
            "prefix_cache_queries": self.kv.prefix_queries,
            "prefix_cache_hits": self.kv.prefix_hits,
            "num_preemptions": self.scheduler.num_preemptions,
            "iteration_latency_s": self.iteration_latency_s,
            "num_iterations": self.num_iterations,
            "pipeline_stage_busy_fraction": self.executor.stage_busy_fractions(),
        }

    def expert_load(self) -> dict:
        """Tokens routed to each expert, per MoE layer, since the engine started ({} for dense models)."""
        if not self.batch_queue:  # nothing in flight: rank 0's open window can be read now
            self._fold_expert_load(flush=True)
        return {"tokens": {layer: list(c) for layer, c in sorted(self.expert_tokens.items())},
                "ratio": dict(self.expert_load_ratio)} if self.expert_tokens else {}

    def shutdown(self) -> None:
        self.executor.shutdown()
