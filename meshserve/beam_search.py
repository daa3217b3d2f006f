"""Beam search, as vLLM runs it: on top of the engine, one token per round.

Each round asks the engine for one token of every live beam (the beam's tokens as the prompt; the
prefix cache holds the shared part) with the top `2 * beam_width` logprobs of the raw distribution.
Every (beam, candidate token) pair becomes a beam with cum_logprob + logprob; an EOS candidate
completes its beam (unless ignore_eos); the best `beam_width` of the rest live on. After max_tokens
rounds (or when no beam lives) the completed and live beams are ranked by cum_logprob / length **
length_penalty (length: the beam's tokens, prompt included, less a final EOS, as vLLM's
get_beam_search_score), and the best `beam_width` are the answer.

`BeamSearch` is the state of one prompt's search, `BeamBatch` several prompts' searches advanced
together (one engine call per round for all their live beams); `LLM.beam_search` and the API server's
`use_beam_search` (serve/beam_search_api.py) drive it with their engines.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from meshserve.sampling_params import SamplingParams


@dataclass
class BeamSearchParams:
    """vLLM's: `beam_width` beams, each up to `max_tokens` new tokens."""
    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        for name in ("beam_width", "max_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"BeamSearchParams.{name}={v!r} is invalid: expected an integer >= 1")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (0 <= t < math.inf):
            raise ValueError(f"BeamSearchParams.temperature={t!r} is invalid: expected a number >= 0")
        lp = self.length_penalty
        if isinstance(lp, bool) or not isinstance(lp, (int, float)) or not math.isfinite(lp):
            raise ValueError(f"BeamSearchParams.length_penalty={lp!r} is invalid: expected a finite number")
        for name in ("ignore_eos", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"BeamSearchParams.{name}={getattr(self, name)!r} is invalid: expected true or false")

    def step_params(self) -> SamplingParams:
        """One round's request per beam: one token, with the top 2 * beam_width logprobs."""
        return SamplingParams(max_tokens=1, temperature=float(self.temperature), logprobs=2 * self.beam_width,
                              ignore_eos=True, detokenize=False)


@dataclass
class BeamSearchSequence:
    """One beam: `tokens` are the prompt's and the generated ones (vLLM's); `text` the generated part's."""
    tokens: list[int]
    logprobs: list[dict[int, float]] = field(default_factory=list)
    cum_logprob: float = 0.0
    text: Optional[str] = None
    finish_reason: Optional[str] = None  # "stop" (EOS) or "length"
    num_prompt_tokens: int = 0

    @property
    def output_token_ids(self) -> list[int]:
        return self.tokens[self.num_prompt_tokens:]


@dataclass
class BeamSearchOutput:
    sequences: list[BeamSearchSequence]


def beam_score(tokens: list[int], cum_logprob: float, eos_token_ids, length_penalty: float) -> float:
    """vLLM's get_beam_search_score: cum_logprob / length ** length_penalty, a final EOS not counted."""
    n = len(tokens) - (1 if tokens and tokens[-1] in eos_token_ids else 0)
    return cum_logprob / (max(n, 1) ** length_penalty)


class BeamSearch:
    """One prompt's beam search; `pending()` are the beams to extend, `advance()` takes their logprobs."""

    def __init__(self, prompt_token_ids: list[int], params: BeamSearchParams, eos_token_ids):
        self.params = params
        self.eos = set(eos_token_ids)
        self.n_prompt = len(prompt_token_ids)
        self.beams = [BeamSearchSequence(list(prompt_token_ids), num_prompt_tokens=self.n_prompt)]
        self.completed: list[BeamSearchSequence] = []
        self.rounds = 0

    def _key(self, b: BeamSearchSequence) -> float:
        return beam_score(b.tokens, b.cum_logprob, self.eos, self.params.length_penalty)

    @property
    def done(self) -> bool:
        return not self.beams or self.rounds >= self.params.max_tokens

    def pending(self) -> list[list[int]]:
        return [] if self.done else [b.tokens for b in self.beams]

    def advance(self, top_logprobs: list[dict[int, float]]) -> None:
        """Each live beam's top logprobs of its next token (in `pending()`'s order)."""
        k = self.params.beam_width
        grown = []
        for beam, lp in zip(self.beams, top_logprobs):
            for tok, val in sorted(lp.items(), key=lambda kv: -kv[1])[:2 * k]:
                b = BeamSearchSequence(beam.tokens + [tok], beam.logprobs + [lp], beam.cum_logprob + val,
                                       num_prompt_tokens=self.n_prompt)
                if tok in self.eos and not self.params.ignore_eos:
                    b.finish_reason = "stop"
                    self.completed.append(b)
                else:
                    grown.append(b)
        self.beams = sorted(grown, key=self._key, reverse=True)[:k]
        self.rounds += 1

    def result(self, decode) -> BeamSearchOutput:
        """The best beam_width beams, best first; `decode(ids) -> str` writes their texts."""
        for b in self.beams:
            b.finish_reason = b.finish_reason or "length"
        best = sorted(self.completed + self.beams, key=self._key, reverse=True)[:self.params.beam_width]
        for b in best:
            out = b.output_token_ids
            if b.finish_reason == "stop" and not self.params.include_stop_str_in_output:
                out = out[:-1]
            b.text = decode(out)
        return BeamSearchOutput(best)


class BeamBatch:
    """Several prompts' searches, one round at a time: `pending()` is every live beam's tokens (search
    by search), `advance()` takes their top logprobs in that order."""

    def __init__(self, searches: list[BeamSearch]):
        self.searches = searches
        self._plan: list[tuple[BeamSearch, int]] = []

    def pending(self) -> list[list[int]]:
        asks = [(s, s.pending()) for s in self.searches]
        self._plan = [(s, len(toks)) for s, toks in asks if toks]
        return [t for _, toks in asks for t in toks]

    def advance(self, top_logprobs: list[dict[int, float]]) -> None:
        pos = 0
        for s, n in self._plan:
            s.advance(top_logprobs[pos:pos + n])
            pos += n
