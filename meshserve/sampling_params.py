"""SamplingParams: what a caller asks of one request's decoding.

Validated once at the API edge (``validate()``); the engine and the sampler trust it afterwards.
Field names follow vLLM / TensorRT-LLM so code written for either ports by changing an import.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Union


@dataclass
class SamplingParams:
    max_tokens: Optional[int] = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    top_p: float = 1.0
    min_p: float = 0.0
    seed: Optional[int] = None
    n: int = 1
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[list[int]] = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    end_id: Optional[int] = None  # overrides the tokenizer's eos id
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Optional[dict[int, float]] = None
    logprobs: Optional[int] = None  # top-k logprobs per generated token (0: only the chosen one)
    prompt_logprobs: Optional[int] = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    detokenize: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k is None or self.top_k < 0:
            self.top_k = 0
        if self.logit_bias:
            self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5 or self.top_k == 1

    def validate(self) -> None:
        def bad(name: str, value, accepted: str) -> None:
            raise ValueError(f"SamplingParams.{name}={value!r} is invalid: {accepted}")

        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            bad("max_tokens", self.max_tokens, "expected an integer >= 1 (or None for up to max_seq_len)")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            bad("min_tokens", self.min_tokens, "expected an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad("min_tokens", self.min_tokens, f"must be <= max_tokens ({self.max_tokens})")
        if not self.temperature >= 0.0:
            bad("temperature", self.temperature, "expected a number >= 0 (0 means greedy)")
        if not isinstance(self.top_k, int):
            bad("top_k", self.top_k, "expected an integer (0 or -1 disables it)")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", self.top_p, "expected a number in (0, 1]")
        if not 0.0 <= self.min_p <= 1.0:
            bad("min_p", self.min_p, "expected a number in [0, 1]")
        if self.seed is not None and not isinstance(self.seed, int):
            bad("seed", self.seed, "expected an integer or None")
        if not isinstance(self.n, int) or self.n < 1:
            bad("n", self.n, "expected an integer >= 1")
        if any((not isinstance(s, str)) or s == "" for s in self.stop):
            bad("stop", self.stop, "expected non-empty strings")
        if any((not isinstance(t, int)) or t < 0 for t in self.stop_token_ids):
            bad("stop_token_ids", self.stop_token_ids, "expected non-negative integers")
        if not self.repetition_penalty > 0.0:
            bad("repetition_penalty", self.repetition_penalty, "expected a number > 0 (1 disables it)")
        if not -2.0 <= self.presence_penalty <= 2.0:
            bad("presence_penalty", self.presence_penalty, "expected a number in [-2, 2]")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            bad("frequency_penalty", self.frequency_penalty, "expected a number in [-2, 2]")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 0 or v > 20):
                bad(name, v, "expected an integer in [0, 20] or None")
        if self.end_id is not None and (not isinstance(self.end_id, int) or self.end_id < 0):
            bad("end_id", self.end_id, "expected a non-negative integer")
        if self.logit_bias:
            for k, v in self.logit_bias.items():
                if k < 0 or not -100.0 <= v <= 100.0:
                    bad("logit_bias", {k: v}, "expected token ids >= 0 mapped to values in [-100, 100]")

    def validate_for_model(self, vocab_size: int) -> None:
        """Checks that need the model: token ids must exist in the vocabulary."""
        for name, ids in (("stop_token_ids", self.stop_token_ids),
                          ("logit_bias", list((self.logit_bias or {}).keys())),
                          ("end_id", [] if self.end_id is None else [self.end_id])):
            for t in ids:
                if t >= vocab_size:
                    raise ValueError(f"SamplingParams.{name} contains token id {t}, "
                                     f"but the vocabulary has {vocab_size} ids (0..{vocab_size - 1})")

    def clone(self, **changes) -> "SamplingParams":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
