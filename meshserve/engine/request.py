"""One sequence as the engine core sees it: token ids, how many of them have KV computed, its
blocks, and why it finished. Pure Python: no torch, no tokenizer.

`num_computed_tokens` chases `num_tokens`; a step schedules `num_tokens - num_computed_tokens`
(or a chunk of it), so prefill, chunked prefill, decode and recompute after preemption are one path.

A resumed request (`resume_output_token_ids`: an orchestrator's failover continues on this server
an output another one started) starts with those tokens as its outputs, not as prompt, just as if
it had been preempted after generating them: they are prefilled with the prompt, and max_tokens,
min_tokens, EOS and stop ids, the penalties (presence / frequency count outputs, repetition prompt
and outputs) and a seed's per-step draws (seeded from the output count) all go on exactly as in
the uninterrupted run. Nothing in the step loop knows the difference.
"""
from __future__ import annotations

import enum
import itertools
import time
from typing import Optional

from meshserve.sampling_params import SamplingParams

_SEQ = itertools.count()


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    WAITING_FOR_KV = "waiting_for_kv"  # generation_only: its KV is being pulled from a context server
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                        RequestStatus.FINISHED_ABORTED)


class Request:
    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 eos_token_ids: list[int], max_total_tokens: int, arrival_time: Optional[float] = None,
                 disagg=None, resume_output_token_ids=(), cache_salt: Optional[str] = None, priority: int = 0):
        self.request_id = request_id
        self.priority = priority  # scheduling_policy "priority": lower runs first (vLLM's convention)
        self.seq = next(_SEQ)  # arrival order among equal priorities
        self.cache_salt = cache_salt  # prefix reuse only among requests of the same salt (kv_cache.salt_root)
        self.prompt_token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(self.prompt_token_ids)
        self.output_token_ids: list[int] = list(resume_output_token_ids)
        self.num_resumed_output_tokens = len(self.output_token_ids)  # outputs given up front (see above)
        self.params = params
        self.eos_token_ids = [] if params.ignore_eos else (
            [params.end_id] if params.end_id is not None else list(eos_token_ids))
        self.max_total_tokens = max_total_tokens  # prompt + output may not exceed this
        self.status = RequestStatus.WAITING
        self.stop_reason: Optional[int | str] = None
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache at first schedule
        self.block_ids: list[int] = []  # block table of KV group 0 (the only one, for most models)
        self.group_block_ids: list[list[int]] = []  # tables of KV groups 1.. (engine/kv_spec.py)
        self.block_hashes: list[int] = []  # hashes of full blocks, extended as blocks fill
        self.num_preemptions = 0
        self.num_prompt_logprobs_sent = 0  # prompt positions whose logprobs went out (a recompute resends none)
        self.arrival_time = arrival_time if arrival_time is not None else time.monotonic()
        self.first_scheduled_time: Optional[float] = None
        self.first_token_time: Optional[float] = None
        self.in_flight = 0  # scheduled batches not yet returned (pipeline micro-batches, overlap)
        self.num_pending = 0  # in-flight steps that will produce a token not yet appended
        self.disagg = disagg  # messages.DisaggRequest of a context_only / generation_only request
        self.kv_registered = False  # context_only: its blocks are registered with the ranks' KV sources
        # structured outputs: the sequence's grammar matcher (engine/structured_output.py GrammarState)
        self.grammar = None
        self.grammar_active = True  # False while a reasoning model thinks (until `grammar_after` ends the output)
        self.grammar_after: Optional[list[int]] = None
        # bad_words as token ids: single tokens always banned, longer words need the output's tail
        words = params.bad_words_token_ids or []
        self.bad_single = sorted({w[0] for w in words if len(w) == 1})
        self.bad_multi = [list(w) for w in words if len(w) > 1]
        self.error: Optional[str] = None  # why it was aborted, when the engine ended it

    @property
    def priority_key(self) -> tuple[int, float, int]:
        """Scheduling order under scheduling_policy "priority": priority, then arrival."""
        return self.priority, self.arrival_time, self.seq

    @property
    def is_context_only(self) -> bool:
        return self.disagg is not None and self.disagg.kind == "context_only"

    @property
    def is_generation_only(self) -> bool:
        return self.disagg is not None and self.disagg.kind == "generation_only"

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return self.num_prompt_tokens + len(self.output_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def max_output_tokens(self) -> int:
        limit = self.max_total_tokens - self.num_prompt_tokens
        return limit if self.params.max_tokens is None else min(self.params.max_tokens, limit)

    def banned_now(self) -> list[int]:
        """bad_words' ids the next token may not be: single-token words, and the last token of each
        longer word whose other tokens end the output (vLLM's rule, over the outputs only)."""
        banned = list(self.bad_single)
        out = self.output_token_ids
        for w in self.bad_multi:
            k = len(w) - 1
            if len(out) >= k and out[len(out) - k:] == w[:-1]:
                banned.append(w[-1])
        return banned

    def append_output(self, token_id: int) -> Optional[RequestStatus]:
        """Record a sampled token; returns the finished status if this token ends the request."""
        self.output_token_ids.append(token_id)
        n = self.num_output_tokens
        if self.grammar is not None and not self.grammar_active:
            end = self.grammar_after
            if self.output_token_ids[-len(end):] == end:  # the thinking ended: the grammar holds from here
                self.grammar_active = True
        elif self.grammar is not None:
            if not self.grammar.accept(token_id):  # the step's mask allowed it: only a banned-everything row
                self.error = f"the sampled token {token_id} does not match the request's structured_outputs"
                return RequestStatus.FINISHED_ABORTED
            if self.grammar.terminated and token_id not in self.eos_token_ids:
                self.stop_reason = token_id if token_id in self.params.stop_token_ids else None
                return RequestStatus.FINISHED_STOPPED  # the grammar is complete (its stop token, or ignore_eos)
        if n >= self.params.min_tokens:
            if token_id in self.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
            if token_id in self.params.stop_token_ids:
                self.stop_reason = token_id
                return RequestStatus.FINISHED_STOPPED
        if n >= self.max_output_tokens:
            return RequestStatus.FINISHED_LENGTH
        return None

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, status={self.status.value}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, blocks={len(self.block_ids)})")
