"""A completion resuming an earlier run (`resume_output_token_ids`): the orchestrator's failover
(docs/disaggregated.md), checked and turned into the engine's params."""
from __future__ import annotations

from typing import Optional

from meshserve.engine.engine_core import EngineLimits
from meshserve.serve.protocol import CompletionRequest, bad_request


def resume_request(lim: EngineLimits, req: CompletionRequest, prompts: list[tuple[Optional[str], list[int]]],
                   params, max_tokens: Optional[int]):
    """A completion resuming an earlier run (`resume_output_token_ids`: the orchestrator's failover,
    docs/disaggregated.md): the prompt followed by those tokens is prefilled, they are decoded as
    output (the answer's text is the whole output's; token_ids, usage's completion_tokens and
    the request's max_tokens / min_tokens count the new tokens), and without max_tokens the
    limit is the context, as for chat. The engine counts them as outputs (engine/request.py), so
    max_tokens and min_tokens go to it counted from that run's start, and penalties, stop ids
    and a seed's draws go on as in that run. Returns the resumed ids and the engine's params; a
    400 for what cannot be resumed."""
    where = "resume_output_token_ids"
    if req.disaggregated_params is not None:
        raise bad_request(f"{where} and disaggregated_params do not go together", where)
    if len(prompts) != 1 or req.n != 1 or req.best_of not in (None, 1):
        raise bad_request(f"{where}: a resumed request has one prompt and one sequence (n=1)", where)
    if req.echo or req.logprobs is not None or req.prompt_logprobs is not None:
        raise bad_request(f"{where}: echo and logprobs are not supported when resuming", where)
    resume = list(req.resume_output_token_ids)
    vocab = lim.vocab_size
    bad = [t for t in resume if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab]
    if bad:
        raise bad_request(f"{where} contains token id {bad[0]!r} outside the vocabulary (valid ids are "
                          f"0..{vocab - 1})", where)
    if not resume:
        return resume, params
    k = len(resume)
    if max_tokens is None:  # as chat's uninterrupted run: up to the context, and what the KV cache holds
        max_tokens = max(1, min(lim.max_seq_len, lim.kv_capacity_tokens) - len(prompts[0][1]) - k)
    # min_tokens 0 stays 0: the first run's was at most k then, and every new token is past it
    min_tokens = params.min_tokens + k if params.min_tokens else 0
    return resume, params.clone(max_tokens=max_tokens + k, min_tokens=min_tokens)
