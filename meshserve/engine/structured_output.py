"""Structured outputs: a request's output held to a JSON schema, regex, choice, grammar or structural tag.

The engine core compiles a request's `StructuredOutputsParams` with xgrammar (the library vLLM,
SGLang and TensorRT-LLM use) against the model's tokenizer, and keeps one `GrammarState` (an
xgrammar matcher) per sequence on its `Request`. Each step that samples a token for such a request
carries the matcher's bitmask of allowed tokens (`ScheduledRequest.grammar_mask`: one bit per
vocabulary id, packed in little-endian 32-bit words); the sampling rank bans every other id
(worker/input_batch.py), and `Request.append_output` advances the matcher with the sampled token.
A grammar request therefore never overlaps its next step with the running one (the scheduler's
`_can_overlap`): its next mask depends on the token being sampled.

The tokenizer is loaded here only when the first such request arrives (`StructuredOutputs.tokenizer`
is set up front by LLM, which has it; the API server's engine loads it from `tokenizer_path`).
xgrammar itself is imported then too, so an engine that never sees a grammar never pays for it.
Compilation runs on the step loop; the compiler caches what it compiled, so a repeated schema is free.
"""
from __future__ import annotations

import json
import logging
import re
import warnings
from typing import Optional

from meshserve.sampling_params import StructuredOutputsParams, short_repr

logger = logging.getLogger(__name__)

_NATIVE_PREFIX = re.compile(r"^\[[0-9:]+\] \S+:[0-9]+: (Check failed: \(.*?\) is false: )?")


def _one_line(err: Exception) -> str:
    """xgrammar's error without its C++ source prefix, on one line."""
    text = _NATIVE_PREFIX.sub("", str(err).strip())
    return " ".join(text.split())[:300]


class GrammarState:
    """One sequence's matcher and its bitmask buffer."""

    def __init__(self, matcher, bitmask):
        self.matcher = matcher
        self.bitmask = bitmask  # torch int32 [1, ceil(vocab / 32)]

    def accept(self, token_id: int) -> bool:
        """Advance by a sampled token; False when the grammar does not allow it."""
        return bool(self.matcher.accept_token(token_id))

    @property
    def terminated(self) -> bool:
        return bool(self.matcher.is_terminated())

    def next_mask(self) -> bytes:
        """The tokens allowed next: bit i of little-endian word i // 32 is id i."""
        self.matcher.fill_next_token_bitmask(self.bitmask)
        return self.bitmask.numpy().astype("<i4", copy=False).tobytes()


class StructuredOutputs:
    """The engine's grammar compiler, built on first use."""

    def __init__(self, vocab_size: int, eos_token_ids: list[int], tokenizer_path: Optional[str] = None):
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self.tokenizer_path = tokenizer_path
        self.tokenizer = None  # LLM sets its own; else loaded from tokenizer_path on first use
        self.disable_any_whitespace = False  # LlmArgs.structured_outputs_config's, for every request
        self._compiler = None
        self._xgr = None

    def _compiler_or_raise(self):
        if self._compiler is not None:
            return self._compiler
        if self.tokenizer is None:
            if self.tokenizer_path is None:
                raise ValueError("structured_outputs needs the model's tokenizer, which this engine was started "
                                 "without (skip_tokenizer_init)")
            self.tokenizer = _auto_tokenizer(self.tokenizer_path)
        try:
            import xgrammar as xgr
        except ImportError as e:
            raise ValueError(f"structured_outputs needs the xgrammar package, which cannot be imported ({e}); "
                             f"pip install xgrammar") from None
        info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                  stop_token_ids=self.eos_token_ids or None)
        self._xgr = xgr
        self._compiler = xgr.GrammarCompiler(info, max_threads=4, cache_enabled=True)
        logger.info("structured outputs: xgrammar %s over a vocabulary of %d ids (%s)",
                    getattr(xgr, "__version__", ""), self.vocab_size, info.vocab_type.name)
        return self._compiler

    def compile(self, spec: StructuredOutputsParams):
        """The compiled grammar; ValueError naming the field when it does not parse."""
        comp = self._compiler_or_raise()
        kind = spec.kind
        any_whitespace = not (spec.disable_any_whitespace or self.disable_any_whitespace)
        try:
            if kind == "json":
                return comp.compile_json_schema(_schema_text(spec), any_whitespace=any_whitespace)
            if kind == "json_object":  # OpenAI's: a JSON object (not any JSON value)
                return comp.compile_json_schema('{"type": "object"}', any_whitespace=any_whitespace)
            if kind == "regex":
                return comp.compile_regex(spec.regex)
            if kind == "choice":
                return comp.compile_grammar(_choice_ebnf(spec.choice))
            if kind == "structural_tag":
                with warnings.catch_warnings():  # the structures + triggers form is xgrammar's legacy call
                    warnings.simplefilter("ignore", DeprecationWarning)
                    return comp.compile_structural_tag(*_structural_tag_args(self._xgr, spec.structural_tag))
            return comp.compile_grammar(spec.grammar)
        except (RuntimeError, ValueError, TypeError, KeyError) as e:
            raise _invalid(spec, e) from None

    def state(self, spec: StructuredOutputsParams, stop_token_ids: list[int], outputs=()) -> GrammarState:
        """A sequence's matcher, advanced over the tokens it already has (`outputs`: a resumed request's,
        a generation server's first token): ValueError when those do not fit the grammar."""
        compiled = self.compile(spec)
        xgr = self._xgr
        matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=list(stop_token_ids) or None)
        state = GrammarState(matcher, xgr.allocate_token_bitmask(1, self.vocab_size))
        for i, t in enumerate(outputs):
            if not state.accept(t):
                raise ValueError(f"the request's output token {i} (id {t}) does not match its structured_outputs")
        return state


def _schema_text(spec: StructuredOutputsParams) -> str:
    return spec.json if isinstance(spec.json, str) else json.dumps(spec.json)


def _structural_tag_args(xgr, value) -> tuple:
    """xgrammar's arguments for a structural tag: (items, triggers) for vLLM's legacy form
    {"structures": [{"begin", "schema", "end"}], "triggers": [...]}, else the tag's JSON text
    (xgrammar's {"type": "structural_tag", "format": {...}})."""
    tag = json.loads(value) if isinstance(value, str) else value
    if not isinstance(tag, dict):
        raise ValueError("expected a JSON object")
    if "structures" not in tag:
        return (json.dumps(tag),)
    structures, triggers = tag.get("structures"), tag.get("triggers")
    if not (isinstance(structures, list) and structures
            and all(isinstance(x, dict) and {"begin", "schema", "end"} <= set(x) for x in structures)
            and isinstance(triggers, list) and triggers and all(isinstance(t, str) and t for t in triggers)):
        raise ValueError("expected {'structures': [{'begin': ..., 'schema': {...}, 'end': ...}, ...], "
                         "'triggers': ['...', ...]}")
    items = [xgr.StructuralTagItem(begin=x["begin"], end=x["end"],
                                   schema=x["schema"] if isinstance(x["schema"], str) else json.dumps(x["schema"]))
             for x in structures]
    return items, triggers


def _invalid(spec: StructuredOutputsParams, err: Exception) -> ValueError:
    return ValueError(f"structured_outputs.{spec.kind}={short_repr(getattr(spec, spec.kind))} is invalid: "
                      f"{_one_line(err)}")


def check_syntax(spec: StructuredOutputsParams) -> None:
    """Parse the schema / regex / grammar without a tokenizer (xgrammar's Grammar), as the API server
    does before answering: a ValueError naming the field, before a stream's headers go out."""
    try:
        import xgrammar as xgr
    except ImportError:
        return  # the engine refuses it, naming the missing package
    kind = spec.kind
    try:
        if kind == "json":
            xgr.Grammar.from_json_schema(_schema_text(spec))
        elif kind == "regex":
            xgr.Grammar.from_regex(spec.regex)
        elif kind == "grammar":
            xgr.Grammar.from_ebnf(spec.grammar)
        elif kind == "structural_tag":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                xgr.Grammar.from_structural_tag(*_structural_tag_args(xgr, spec.structural_tag))
    except (RuntimeError, ValueError, TypeError, KeyError) as e:
        raise _invalid(spec, e) from None


def _choice_ebnf(choices: list[str]) -> str:
    """A grammar whose sentences are exactly `choices` (JSON string literals are EBNF's too)."""
    return "root ::= " + " | ".join(json.dumps(c) for c in choices)


def _auto_tokenizer(path: str):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path)
