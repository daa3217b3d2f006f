"""Front-side output processing: incremental detokenizing, stop strings, and RequestOutputs.

Runs where the tokenizer lives (the LLM process, or the API server), never in the engine loop.
Text grows through the tokenizers library's DecodeStream (correct across multi-byte and
merged-space tokens). A stop string cuts the text cleanly, wherever token boundaries fall; while
streaming, the last len(longest stop)-1 characters are held back so streamed deltas joined equal
the final text.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

from meshserve.engine.messages import EngineCoreOutput
from meshserve.outputs import CompletionOutput, RequestOutput, logprob_entry
from meshserve.sampling_params import SamplingParams

try:
    from tokenizers.decoders import DecodeStream
except ImportError:  # pragma: no cover - old tokenizers
    DecodeStream = None


class TokenStrings:
    """Token id -> its text (as OpenAI's logprobs show tokens), cached."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        s = self._cache.get(token_id)
        if s is None:
            s = self.tokenizer.decode([token_id], skip_special_tokens=False)
            if len(self._cache) < 200_000:
                self._cache[token_id] = s
        return s

    def text(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=False)


class IncrementalDetokenizer:
    def __init__(self, tokenizer, params: SamplingParams, prompt_token_ids: list[int]):
        self.tokenizer = tokenizer
        self.params = params
        self.text = ""
        self.enabled = params.detokenize and tokenizer is not None
        self._stream = None
        self._ids: list[int] = []
        self._prefix_text = ""
        if self.enabled:
            backend = getattr(tokenizer, "_tokenizer", None) or getattr(tokenizer, "backend_tokenizer", None)
            if DecodeStream is not None and backend is not None:
                self._backend = backend
                try:
                    self._stream = DecodeStream(skip_special_tokens=params.skip_special_tokens)
                except TypeError:
                    self._stream = DecodeStream(params.skip_special_tokens)

    def add(self, token_ids: list[int]) -> str:
        """Append tokens; returns the text they added."""
        if not self.enabled:
            return ""
        new = []
        if self._stream is not None:
            for t in token_ids:
                piece = self._stream.step(self._backend, t)
                if piece:
                    new.append(piece)
            delta = "".join(new)
        else:  # slow tokenizers: decode the whole output and diff
            self._ids.extend(token_ids)
            full = self.tokenizer.decode(self._ids, skip_special_tokens=self.params.skip_special_tokens)
            delta = full[len(self._prefix_text):] if full.startswith(self._prefix_text) else ""
            self._prefix_text = full
        self.text += delta
        return delta


@dataclass
class SeqState:
    index: int
    detok: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    logprobs: Optional[list[dict]] = None
    cumulative_logprob: Optional[float] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[object] = None
    sent_text_len: int = 0  # characters already streamed
    sent_tokens: int = 0


class RequestState:
    """Front-side state of one user request (n sequences)."""

    def __init__(self, request_id: str, prompt: Optional[str], prompt_token_ids: list[int], params: SamplingParams,
                 tokenizer, seq_ids: list[str], token_text: Optional["TokenStrings"] = None):
        self.request_id = request_id
        self.token_text = token_text  # logprobs' decoded_token (None: left None)
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.seq_ids = seq_ids
        self.seqs = {sid: SeqState(i, IncrementalDetokenizer(tokenizer, params, prompt_token_ids),
                                   logprobs=[] if params.logprobs is not None else None,
                                   cumulative_logprob=0.0 if params.logprobs is not None else None)
                     for i, sid in enumerate(seq_ids)}
        self.prompt_logprobs: Optional[list] = None
        self.num_cached_tokens = 0
        self.kv_transfer_params: Optional[dict] = None  # context_only: the pinned KV (EngineCoreOutput)
        self.arrival_time = time.monotonic()
        self.first_token_time: Optional[float] = None
        self.finished_time: Optional[float] = None  # when the last of its sequences finished
        self.hold_back = max((len(s) for s in params.stop), default=1) - 1
        self.unstreamed_tokens = 0  # tokens processed since a streaming reader last got an output
        self.streamed = False
        self.num_resumed_output_tokens = 0  # resume_output: outputs of an earlier run this one continues

    def stream_due(self, interval: int) -> bool:
        """stream_interval: whether a streaming reader gets a partial output now: the first at once,
        then once `interval` more tokens have come (the end is sent regardless). Resets on yes."""
        if interval > 1 and self.streamed and self.unstreamed_tokens < interval:
            return False
        self.unstreamed_tokens, self.streamed = 0, True
        return True

    def resume_output(self, token_ids: list[int]) -> None:
        """A resumed request (an orchestrator's failover: the prompt ends with these output tokens
        of an earlier run): decode them as output, so the text goes on as that run's would have
        (across multi-byte characters and merged spaces, and stop strings across the boundary).
        Their text is part of the output's text; token_ids and counts stay the new tokens'; they
        count towards min_tokens (as the engine counts them: engine/request.py). Call before any
        output arrives."""
        self.num_resumed_output_tokens = len(token_ids)
        for seq in self.seqs.values():
            seq.detok.add(list(token_ids))

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.seqs.values())

    def process(self, out: EngineCoreOutput) -> bool:
        """Apply one engine output; returns True when this sequence hit a stop string (the
        engine must then abort it)."""
        seq = self.seqs[out.request_id]
        if out.prompt_logprobs is not None:
            entries = [None if e is None else logprob_entry(*e, decode=self.token_text) for e in out.prompt_logprobs]
            self.prompt_logprobs = (self.prompt_logprobs or []) + entries
        if out.num_cached_tokens:
            self.num_cached_tokens = out.num_cached_tokens
        if out.kv_transfer_params is not None:
            self.kv_transfer_params = out.kv_transfer_params
        if out.new_token_ids and self.first_token_time is None:
            self.first_token_time = time.monotonic()
        seq.token_ids.extend(out.new_token_ids)
        self.unstreamed_tokens += len(out.new_token_ids)
        if seq.logprobs is not None:
            for e in out.new_logprobs:
                seq.logprobs.append(logprob_entry(*e, decode=self.token_text))
                seq.cumulative_logprob += e[1][0]
        before = len(seq.detok.text)
        seq.detok.add(out.new_token_ids)
        hit_stop = False
        if out.finish_reason is not None:
            seq.finish_reason = out.finish_reason
            seq.stop_reason = out.stop_reason
        elif self.params.stop and len(seq.token_ids) + self.num_resumed_output_tokens >= self.params.min_tokens:
            hit_stop = self._check_stop(seq, before)
        if seq.finish_reason is not None and self.finished:
            self.finished_time = time.monotonic()
        return hit_stop

    def _check_stop(self, seq: SeqState, before: int) -> bool:
        text = seq.detok.text
        start = max(0, before - self.hold_back)
        best = None
        for s in self.params.stop:
            i = text.find(s, start)
            if i != -1 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return False
        i, s = best
        seq.detok.text = text[: i + len(s)] if self.params.include_stop_str_in_output else text[:i]
        seq.finish_reason, seq.stop_reason = "stop", s
        return True

    def abort(self) -> None:
        for s in self.seqs.values():
            if s.finish_reason is None:
                s.finish_reason = "abort"
        if self.finished_time is None:
            self.finished_time = time.monotonic()

    def make_output(self, streaming_delta: bool = False) -> RequestOutput:
        """The request's output so far. With streaming_delta, each CompletionOutput carries only
        the text and tokens added since the last call (held-back stop-string prefixes excluded)."""
        outs = []
        for seq in sorted(self.seqs.values(), key=lambda s: s.index):
            text, ids = seq.detok.text, seq.token_ids
            lps = seq.logprobs
            if streaming_delta:
                end = len(text) if seq.finish_reason is not None else max(seq.sent_text_len,
                                                                          len(text) - self.hold_back)
                text, seq.sent_text_len = text[seq.sent_text_len:end], end
                ids, lps = ids[seq.sent_tokens:], (lps[seq.sent_tokens:] if lps is not None else None)
                seq.sent_tokens = len(seq.token_ids)
            outs.append(CompletionOutput(seq.index, text, list(ids), seq.finish_reason,
                                         seq.stop_reason, lps, seq.cumulative_logprob))
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, outs, self.finished,
                             prompt_logprobs=self.prompt_logprobs, num_cached_tokens=self.num_cached_tokens,
                             kv_transfer_params=self.kv_transfer_params, metrics={"arrival_time": self.arrival_time, "first_token_time": self.first_token_time,
                                      "finished_time": self.finished_time})
