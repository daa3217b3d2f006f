"""What `LLM.generate` returns: RequestOutput holding one CompletionOutput per sample (n)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

# One generated position's logprobs: {token_id: logprob}; the chosen token is always present.
TokenLogprobs = dict[int, float]


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

    def __repr__(self) -> str:
        return (f"RequestOutput(request_id={self.request_id!r}, prompt={self.prompt!r}, "
                f"outputs={self.outputs!r}, finished={self.finished})")
