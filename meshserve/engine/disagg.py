"""The servers' side of disaggregated serving's `disaggregated_params` (docs/disaggregated.md).

A context server answers a context_only request with `context_params`: the first token, its
`ctx_request_id`, and an `opaque_state` signed with the shared key (disagg/params.py) holding the
prompt's token ids, every context rank's RankLayout, the pinned KV's block ids and length. A
generation server turns the params it receives back into the engine's `DisaggRequest` with
`generation_request`, checking the signature, the model and the KV dtype against its own ranks and
the prompt against the context server's; each mismatch is a one-line ValueError naming what differs.

Logprobs (TensorRT-LLM's `first_gen_log_probs`): a context_only request that asked for them signs
its first token's logprobs (and the prompt's, for prompt_logprobs or echo) into the state, with the k
it computed them for; the generation server emits them as its output's first entry (and as its
prompt_logprobs), so a request through the orchestrator answers what an aggregated server does. A
generation_only request asking for logprobs the state does not carry, or for another k, is refused
naming both.
"""
from __future__ import annotations

from typing import Optional, Sequence

import msgspec

from meshserve.disagg import params as signed
from meshserve.disagg.transceiver import RankLayout
from meshserve.engine.messages import DisaggRequest, LogprobEntry

VERSION = 1
WHERE = "disaggregated_params"

def _entry_out(entry, k: int) -> Optional[list]:
    """A position's logprobs (a {token id: Logprob} dict, as RequestOutput holds it: the chosen token
    first, then the top `k` but the chosen one; or the engine's (ids, values, rank)) in the engine's form
    for the signed state: [the chosen token then the top k by rank, their values, the chosen one's rank]."""
    if entry is None:
        return None
    if isinstance(entry, dict):
        chosen = next(iter(entry))
        # k entries: the chosen token is among the top k; k + 1: it is not
        top = [t for t in entry if len(entry) == k or t != chosen]
        top.sort(key=lambda t: getattr(entry[t], "rank", None) or 0)
        ids = [chosen, *top]
        return [[int(t) for t in ids], [float(entry[t]) for t in ids], int(getattr(entry[chosen], "rank", None) or 0)]
    return [[int(t) for t in entry[0]], [float(v) for v in entry[1]], int(entry[2]) if len(entry) > 2 else 0]


def _entry_in(entry) -> Optional[LogprobEntry]:
    if entry is None:
        return None
    ids, vals = entry[0], entry[1]
    if len(ids) != len(vals):
        raise ValueError("a logprob entry's ids and values differ in length")
    return [int(t) for t in ids], [float(v) for v in vals], int(entry[2]) if len(entry) > 2 else 0


def _carried(payload: dict, field: str, want: Optional[int], what: str):
    """The entries the state carries for `field` (None when the request does not want them); a
    ValueError when it wants them and the context server did not compute them for the same k."""
    if want is None:
        return None
    have = payload.get(field)
    if have is None:
        raise ValueError(f"{field}={want}: the context server computed no {what} for this request (send both "
                         f"servers the same {field})")
    k, entries = int(have[0]), have[1]
    if k != want:
        raise ValueError(f"{field}={want} differs from the context server's {field}={k} (send both servers the "
                         f"same request)")
    return entries


def context_params(ctx_request_id: str, prompt_token_ids: Sequence[int], first_token: int,
                   layouts: Sequence[RankLayout], kv: dict, key: Optional[bytes] = None,
                   logprobs: Optional[tuple[int, LogprobEntry]] = None,
                   prompt_logprobs: Optional[tuple[int, list[Optional[LogprobEntry]]]] = None) -> dict:
    """The response's `disaggregated_params` of a finished context_only request; `kv` is its pinned
    KV as the engine reported it ({"block_ids": per KV group, "num_tokens": n, and with attention DP
    "dp_rank": the DP rank holding it, whose ranks alone the generation server reads}). `logprobs`: (k, the
    first token's entry) when the request asked for k logprobs; `prompt_logprobs`: (k, the prompt's
    entries, None first) likewise; both are signed into the state for the generation server."""
    payload = {"v": VERSION, "ctx_request_id": ctx_request_id, "prompt_token_ids": list(prompt_token_ids),
               "first_token": first_token, "layouts": list(layouts), "block_ids": kv["block_ids"],
               "num_tokens": kv["num_tokens"]}
    if kv.get("dp_rank") is not None:  # attention DP: the generation server reads that DP rank's ranks
        payload["dp_rank"] = int(kv["dp_rank"])
    if logprobs is not None:
        payload["logprobs"] = [logprobs[0], _entry_out(logprobs[1], logprobs[0])]
    if prompt_logprobs is not None:
        k = prompt_logprobs[0]
        payload["prompt_logprobs"] = [k, [_entry_out(e, k) for e in prompt_logprobs[1]]]
    return {"request_type": "context_only", "first_gen_tokens": [first_token], "ctx_request_id": ctx_request_id,
            "opaque_state": signed.sign(payload, signed.secret_key() if key is None else key)}


def context_only_params(params):
    """A context_only request's engine params: the prompt and one token (its EOS still banned under
    min_tokens); the generation server does the rest."""
    return params.clone(max_tokens=1, min_tokens=min(params.min_tokens, 1))


def context_answer(out, params, layouts: Sequence[RankLayout]) -> Optional[dict]:
    """The `disaggregated_params` of a finished context_only request's RequestOutput (`params`: its
    SamplingParams, for the logprobs to carry), or None when its first token finished it (EOS, a stop
    token or string: no KV is kept, the output is the whole answer). The API server's and the LLM
    API's answer."""
    seq = out.outputs[0] if out.outputs else None
    if out.kv_transfer_params is None or seq is None or seq.finish_reason != "length" or not seq.token_ids:
        return None
    logprobs = (params.logprobs, seq.logprobs[0]) if params.logprobs is not None and seq.logprobs else None
    prompt_lp = ((params.prompt_logprobs, out.prompt_logprobs)
                 if params.prompt_logprobs is not None and out.prompt_logprobs is not None else None)
    return context_params(out.request_id, out.prompt_token_ids, seq.token_ids[0], layouts, out.kv_transfer_params,
                          logprobs=logprobs, prompt_logprobs=prompt_lp)


def generation_request(opaque_state: Optional[str], prompt_token_ids: Sequence[int], layouts: Sequence[RankLayout],
                       first_gen_tokens: Optional[Sequence[int]] = None, ctx_request_id: Optional[str] = None,
                       key: Optional[bytes] = None, logprobs: Optional[int] = None,
                       prompt_logprobs: Optional[int] = None) -> DisaggRequest:
    """The engine's DisaggRequest of a generation_only request, from the params a context server
    signed; `layouts`: this server's ranks; `logprobs` / `prompt_logprobs`: the request's (their
    entries must come in the state). A ValueError naming the mismatch otherwise."""
    if not opaque_state:
        raise ValueError(f"{WHERE}.opaque_state is required for request_type generation_only (pass the context "
                         f"server's disaggregated_params unchanged)")
    payload = signed.verify(opaque_state, signed.secret_key() if key is None else key)
    if payload.get("v") != VERSION:
        raise ValueError(f"{WHERE}.opaque_state: version {payload.get('v')!r}, this server reads {VERSION}")
    try:
        sources = msgspec.convert(payload["layouts"], list[RankLayout])
        ctx_id = str(payload["ctx_request_id"])
        src_prompt = [int(t) for t in payload["prompt_token_ids"]]
        first = int(payload["first_token"])
        dp_rank = payload.get("dp_rank")
        dp_rank = None if dp_rank is None else int(dp_rank)
        block_ids = [[int(b) for b in t] for t in payload["block_ids"]]
        num_tokens = int(payload["num_tokens"])
        first_lp = _carried(payload, "logprobs", logprobs, "logprobs of the first token")
        first_lp = _entry_in(first_lp) if first_lp is not None else None
        prompt_lp = _carried(payload, "prompt_logprobs", prompt_logprobs, "prompt logprobs")
        if prompt_lp is not None:
            prompt_lp = [_entry_in(e) for e in prompt_lp]
            if len(prompt_lp) != len(src_prompt):
                raise ValueError(f"prompt_logprobs has {len(prompt_lp)} entries for {len(src_prompt)} prompt tokens")
    except (LookupError, TypeError, ValueError, OverflowError, msgspec.ValidationError) as e:  # int(inf): Overflow
        if isinstance(e, ValueError) and str(e).startswith(("logprobs=", "prompt_logprobs=")):
            raise

        raise ValueError(f"{WHERE}.opaque_state: malformed ({e})") from None
    if not sources:
        raise ValueError(f"{WHERE}.opaque_state: no context ranks")
    release_to = None
    if dp_rank is not None:  # attention DP on the context server: its rank 0 hears the release
        release_to, sources = sources[0], [lay for lay in sources if lay.dp == dp_rank]
        if not sources:
            raise ValueError(f"{WHERE}.opaque_state: no context rank of DP rank {dp_rank}")
    mine, theirs = layouts[0], sources[0]
    if theirs.model_id != mine.model_id:
        raise ValueError(f"{WHERE}: the context server runs model {theirs.model_id}, this server {mine.model_id} "
                         f"(architecture, config.json and weights must match)")
    if theirs.dtype != mine.dtype:
        raise ValueError(f"{WHERE}: the context server's KV cache is {theirs.dtype}, this server's {mine.dtype} "
                         f"(set the same dtype on both)")
    if theirs.kind != mine.kind:
        raise ValueError(f"{WHERE}: the context server's KV cache is {theirs.kind}, this server's {mine.kind}")
    if ctx_request_id is not None and str(ctx_request_id) != ctx_id:
        raise ValueError(f"{WHERE}.ctx_request_id={ctx_request_id!r} is not the one opaque_state was made for "
                         f"({ctx_id!r})")
    if first_gen_tokens is not None and list(first_gen_tokens) != [first]:
        raise ValueError(f"{WHERE}.first_gen_tokens={list(first_gen_tokens)} differs from the context server's "
                         f"[{first}]")
    prompt = list(prompt_token_ids)
    if prompt != src_prompt:
        at = next((i for i, (a, b) in enumerate(zip(prompt, src_prompt)) if a != b), min(len(prompt), len(src_prompt)))
        raise ValueError(f"{WHERE}: the prompt ({len(prompt)} tokens) differs from the one the context server ran "
                         f"({len(src_prompt)} tokens) from token {at} on; send both servers the same request")
    return DisaggRequest("generation_only", ctx_request_id=ctx_id, first_token=first, sources=sources,
                         release_to=release_to,
                         src_block_ids=block_ids, src_num_tokens=num_tokens, first_logprobs=first_lp,
                         prompt_logprobs=prompt_lp)
