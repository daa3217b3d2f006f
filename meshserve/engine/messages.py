"""The typed messages that cross process boundaries, as msgspec Structs (never pickle).

  EngineCore --SchedulerOutput--> every rank's ModelRunner
  last-stage rank 0 --ModelRunnerOutput--> EngineCore
  EngineCore --EngineCoreOutputs--> the front (LLM in-process, or the API server over ZMQ)
  front --EngineCoreRequest / abort--> EngineCore
"""
from __future__ import annotations

from typing import Optional

import msgspec

from meshserve.disagg.transceiver import KvRequest, RankLayout


class SamplingMeta(msgspec.Struct, array_like=True, omit_defaults=True):
    """What the device-side sampler needs of a request's SamplingParams."""
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: Optional[int] = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Optional[dict[int, float]] = None
    logprobs: Optional[int] = None
    prompt_logprobs: Optional[int] = None
    min_tokens: int = 0
    allowed_token_ids: Optional[list[int]] = None  # every other id is masked
    stop_ids: list[int] = []  # masked while fewer than min_tokens have been generated


class ScheduledRequest(msgspec.Struct, array_like=True, omit_defaults=True):
    req_id: str
    num_computed_tokens: int  # position of the first token computed in this step
    num_new_tokens: int
    # New or resumed request: all its tokens and blocks, plus `sampling`. Otherwise: only the
    # tokens and blocks appended since this request was last scheduled.
    new_token_ids: list[int] = []
    new_block_ids: list[int] = []  # KV group 0's table (engine/kv_spec.py)
    sampling: Optional[SamplingMeta] = None
    num_output_tokens: int = 0  # output tokens known before this step (seeded sampling uses it)
    # Models with several KV groups: the same for the tables of groups 1.. (entries a sliding
    # window no longer reads are the null block 0 when sent; ranks null them themselves later)
    new_group_block_ids: list[list[int]] = []
    # structured outputs, in a step that samples this request's next token: the ids its grammar
    # allows, one bit each (id i: bit i % 32 of little-endian uint32 word i // 32)
    grammar_mask: Optional[bytes] = None
    # bad_words, in a step that samples this request's next token: ids it may not take now
    banned_ids: list[int] = []


class KvPull(msgspec.Struct, array_like=True, omit_defaults=True):
    """Disaggregated serving, generation side: every rank reads its share of a request's KV from
    the context server's ranks (`sources`) into `dst_block_ids` (per KV group), in the background,
    and reports to rank 0 (disagg/transceiver.py KvSink.pull)."""
    req_id: str
    sources: list[RankLayout]
    src: KvRequest
    dst_block_ids: list[list[int]]
    timeout_s: float


class SchedulerOutput(msgspec.Struct, array_like=True, omit_defaults=True):
    step_id: int
    reqs: list[ScheduledRequest] = []
    finished_req_ids: list[str] = []
    # Disaggregated serving, done by every rank before the step's forward: pulls to start, context
    # requests whose blocks this step completes (their KV may be read once it is done), and pinned
    # requests whose blocks are freed (no read after this; later steps may reuse them).
    kv_pulls: list[KvPull] = []
    kv_register: list[KvRequest] = []
    kv_unregister: list[str] = []
    # Attention DP (engine/dp_coordinator.py): the step's part of every DP rank, which runs
    # dp[its attn_dp rank]; the fields above are then empty
    dp: list["SchedulerOutput"] = []

    def has_work(self) -> bool:
        """Whether the ranks must hear of this step: requests to run, or KV handovers to start."""
        return bool(self.reqs or self.kv_pulls or self.kv_unregister) or any(p.has_work() for p in self.dp)

    def all_reqs(self) -> list[ScheduledRequest]:
        return self.reqs if not self.dp else [r for p in self.dp for r in p.reqs]


# One position's logprobs: (token ids, their logprobs, the chosen / prompt token's rank in the vocabulary,
# 1 = the likeliest; 0 where unknown), the chosen (or prompt) token first, then the top k likeliest.
LogprobEntry = tuple[list[int], list[float], int]


class ModelRunnerOutput(msgspec.Struct, array_like=True, omit_defaults=True):
    step_id: int
    req_ids: list[str] = []
    sampled_token_ids: list[int] = []
    # per request: (token ids, logprobs, the sampled token's rank in the vocabulary) with the sampled token
    # first, then the top-k; or None
    logprobs: list[Optional[LogprobEntry]] = []
    # per request that asked for them: logprobs of the prompt tokens covered by this step
    prompt_logprobs: dict[str, list[LogprobEntry]] = {}


class DisaggRequest(msgspec.Struct, omit_defaults=True):
    """A request's part in disaggregated serving (docs/disaggregated.md), as the engine needs it:
    context_only runs the prompt and one token and keeps its KV blocks pinned for a generation
    server; generation_only pulls that KV from the context server's ranks and decodes on from
    `first_token`. The front has checked the signed params; the engine trusts this."""
    kind: str  # "context_only" | "generation_only"
    ctx_request_id: str = ""  # generation_only: the context server's id of the pinned KV
    first_token: int = -1  # generation_only: the token the context server sampled
    sources: list[RankLayout] = []  # generation_only: the context server's ranks holding the KV (rank 0 first)
    # generation_only with a context server running attention DP: its rank 0, which hears the release
    # (sources are then the ranks of the DP rank holding the KV); None: sources[0]
    release_to: Optional[RankLayout] = None
    src_block_ids: list[list[int]] = []  # generation_only: the KV's blocks there, per KV group
    src_num_tokens: int = 0  # generation_only: tokens of KV there (the prompt's length)
    # generation_only: the context server's logprobs of the first token (ids, values; the token first)
    # and of the prompt (None first), when the request asked for them
    first_logprobs: Optional[LogprobEntry] = None
    prompt_logprobs: Optional[list[Optional[LogprobEntry]]] = None


class EngineCoreRequest(msgspec.Struct, omit_defaults=True):
    request_id: str
    prompt_token_ids: list[int]
    params: dict  # SamplingParams fields
    arrival_time: float = 0.0
    disagg: Optional[DisaggRequest] = None
    # a resumed request (an orchestrator's failover): output tokens of an earlier run, prefilled
    # after the prompt and counted as this request's outputs (engine/request.py Request)
    resume_output_token_ids: list[int] = []
    cache_salt: Optional[str] = None  # vLLM's: prefix reuse only among requests of the same salt
    priority: int = 0  # scheduling_policy "priority": lower runs first


class EngineCoreOutput(msgspec.Struct, array_like=True, omit_defaults=True):
    request_id: str
    new_token_ids: list[int] = []
    new_logprobs: list[LogprobEntry] = []
    prompt_logprobs: Optional[list[Optional[LogprobEntry]]] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[int] = None
    num_cached_tokens: int = 0
    # context_only, with its last output: {"block_ids": [[...] per KV group], "num_tokens": n} of
    # the pinned KV (the front signs them into disaggregated_params.opaque_state)
    kv_transfer_params: Optional[dict] = None
    error: Optional[str] = None  # generation_only whose KV transfer failed (finish_reason "abort")


class EngineCoreOutputs(msgspec.Struct, omit_defaults=True):
    outputs: list[EngineCoreOutput] = []
    stats: Optional[dict] = None
