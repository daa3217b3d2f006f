"""Scheduler: decides, each step, which requests run and how many tokens each computes.

No prefill/decode phases: every request has `num_computed_tokens` chasing `num_tokens`, and a step
hands out a token budget (`max_num_tokens`) and a sequence budget (`max_batch_size`): running
requests first (in arrival order), then waiting ones. Chunked prefill, prefix reuse and
preemption-by-recompute (free the newest request's blocks, put it back at the head of the queue)
fall out of that one loop. Requests still in flight in an earlier micro-batch (pipeline) are
skipped. Pure Python: no torch.

Disaggregated serving (docs/disaggregated.md): a context_only request runs its prompt and one token;
the step that completes its prompt registers its blocks with every rank's KV source, and when it
finishes by length (its first token did not end it) its blocks stay allocated ("pinned", keyed by its
request id) until `unpin` (the generation server's release, or an abort) or `expire_pinned`
(kv_transfer_timeout_ms). A generation_only request waits in
`kv_waiting` until blocks for its prompt fit, then a `KvPull` in the next SchedulerOutput has every
rank read its KV; `pull_done` (all ranks reported) makes it a running request with its prompt
computed and the context server's first token appended, or frees its blocks when a rank failed.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Optional

from meshserve.disagg.transceiver import KvRequest
from meshserve.engine.kv_cache import KVCacheManager
from meshserve.engine.messages import (EngineCoreOutput, KvPull, ModelRunnerOutput, SamplingMeta, ScheduledRequest,
                                       SchedulerOutput)
from meshserve.engine.request import Request, RequestStatus

logger = logging.getLogger(__name__)


@dataclass
class SchedulerConfig:
    max_batch_size: int
    max_num_tokens: int
    max_seq_len: int
    enable_chunked_prefill: bool = True
    # Overlap: schedule a decoding request again while its previous step is still running; its
    # next input token is a placeholder the worker takes from that step's sampled ids on the device.
    overlap: bool = False
    # vLLM's scheduling_policy: "fcfs" (arrival order) or "priority" (Request.priority, lower first, then
    # arrival): the waiting queue is kept in that order, running requests take the step's budget in it,
    # and a preemption takes the lowest-priority running request
    policy: str = "fcfs"


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager):
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.finished_ids: list[str] = []  # to tell workers to drop their per-request state
        self.num_sent: dict[str, tuple[int, int]] = {}  # req id -> (tokens, blocks) already on workers
        self.step_id = 0
        self.num_preemptions = 0
        self.produces: dict[int, set[str]] = {}  # step id -> requests whose sampled token is real
        # disaggregated serving (see the module docstring)
        self.kv_timeout_s = 30.0  # cache_transceiver_config.kv_transfer_timeout_ms, set by the EngineCore
        self.kv_waiting: deque[Request] = deque()  # generation_only, no blocks yet
        self.kv_pulling: dict[str, Request] = {}  # generation_only, blocks allocated, ranks pulling
        self.pinned: dict[str, tuple[Request, float]] = {}  # context_only finished: req id -> (req, deadline)
        self.kv_unregister: list[str] = []  # pinned requests freed since the last SchedulerOutput

    # ---- queue management -------------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        self.requests[req.request_id] = req
        if req.is_generation_only:
            req.status = RequestStatus.WAITING_FOR_KV
            self.kv_waiting.append(req)
        else:
            self._enqueue(req, front=False)

    def _enqueue(self, req: Request, front: bool) -> None:
        """Into the waiting queue: at its end (new) or head (preempted; fcfs), or by priority."""
        if self.config.policy == "priority":
            key = req.priority_key
            i = len(self.waiting)
            while i > 0 and self.waiting[i - 1].priority_key > key:
                i -= 1
            self.waiting.insert(i, req)
        elif front:
            self.waiting.appendleft(req)
        else:
            self.waiting.append(req)

    def abort_request(self, request_id: str) -> Optional[Request]:
        req = self.requests.get(request_id)
        if req is None or req.status.finished:
            return None
        self._finish(req, RequestStatus.FINISHED_ABORTED)
        return req

    def has_unfinished(self) -> bool:
        """Whether a step has work: requests to run, a generation_only request whose blocks fit now, or
        freed pins the ranks' KV sources still serve (an idle engine must tell them: a pull after the
        release or the timeout fails instead of reading freed blocks)."""
        return bool(self.waiting or self.running or self.kv_unregister) or (
            bool(self.kv_waiting) and self.kv.can_allocate(self.kv_waiting[0], self.kv_waiting[0].num_prompt_tokens))

    def has_transfers(self) -> bool:
        """KV handed over between servers is pending: pulls to start or running, or pinned context KV."""
        return bool(self.kv_waiting or self.kv_pulling or self.pinned)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def _finish(self, req: Request, status: RequestStatus) -> None:
        req.status = status
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        elif req in self.kv_waiting:
            self.kv_waiting.remove(req)
        if req.request_id in self.kv_pulling:
            return  # ranks are writing its blocks: pull_done frees them
        if req.in_flight == 0:
            self._release(req)

    def _release(self, req: Request) -> None:
        if req.kv_registered and req.is_context_only and req.status == RequestStatus.FINISHED_LENGTH:
            # its one token did not end it (an EOS or stop token would have: nothing left to generate)
            self.pinned[req.request_id] = (req, time.monotonic() + self.kv_timeout_s)  # blocks stay allocated
        else:
            if req.kv_registered:  # aborted after its last step was scheduled
                self.kv_unregister.append(req.request_id)
            self.kv.free(req)
        self.requests.pop(req.request_id, None)
        if self.num_sent.pop(req.request_id, None) is not None:
            self.finished_ids.append(req.request_id)

    # ---- disaggregated serving ----------------------------------------------------------------
    def pinned_kv(self, request_id: str) -> Optional[dict]:
        """A pinned context request's KV: its blocks per KV group and its length in tokens."""
        entry = self.pinned.get(request_id)
        if entry is None:
            return None
        req = entry[0]
        return {"block_ids": [list(t) for t in self.kv.tables(req)], "num_tokens": req.num_prompt_tokens}

    def unpin(self, request_id: str) -> bool:
        """Free a pinned context request's blocks (the generation server released them). False if
        it is not pinned (already released or expired)."""
        entry = self.pinned.pop(request_id, None)
        if entry is None:
            return False
        self.kv.free(entry[0])
        self.kv_unregister.append(request_id)
        return True

    def expire_pinned(self, now: Optional[float] = None) -> list[str]:
        """Free the pinned requests whose deadline has passed; returns their ids."""
        now = time.monotonic() if now is None else now
        expired = [rid for rid, (_, deadline) in self.pinned.items() if deadline <= now]
        for rid in expired:
            self.unpin(rid)
        return expired

    def next_pinned_deadline(self) -> Optional[float]:
        return min((d for _, d in self.pinned.values()), default=None)

    def _issue_pulls(self) -> list[KvPull]:
        """Blocks for the prompts of waiting generation_only requests, in arrival order, while they fit."""
        pulls = []
        while self.kv_waiting:
            req = self.kv_waiting[0]
            if not self.kv.allocate_slots(req, req.num_prompt_tokens):
                break
            self.kv_waiting.popleft()
            self.kv_pulling[req.request_id] = req
            d = req.disagg
            pulls.append(KvPull(req.request_id, list(d.sources),
                                KvRequest(d.ctx_request_id, [list(t) for t in d.src_block_ids], d.src_num_tokens),
                                [list(t) for t in self.kv.tables(req)], self.kv_timeout_s))
        return pulls

    def pull_done(self, request_id: str, ok: bool, error: Optional[str] = None) -> Optional[EngineCoreOutput]:
        """Every rank finished pulling a generation_only request's KV. Success: the request runs on
        with its prompt computed and the first token appended (its output); failure: its blocks are
        freed and its output carries the error. None for an unknown or aborted request."""
        req = self.kv_pulling.pop(request_id, None)
        if req is None:
            return None
        if req.status.finished:  # aborted while pulling
            self._release(req)
            return None
        if not ok:
            req.status = RequestStatus.FINISHED_ABORTED
            self._release(req)
            return EngineCoreOutput(request_id, finish_reason="abort", error=error or "the KV transfer failed")
        now = time.monotonic()
        req.num_computed_tokens = req.num_prompt_tokens
        req.first_scheduled_time = req.first_scheduled_time or now
        req.first_token_time = now
        if self.kv.windowed:
            # blocks a context server's sliding window had dropped came over as its null block's
            # bytes: these prompt blocks must not serve prefix hits (shorter prefixes would read them)
            self.kv.num_registered[request_id] = req.num_prompt_tokens // self.kv.block_size
        else:
            self.kv.cache_full_blocks(req)  # the pulled prompt blocks serve later prefix hits too
        token = req.disagg.first_token
        status = req.append_output(token)
        out = EngineCoreOutput(request_id, new_token_ids=[token])
        if req.params.logprobs is not None and req.disagg.first_logprobs is not None:
            out.new_logprobs = [req.disagg.first_logprobs]  # the context server's, for the token it sampled
        if req.params.prompt_logprobs is not None and req.disagg.prompt_logprobs is not None:
            out.prompt_logprobs = list(req.disagg.prompt_logprobs)
            req.num_prompt_logprobs_sent = req.num_prompt_tokens  # a preemption's recompute sends none
        if status is not None:
            out.finish_reason, out.stop_reason = status.value, req.stop_reason
            req.status = status
            self._release(req)
        else:
            req.status = RequestStatus.RUNNING
            self.running.append(req)
        return out

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.kv.free(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.num_sent.pop(req.request_id, None)  # resent whole when it resumes
        self._enqueue(req, front=True)

    # ---- one step ---------------------------------------------------------------------------
    def schedule(self, max_seqs: Optional[int] = None, admit_new: bool = True) -> SchedulerOutput:
        """One batch. `max_seqs` caps its sequences (pipelines split the running set into
        micro-batches so every stage has one to work on); `admit_new=False` starts no waiting
        request this step (attention DP's balancing, engine/dp_coordinator.py)."""
        budget = self.config.max_num_tokens
        max_seqs = max_seqs or self.config.max_batch_size
        scheduled: list[tuple[Request, int]] = []
        preempted = False
        if self.config.policy == "priority":  # the budget goes in priority order; preemption takes from the end
            self.running.sort(key=Request.priority_key.fget)

        i = 0
        while i < len(self.running) and budget > 0 and len(scheduled) < max_seqs:
            req = self.running[i]
            if req.in_flight and not self._can_overlap(req):
                i += 1
                continue
            num_new = min(req.num_tokens + req.num_pending - req.num_computed_tokens, budget)
            if num_new <= 0:
                i += 1
                continue
            if req.in_flight:  # never preempt around a request whose step is still running
                if self.kv.allocate_slots(req, num_new):
                    scheduled.append((req, num_new))
                    budget -= num_new
                i += 1
                continue
            while not self.kv.allocate_slots(req, num_new):
                victim = self._pick_victim(after=i)
                if victim is None:
                    self._preempt(req)
                    preempted = True
                    break
                self._preempt(victim)
                preempted = True
            else:
                scheduled.append((req, num_new))
                budget -= num_new
                i += 1
                continue
            # req itself was preempted: the list shrank under index i, do not advance

        # generation_only requests take blocks after the running ones (never preempting them) and
        # before new prompts
        pulls = self._issue_pulls() if self.kv_waiting and not preempted else []
        while (admit_new and self.waiting and budget > 0 and not preempted
               and len(self.running) < self.config.max_batch_size and len(scheduled) < max_seqs):
            req = self.waiting[0]
            computed, num_cached = self.kv.get_computed_blocks(req)
            num_new = req.num_tokens - num_cached
            if num_new > budget:
                if not self.config.enable_chunked_prefill and num_new <= self.config.max_num_tokens:
                    break  # a whole prefill waits for a step with room for it
                # chunked prefill, or a preempted request whose prompt + outputs outgrew max_num_tokens:
                # its recomputation goes in chunks (whole, it could never run again and would block the queue)
                num_new = budget
            if not self.kv.allocate_slots(req, num_new, computed):
                break
            self.waiting.popleft()
            req.num_computed_tokens = num_cached
            if req.num_preemptions == 0:
                req.num_cached_tokens = num_cached
            req.status = RequestStatus.RUNNING
            if req.first_scheduled_time is None:
                req.first_scheduled_time = time.monotonic()
            self.running.append(req)
            scheduled.append((req, num_new))
            budget -= num_new

        self.step_id += 1
        out = SchedulerOutput(step_id=self.step_id, reqs=[self._wire(r, n) for r, n in scheduled],
                              finished_req_ids=self.finished_ids, kv_pulls=pulls, kv_unregister=self.kv_unregister)
        self.finished_ids = []
        self.kv_unregister = []
        produces = set()
        for (req, n), sr in zip(scheduled, out.reqs):
            req.num_computed_tokens += n
            req.in_flight += 1
            if req.num_computed_tokens >= req.num_tokens + req.num_pending:
                req.num_pending += 1
                produces.add(req.request_id)
                if req.grammar is not None and req.grammar_active:  # structured outputs: the ids it allows next
                    sr.grammar_mask = req.grammar.next_mask()
                if req.bad_single or req.bad_multi:
                    sr.banned_ids = req.banned_now()
                if req.is_context_only and not req.kv_registered:  # this step completes its prompt's KV
                    req.kv_registered = True
                    out.kv_register = out.kv_register + [KvRequest(req.request_id, [list(t) for t in self.kv.tables(req)],
                                                     req.num_prompt_tokens)]
        self.produces[self.step_id] = produces
        return out

    def carry_over(self, so: SchedulerOutput) -> None:
        """A SchedulerOutput that was not launched (nothing to run): what it told the ranks goes
        with the next one."""
        self.finished_ids[:0] = so.finished_req_ids
        self.kv_unregister[:0] = so.kv_unregister

    def _can_overlap(self, req: Request) -> bool:
        """An in-flight request may be scheduled again when overlap is on, its running step will
        produce a token, it can still use one more, and its sampling does not read its own history
        (penalties), which the worker only learns a step late, nor does its grammar's next mask
        (structured outputs) or a bad word's next ban: the engine needs the token first. min_tokens is fine: the worker counts
        outputs from `ScheduledRequest.num_output_tokens`, which includes the in-flight ones."""
        p = req.params
        return (self.config.overlap and req.num_pending > 0 and req.grammar is None and not req.bad_multi
                and req.num_output_tokens + req.num_pending < req.max_output_tokens
                and p.repetition_penalty == 1.0 and not p.presence_penalty and not p.frequency_penalty)

    def _pick_victim(self, after: int) -> Optional[Request]:
        """The newest running request behind index `after` (those before it are scheduled)."""
        for victim in reversed(self.running[after + 1:]):
            if not victim.in_flight:
                return victim
        return None

    def _wire(self, req: Request, num_new: int) -> ScheduledRequest:
        sent = self.num_sent.get(req.request_id)
        if sent is None:  # new or resumed: the worker (re)builds its state from this
            tokens, blocks, sampling = req.all_token_ids, list(req.block_ids), self._sampling_meta(req)
            group_blocks = [list(t) for t in req.group_block_ids]
        else:
            p = req.num_prompt_tokens
            tokens = req.output_token_ids[sent[0] - p:] if req.num_tokens > sent[0] >= p else (
                req.all_token_ids[sent[0]:] if req.num_tokens > sent[0] else [])
            blocks, sampling = req.block_ids[sent[1]:], None
            group_blocks = [t[sent[1]:] for t in req.group_block_ids]
        self.num_sent[req.request_id] = (req.num_tokens, len(req.block_ids))
        return ScheduledRequest(req.request_id, req.num_computed_tokens, num_new, tokens, blocks, sampling,
                                req.num_output_tokens + req.num_pending, group_blocks)

    @staticmethod
    def _sampling_meta(req: Request) -> SamplingMeta:
        p = req.params
        return SamplingMeta(
            temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, min_p=p.min_p, seed=p.seed,
            repetition_penalty=p.repetition_penalty, presence_penalty=p.presence_penalty,
            frequency_penalty=p.frequency_penalty, logit_bias=p.logit_bias or None, logprobs=p.logprobs,
            prompt_logprobs=p.prompt_logprobs, min_tokens=p.min_tokens, allowed_token_ids=p.allowed_token_ids,
            stop_ids=sorted(set(req.eos_token_ids) | set(p.stop_token_ids)) if p.min_tokens else [])

    @staticmethod
    def _new_prompt_logprobs(req: Request, sr, entries) -> Optional[list]:
        """The prompt logprobs a step adds: a step from position s computed the entries of prompt
        positions s + 1.. (position 0 has None: nothing precedes it, so a one-token prompt's are
        [None]); those already sent before a preemption's recompute are dropped."""
        if req.num_prompt_logprobs_sent >= req.num_prompt_tokens:
            return None
        start = sr.num_computed_tokens
        if start == 0:
            entries, first = [None] + list(entries or []), 0
        elif entries:
            first = start + 1
        else:
            return None
        new = entries[max(0, req.num_prompt_logprobs_sent - first):]
        req.num_prompt_logprobs_sent = max(req.num_prompt_logprobs_sent, first + len(entries))
        return new

    def update_from_output(self, sched: SchedulerOutput, result: ModelRunnerOutput,
                           rows: Optional[dict[str, int]] = None) -> list[EngineCoreOutput]:
        """`rows`: request id -> row of `result` (attention DP builds it once for every rank's scheduler)."""
        sampled = rows if rows is not None else dict(zip(result.req_ids, range(len(result.req_ids))))
        produces = self.produces.pop(sched.step_id, set())
        outputs: list[EngineCoreOutput] = []
        now = time.monotonic()
        for sr in sched.reqs:
            req = self.requests.get(sr.req_id)
            if req is None:
                continue
            req.in_flight -= 1
            if sr.req_id in produces:
                req.num_pending -= 1
            if req.status.finished:  # aborted while in flight
                if req.in_flight == 0:
                    self._release(req)
                continue
            if req.status == RequestStatus.PREEMPTED:
                continue
            out = None
            plp = (self._new_prompt_logprobs(req, sr, result.prompt_logprobs.get(sr.req_id))
                   if req.params.prompt_logprobs is not None else None)  # a step's common case: no call
            if plp:
                out = EngineCoreOutput(sr.req_id, prompt_logprobs=plp)
            self.kv.cache_full_blocks(req)
            idx = sampled.get(sr.req_id)
            if idx is not None and sr.req_id in produces:
                token = result.sampled_token_ids[idx]
                status = req.append_output(token)
                if req.first_token_time is None:
                    req.first_token_time = now
                out = out or EngineCoreOutput(sr.req_id)
                out.new_token_ids = [token]
                if result.logprobs and result.logprobs[idx] is not None:
                    out.new_logprobs = [result.logprobs[idx]]
                if req.num_output_tokens == req.num_resumed_output_tokens + 1:  # its first sampled token
                    out.num_cached_tokens = req.num_cached_tokens
                if status is not None:
                    out.finish_reason = status.value
                    out.stop_reason = req.stop_reason
                    if req.error:
                        logger.warning("request %s aborted: %s", sr.req_id, req.error)
                    self._finish(req, status)
                    if req.is_context_only:
                        out.kv_transfer_params = self.pinned_kv(sr.req_id)
            if out is not None:
                outputs.append(out)
        return outputs
