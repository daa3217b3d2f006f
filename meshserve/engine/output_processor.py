"""OutputProcessor: the front's one path from engine outputs to user requests, shared by `LLM`
(offline) and the API server's `AsyncEngine`.

It owns the RequestStates (detokenizer.py) of requests in flight: it expands a request with n > 1
into n engine sequences (sample i seeded with seed + i), routes each EngineCoreOutput to its
request, applies stop strings (a sequence that hits one must be aborted in the engine), and says
which requests a streaming reader should hear from now (stream_interval). Callers own transport:
the LLM steps an EngineCore in-process, AsyncEngine talks to an engine process over ZMQ.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterable, Optional

from meshserve.engine.detokenizer import RequestState, TokenStrings
from meshserve.engine.messages import EngineCoreOutput
from meshserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class ProcessedOutputs:
    """What one batch of engine outputs did to the requests in flight."""
    touched: list[RequestState] = field(default_factory=list)  # requests with news, in first-seen order
    due: list[RequestState] = field(default_factory=list)  # of those: unfinished, a streaming reader is due
    finished: list[RequestState] = field(default_factory=list)  # of those: every sequence finished
    abort_seq_ids: list[str] = field(default_factory=list)  # sequences the engine must stop (stop strings)
    failed: list[tuple[RequestState, Exception]] = field(default_factory=list)  # output processing raised
    num_tokens: int = 0  # new tokens routed


class OutputProcessor:
    def __init__(self, tokenizer, stream_interval: int = 1):
        self.tokenizer = tokenizer
        self.token_text = TokenStrings(tokenizer) if tokenizer is not None else None  # logprobs' decoded_token
        self.stream_interval = stream_interval
        self.requests: dict[str, RequestState] = {}  # request id -> state
        self._by_seq: dict[str, RequestState] = {}  # unfinished engine sequence id -> its request

    def add_request(self, request_id: str, prompt: Optional[str], prompt_token_ids: list[int],
                    params: SamplingParams) -> tuple[RequestState, list[tuple[str, SamplingParams]]]:
        """Register a request; returns its state and the engine sequences to submit, as
        (sequence id, params) pairs."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if params.n == 1:
            seqs = [(request_id, params)]
        else:
            seqs = [(f"{request_id}-{i}", params.clone(n=1, seed=None if params.seed is None else params.seed + i))
                    for i in range(params.n)]
        state = RequestState(request_id, prompt, list(prompt_token_ids), params, self.tokenizer,
                             [sid for sid, _ in seqs], self.token_text)
        self.requests[request_id] = state
        for sid, _ in seqs:
            self._by_seq[sid] = state
        return state, seqs

    def process(self, outputs: Iterable[EngineCoreOutput]) -> ProcessedOutputs:
        res = ProcessedOutputs()
        seen: dict[str, RequestState] = {}
        for out in outputs:
            state = self._by_seq.get(out.request_id)
            if state is None:
                continue  # aborted, or already stopped here
            seq = state.seqs[out.request_id]
            if seq.finish_reason is not None:
                continue  # e.g. the engine's output for a sequence a stop string just ended
            res.num_tokens += len(out.new_token_ids)
            try:
                hit_stop = state.process(out)
            except Exception as e:  # noqa: BLE001 - e.g. a tokenizer error: fail this request only
                logger.exception("processing the output of %s failed", out.request_id)
                res.abort_seq_ids.extend(self.abort_request(state.request_id))
                res.failed.append((state, e))
                continue
            if hit_stop:
                res.abort_seq_ids.append(out.request_id)
            if seq.finish_reason is not None:
                self._by_seq.pop(out.request_id, None)
            seen[state.request_id] = state
        failed_ids = {s.request_id for s, _ in res.failed}
        for rid, state in seen.items():
            if rid in failed_ids:
                continue
            res.touched.append(state)
            if state.finished:
                res.finished.append(state)
                self.requests.pop(rid, None)
            elif state.stream_due(self.stream_interval):
                res.due.append(state)
        return res

    def abort_request(self, request_id: str) -> list[str]:
        """Forget a request (client gone, or failed); marks its open sequences "abort" and returns
        their ids, which the caller aborts in the engine."""
        state = self.requests.pop(request_id, None)
        if state is None:
            return []
        open_ids = [sid for sid, seq in state.seqs.items() if seq.finish_reason is None]
        state.abort()
        for sid in state.seq_ids:
            self._by_seq.pop(sid, None)
        return open_ids

    def request_of(self, seq_id: str) -> Optional[RequestState]:
        """The request an unfinished engine sequence belongs to (None: unknown or done)."""
        return self._by_seq.get(seq_id)

    def num_pending_sequences(self) -> int:
        """Sequences that have not produced a token yet (waiting in the engine, or in prefill)."""
        return sum(1 for sid, st in self._by_seq.items() if not st.seqs[sid].token_ids)
