"""vLLM's `use_beam_search` on /v1/completions and /v1/chat/completions (meshserve/beam_search.py):
`n` beams per prompt, each round one engine request of one token per live beam (all prompts' beams
together), the best n beams answered whole as the n choices."""
from __future__ import annotations

import re

from fastapi import Request

from meshserve.beam_search import BeamBatch, BeamSearch
from meshserve.outputs import CompletionOutput, RequestOutput
from meshserve.serve import responses
from meshserve.serve.protocol import bad_request, from_value_error
from meshserve.serve.tools import ToolError, ToolPlan


class _PromptOnly:
    """What the response contexts read of a request stream (its prompt's ids), for answers made without one."""

    def __init__(self, ids: list[int]):
        self.state = RequestOutput("", None, list(ids), [])


async def chat(serving, raw: Request, req, request_id: str) -> dict:
    serving.check_model(req.model)
    try:
        plan = ToolPlan.of(req.tools, req.tool_choice, serving.config.tool_call_parser, req.parallel_tool_calls)
    except ToolError as e:
        raise bad_request(str(e), e.param) from None
    if plan.mode != "none":
        raise bad_request(f"tool_choice={plan.mode!r}: tool calls are not available with use_beam_search; set "
                          f"tool_choice to 'none'", "tool_choice")
    serving.check_chat_template(req)
    [(text, ids)] = req.truncated([await serving.chat_prompt(req)], serving.engine.limits.max_seq_len)
    max_tokens = req.requested_max_tokens
    if max_tokens is None:
        lim = serving.engine.limits
        max_tokens = max(1, min(lim.max_seq_len, lim.kv_capacity_tokens) - len(ids))
    return await answer(serving, raw, req, [(text, ids)], max_tokens, request_id, chat=True)


async def answer(serving, raw: Request, req, prompts: list, max_tokens: int, request_id: str,
                 chat: bool = False) -> dict:
    """The best n beams of each prompt as the n choices of a whole (not streamed) answer."""
    try:
        bp = req.beam_search_params(max_tokens)
        req.sampling_params(max_tokens, None)  # the other fields' own checks (n against max_n...)
    except ValueError as e:
        m = re.match(r"(\w+)[=:]", str(e))
        raise bad_request(str(e), m.group(1) if m and m.group(1) in type(req).model_fields
                          else "use_beam_search") from None
    cap = serving.config.max_beam_width
    if cap is not None and bp.beam_width > cap:
        raise bad_request(f"n={bp.beam_width} with use_beam_search: more beams than this server's --max_beam_width "
                          f"{cap}; accepted: 1 to {cap}", "n")
    step = bp.step_params()
    for _, ids in prompts:
        try:
            serving.engine.validate(ids, step.clone(max_tokens=max_tokens))
        except ValueError as e:
            raise from_value_error(e, None, "prompt") from None
    searches = [BeamSearch(ids, bp, serving.engine.limits.eos_token_ids) for _, ids in prompts]
    batch, r = BeamBatch(searches), 0
    while asks := batch.pending():
        streams = serving.submit([(None, toks) for toks in asks], step, f"{request_id}-r{r}",
                                 cache_salt=req.cache_salt, priority=req.priority)
        batch.advance([o.outputs[0].logprobs[0] for o in await serving.collect(raw, streams)])
        r += 1
    decode = lambda t: serving.tokenizer.decode(t, skip_special_tokens=req.skip_special_tokens)  # noqa: E731
    outs = [RequestOutput(request_id, text, ids, [
        CompletionOutput(j, b.text, b.output_token_ids, b.finish_reason, cumulative_logprob=b.cum_logprob)
        for j, b in enumerate(s.result(decode).sequences)], finished=True) for (text, ids), s in zip(prompts, searches)]
    model, prompt_only = serving.config.served_model_name, [_PromptOnly(ids) for _, ids in prompts]
    if chat:
        return responses.ChatContext(request_id, model, req, serving.tokens, prompt_only).full_response(outs[0])
    return responses.CompletionContext(request_id, model, req, serving.tokens, prompt_only).full_response(outs)
