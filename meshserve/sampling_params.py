"""SamplingParams: what a caller asks of one request's decoding.

Validated at the API edge: ``validate()`` on construction, then (through engine_core.validate,
which also checks max_tokens against max_seq_len) ``validate_for_model()`` with the engine's
vocabulary size and max_n; the engine and the sampler trust it afterwards. Every number is
range-checked on that path, so nothing out of range reaches the engine's msgpack wire.
Field names follow vLLM / TensorRT-LLM so code written for either ports by changing an import.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass
from typing import Optional, Union

from meshserve.errors import nearest

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def short_repr(value) -> str:
    """repr(value), cut to 80 characters: an error message stays one readable line."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _int_in(value, lo: int, hi: float) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _listed(name: str, value, what: str) -> list:
    """A list field given as a list or tuple (None: empty); anything else a ValueError naming it."""
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"SamplingParams.{name}={short_repr(value)} is invalid: expected {what}")
    return list(value)


_KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


@dataclass
class StructuredOutputsParams:
    """vLLM's structured outputs (and TensorRT-LLM's GuidedDecodingParams): the output must match
    exactly one of a JSON schema (`json`: a dict or its JSON text), a regular expression, one of
    `choice`'s strings, an EBNF grammar (GBNF / xgrammar's syntax), or any JSON object
    (`json_object=True`). The engine compiles it with xgrammar and masks each step's logits to the
    tokens the grammar allows (engine/structured_output.py); a grammar that does not parse is a
    ValueError there. `disable_any_whitespace`: JSON without free whitespace between its tokens
    (vLLM's option; by default any amount is allowed, as JSON is)."""
    json: Optional[Union[str, dict]] = None
    regex: Optional[str] = None
    choice: Optional[list[str]] = None
    grammar: Optional[str] = None
    json_object: Optional[bool] = None
    # xgrammar's structural tag (vLLM's): free text whose tagged parts are held to a schema, as a dict
    # or its JSON text: {"structures": [{"begin", "schema", "end"}], "triggers": [...]} or
    # {"type": "structural_tag", "format": {...}}
    structural_tag: Optional[Union[str, dict]] = None
    disable_any_whitespace: bool = False
    # reasoning models: the grammar holds only what follows these tokens (the end of the thinking,
    # `</think>`; the server's --reasoning_parser sets them), or all of it when they are in the prompt
    reasoning_end_token_ids: Optional[list[int]] = None

    def __post_init__(self) -> None:
        if isinstance(self.choice, tuple):
            self.choice = list(self.choice)
        self.validate()

    @property
    def kind(self) -> str:
        return next(k for k in _KINDS if getattr(self, k) not in (None, False))

    def validate(self) -> None:
        def bad(name: str, value, accepted: str) -> None:
            raise ValueError(f"structured_outputs.{name}={short_repr(value)} is invalid: {accepted}")

        given = [k for k in _KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(f"structured_outputs sets {', '.join(given) if given else 'nothing'}: expected exactly "
                             f"one of {', '.join(_KINDS)}")
        if self.json is not None and not (isinstance(self.json, dict) or (isinstance(self.json, str) and self.json)):
            bad("json", self.json, "expected a JSON schema (an object, or its JSON text)")
        tag = self.structural_tag
        if tag is not None and not (isinstance(tag, dict) or (isinstance(tag, str) and tag)):
            bad("structural_tag", tag, "expected a structural tag (an object, or its JSON text)")
        for name in ("regex", "grammar"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, str) and v):
                bad(name, v, "expected a non-empty string")
        if self.choice is not None and not (isinstance(self.choice, list) and self.choice
                                            and all(isinstance(c, str) and c for c in self.choice)):
            bad("choice", self.choice, "expected a non-empty list of non-empty strings")
        if self.json_object not in (None, True, False):
            bad("json_object", self.json_object, "expected true or false")
        if not isinstance(self.disable_any_whitespace, bool):
            bad("disable_any_whitespace", self.disable_any_whitespace, "expected true or false")
        ids = self.reasoning_end_token_ids
        if ids is not None and not (isinstance(ids, list) and ids and all(_int_in(t, 0, INT64_MAX) for t in ids)):
            bad("reasoning_end_token_ids", ids, "expected a non-empty list of token ids")

    @classmethod
    def of(cls, value) -> "StructuredOutputsParams":
        """One from a dict of its fields (the engine's wire, a server request) or as is."""
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"structured_outputs={short_repr(value)} is invalid: expected StructuredOutputsParams "
                             f"or a dict of its fields ({', '.join(_SO_FIELDS)})")
        unknown = [k for k in value if k not in _SO_FIELDS]
        if unknown:
            raise ValueError(f"structured_outputs has unknown field {short_repr(unknown[0])}: accepted "
                             f"{', '.join(_SO_FIELDS)}")
        return cls(**value)


GuidedDecodingParams = StructuredOutputsParams  # vLLM's former name and TensorRT-LLM's


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
    allowed_token_ids: Optional[list[int]] = None  # vLLM's: sample only among these ids
    logprobs: Optional[int] = None  # top-k logprobs per generated token (0: only the chosen one)
    prompt_logprobs: Optional[int] = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    detokenize: bool = True
    # the output must match a JSON schema, regex, choice or grammar (StructuredOutputsParams)
    structured_outputs: Optional[StructuredOutputsParams] = None
    # vLLM's: words never generated; the front tokenizes each (alone and after a space) into
    # bad_words_token_ids, and the engine bans a word's last token once the output ends with the rest
    bad_words: Optional[list[str]] = None
    bad_words_token_ids: Optional[list[list[int]]] = None
    # vLLM's: only the prompt's last k tokens are used (-1: the last max_seq_len); applied by the front
    # (LLM, or the API server's own field) before the prompt reaches the engine
    truncate_prompt_tokens: Optional[int] = None

    def __post_init__(self) -> None:
        if self.structured_outputs is not None:
            self.structured_outputs = StructuredOutputsParams.of(self.structured_outputs)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = _listed("stop", self.stop, "a string or a list of non-empty strings")
        self.stop_token_ids = _listed("stop_token_ids", self.stop_token_ids,
                                      "a list of token ids (integers in [0, 2**63-1])")
        if isinstance(self.bad_words, str):
            self.bad_words = [self.bad_words]
        if self.allowed_token_ids is not None and not isinstance(self.allowed_token_ids, (str, bytes, dict)):
            try:
                self.allowed_token_ids = list(self.allowed_token_ids)
            except TypeError:
                pass  # validate() names it
        if self.top_k is None or self.top_k == -1:  # -1 (vLLM) and 0 (TensorRT-LLM) both disable it
            self.top_k = 0
        if self.logit_bias is not None and not isinstance(self.logit_bias, dict):
            raise ValueError(f"SamplingParams.logit_bias={short_repr(self.logit_bias)} is invalid: expected a dict of "
                             f"token ids >= 0 mapped to values in [-100, 100]")
        if self.logit_bias:
            try:
                self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
            except (TypeError, ValueError, OverflowError):
                raise ValueError(f"SamplingParams.logit_bias={short_repr(self.logit_bias)} is invalid: expected token "
                                 f"ids >= 0 mapped to values in [-100, 100]") from None
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5 or self.top_k == 1

    def validate(self) -> None:
        def bad(name: str, value, accepted: str) -> None:
            raise ValueError(f"SamplingParams.{name}={short_repr(value)} is invalid: {accepted}")

        # max_tokens and n have no upper bound here: the engine's validate caps them with its own
        # numbers (max_seq_len; max_n in validate_for_model), which an error should show as accepted
        if self.max_tokens is not None and not _int_in(self.max_tokens, 1, math.inf):
            bad("max_tokens", self.max_tokens, "expected an integer >= 1 (or None for up to max_seq_len)")
        if not _int_in(self.min_tokens, 0, INT64_MAX):
            bad("min_tokens", self.min_tokens, "expected an integer in [0, 2**63-1]")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad("min_tokens", self.min_tokens, f"must be <= max_tokens ({self.max_tokens})")
        if not (_finite(self.temperature) and self.temperature >= 0.0):
            bad("temperature", self.temperature, "expected a finite number >= 0 (0 means greedy)")
        if not _int_in(self.top_k, 0, INT64_MAX):
            bad("top_k", self.top_k, "expected -1 or 0 (disabled) or an integer in [1, 2**63-1]")
        if not (_finite(self.top_p) and 0.0 < self.top_p <= 1.0):
            bad("top_p", self.top_p, "expected a number in (0, 1]")
        if not (_finite(self.min_p) and 0.0 <= self.min_p <= 1.0):
            bad("min_p", self.min_p, "expected a number in [0, 1]")
        if not _int_in(self.n, 1, math.inf):
            bad("n", self.n, "expected an integer >= 1")
        # sample i of n is seeded with seed + i: every one of those must be an int64 too
        if self.seed is not None and not _int_in(self.seed, INT64_MIN, INT64_MAX - (self.n - 1)):
            bad("seed", self.seed, "expected an integer in [-2**63, 2**63-1] (int64, as vLLM) or None"
                + (f"; with n={self.n}, at most 2**63-{self.n} (sample i uses seed + i)" if self.n > 1 else ""))
        if any((not isinstance(s, str)) or s == "" for s in self.stop):
            bad("stop", self.stop, "expected non-empty strings")
        for t in self.stop_token_ids:
            if not _int_in(t, 0, INT64_MAX):
                bad("stop_token_ids", self.stop_token_ids, "expected token ids (integers in [0, 2**63-1])")
        if not (_finite(self.repetition_penalty) and self.repetition_penalty > 0.0):
            bad("repetition_penalty", self.repetition_penalty, "expected a finite number > 0 (1 disables it)")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not (_finite(v) and -2.0 <= v <= 2.0):
                bad(name, v, "expected a number in [-2, 2]")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and not _int_in(v, 0, 20):
                bad(name, v, "expected an integer in [0, 20] or None")
        if self.end_id is not None and not _int_in(self.end_id, 0, INT64_MAX):
            bad("end_id", self.end_id, "expected a token id (an integer in [0, 2**63-1])")
        if self.logit_bias:
            for k, v in self.logit_bias.items():
                if not (_int_in(k, 0, INT64_MAX) and _finite(v) and -100.0 <= v <= 100.0):
                    bad("logit_bias", {k: v}, "expected token ids (integers >= 0) mapped to values in [-100, 100]")

        if self.bad_words is not None and not (isinstance(self.bad_words, list)
                                               and all(isinstance(w, str) and w.strip() for w in self.bad_words)):
            bad("bad_words", self.bad_words, "expected a list of non-blank strings")
        if self.bad_words_token_ids is not None and not (
                isinstance(self.bad_words_token_ids, list)
                and all(isinstance(w, list) and w and all(_int_in(t, 0, INT64_MAX) for t in w)
                        for w in self.bad_words_token_ids)):
            bad("bad_words_token_ids", self.bad_words_token_ids, "expected a list of non-empty lists of token ids")
        for name in ("include_stop_str_in_output", "ignore_eos", "skip_special_tokens", "spaces_between_special_tokens",
                     "detokenize"):
            if not isinstance(getattr(self, name), bool):
                bad(name, getattr(self, name), "expected True or False")
        k = self.truncate_prompt_tokens
        if k is not None and (isinstance(k, bool) or not (_int_in(k, -1, -1) or _int_in(k, 1, INT64_MAX))):
            bad("truncate_prompt_tokens", k, "expected -1 (the last max_seq_len tokens), an integer >= 1, or None")
        if self.allowed_token_ids is not None:
            ids = self.allowed_token_ids
            if not (isinstance(ids, list) and ids and all(_int_in(t, 0, INT64_MAX) for t in ids)):
                bad("allowed_token_ids", ids, "expected a non-empty list of token ids (integers >= 0) or None")

    def validate_for_model(self, vocab_size: int, max_n: Optional[int] = None) -> None:
        """Checks that need the engine: token ids must exist in the vocabulary, and n (the sequences
        this request fans out to) may not pass `max_n` (LlmArgs.max_n, default max_batch_size)."""
        if max_n is not None and self.n > max_n:
            raise ValueError(f"SamplingParams.n={self.n} is invalid: expected an integer in [1, {max_n}] "
                             f"(the engine's max_n, which defaults to max_batch_size)")
        for name, ids in (("stop_token_ids", self.stop_token_ids),
                          ("logit_bias", list((self.logit_bias or {}).keys())),
                          ("allowed_token_ids", self.allowed_token_ids or []),
                          ("end_id", [] if self.end_id is None else [self.end_id]),
                          ("bad_words_token_ids", [t for w in self.bad_words_token_ids or [] for t in w]),
                          ("structured_outputs.reasoning_end_token_ids",
                           (self.structured_outputs.reasoning_end_token_ids or []) if self.structured_outputs else [])):
            for t in ids:
                if t >= vocab_size:
                    raise ValueError(f"SamplingParams.{name} contains token id {t}, "
                                     f"but the vocabulary has {vocab_size} ids (0..{vocab_size - 1})")

    def with_bad_words_tokenized(self, tokenizer) -> "SamplingParams":
        """bad_words as token ids (vLLM's rule): each word alone and after a space, as the tokenizer
        writes them without special tokens; a no-op when there are none (or they are given as ids)."""
        if not self.bad_words or self.bad_words_token_ids is not None:
            return self
        if tokenizer is None:
            raise ValueError("SamplingParams.bad_words needs the tokenizer (skip_tokenizer_init is set): pass "
                             "bad_words_token_ids instead")
        seqs: list[list[int]] = []
        for word in self.bad_words:
            for text in (word.lstrip(), " " + word.lstrip()):
                ids = list(tokenizer.encode(text, add_special_tokens=False))
                if ids and ids not in seqs:
                    seqs.append(ids)
        return self.clone(bad_words_token_ids=seqs)

    def clone(self, **changes) -> "SamplingParams":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_STRUCTURED = "here: structured_outputs=StructuredOutputsParams(json=..., regex=..., choice=... or grammar=...)"
_BEAM = "beam search is LLM.beam_search(prompts, BeamSearchParams(beam_width=..., max_tokens=...)), as vLLM's"
# other engines' SamplingParams (and transformers' generate) arguments this one lacks: what to do instead
FOREIGN_ARGS = {
    **{k: _STRUCTURED for k in ("guided_json", "guided_regex", "guided_choice", "guided_grammar")},
    **{k: _BEAM for k in ("use_beam_search", "beam_width", "length_penalty", "early_stopping", "num_beams")},
    "best_of": "best_of is not supported; n samples n sequences",
    "logits_processors": "custom logits processors are not supported",
    "max_new_tokens": "transformers' name; here: max_tokens",
    "num_return_sequences": "transformers' name; here: n",
    "do_sample": "transformers' switch; here: temperature=0 (or top_k=1) for greedy decoding",
    "stop_sequences": "here: stop",
    "pad_id": "not needed: sequences are not padded",
}
_dataclass_init = SamplingParams.__init__


def _init(self, *args, **kwargs) -> None:
    """The dataclass's __init__, with an unknown keyword's TypeError naming what to use instead.
    `guided_decoding` (vLLM's former name, TensorRT-LLM's) is taken as structured_outputs."""
    if "guided_decoding" in kwargs:
        if kwargs.get("structured_outputs") is not None:
            raise TypeError("SamplingParams got both guided_decoding and structured_outputs: they are one setting")
        kwargs["structured_outputs"] = kwargs.pop("guided_decoding")
    for name in kwargs:
        if name not in _FIELDS:
            close = nearest(name, _FIELDS, cutoff=0.75)
            hint = (FOREIGN_ARGS.get(name) or (f"did you mean {close!r}?" if close else None)
                    or f"accepted: {', '.join(_FIELDS)}")
            raise TypeError(f"SamplingParams got an unexpected keyword argument {name!r} ({hint})")
    _dataclass_init(self, *args, **kwargs)


_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams))
_SO_FIELDS = tuple(f.name for f in dataclasses.fields(StructuredOutputsParams))
_init.__signature__ = inspect.signature(_dataclass_init)
SamplingParams.__init__ = _init
