"""What `LLM.generate` returns: RequestOutput holding one CompletionOutput per sample (n)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union


class Logprob(float):
    """One token's log probability: a float, with vLLM's and TensorRT-LLM's attributes `logprob` (the
    same number), `rank` (its place in the vocabulary, 1 = the likeliest, ties sharing the better one)
    and `decoded_token` (its text; None without a tokenizer)."""
    __slots__ = ("rank", "decoded_token")

    def __new__(cls, logprob: float, rank: Optional[int] = None, decoded_token: Optional[str] = None):
        obj = super().__new__(cls, logprob)
        obj.rank, obj.decoded_token = rank, decoded_token
        return obj

    @property
    def logprob(self) -> float:
        return float(self)

    def __repr__(self) -> str:
        return f"Logprob(logprob={float(self)!r}, rank={self.rank!r}, decoded_token={self.decoded_token!r})"


# One position's logprobs: {token_id: Logprob}, the chosen (or prompt) token first, then the top k
# likeliest (ranks 1..k).
TokenLogprobs = dict[int, Logprob]


def logprob_entry(ids: list[int], vals: list[float], chosen_rank: int = 0, decode=None) -> TokenLogprobs:
    """A position's TokenLogprobs from the engine's entry (ids, vals, the chosen token's rank in the
    vocabulary; 0: not known): ids[0] the chosen or prompt token, the rest the top k, likeliest first.
    `decode(token_id) -> str` fills decoded_token."""
    rank = {t: r for r, t in enumerate(ids[1:], 1)}
    if ids and chosen_rank:
        rank[ids[0]] = chosen_rank
    return {t: Logprob(v, rank.get(t), decode(t) if decode is not None else None) for t, v in zip(ids, vals)}


REQUEST_TYPES = ("context_only", "generation_only")


@dataclass
class DisaggregatedParams:
    """Disaggregated serving from the LLM API (TensorRT-LLM's `DisaggregatedParams`; docs/disaggregated.md).
    Pass `DisaggregatedParams(request_type="context_only")` to `LLM.generate` on an LLM made with
    `cache_transceiver_config`: it runs the prompt and the first token and keeps the KV for a
    generation side; the output's `disaggregated_params` (None when the first token ended the
    request) goes, with `request_type="generation_only"`, to another such LLM's `generate` with the
    same prompt and sampling params, which pulls the KV and decodes on from the first token."""
    request_type: str
    first_gen_tokens: Optional[list[int]] = None
    ctx_request_id: Optional[str] = None
    opaque_state: Optional[str] = None  # signed by the context side (disagg/params.py)

    def __post_init__(self):
        if self.request_type not in REQUEST_TYPES:
            raise ValueError(f"disaggregated_params.request_type={self.request_type!r} is not one of "
                             f"{', '.join(REQUEST_TYPES)}")

    def for_generation(self) -> "DisaggregatedParams":
        """These params (a context side's answer) as a generation_only request's."""
        return DisaggregatedParams("generation_only", self.first_gen_tokens, self.ctx_request_id, self.opaque_state)


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: Optional[str] = None  # "stop" | "length" | "abort"
    stop_reason: Optional[Union[int, str]] = None  # the stop string or stop token id that ended it
    logprobs: Optional[list[TokenLogprobs]] = None
    cumulative_logprob: Optional[float] = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def length(self) -> int:
        return len(self.token_ids)


@dataclass
class RequestOutput:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    prompt_logprobs: Optional[list[Optional[TokenLogprobs]]] = None
    num_cached_tokens: int = 0
    metrics: Optional[dict] = None
    # disaggregated serving, context_only: the pinned KV ({"block_ids", "num_tokens"}) a generation
    # server pulls; the API server signs it into the response's disaggregated_params
    kv_transfer_params: Optional[dict] = None
    # LLM API, a context_only request: what a generation side needs (None when its first token ended it)
    disaggregated_params: Optional[DisaggregatedParams] = None

    def __repr__(self) -> str:
        return (f"RequestOutput(request_id={self.request_id!r}, prompt={self.prompt!r}, "
                f"outputs={self.outputs!r}, finished={self.finished})")
