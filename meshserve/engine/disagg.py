"""The servers' side of disaggregated serving's `disaggregated_params` (docs/disaggregated.md).

A context server answers a context_only request with `context_params`: the first token, its
`ctx_request_id`, and an `opaque_state` signed with the shared key (disagg/params.py) holding the
prompt's token ids, every context rank's RankLayout, the pinned KV's block ids and length. A
generation server turns the params it receives back into the engine's `DisaggRequest` with
`generation_request`, checking the signature, the model and the KV dtype against its own ranks and
the prompt against the context server's; each mismatch is a one-line ValueError naming what differs.
"""
from __future__ import annotations

from typing import Optional, Sequence

import msgspec

from meshserve.disagg import params as signed
from meshserve.disagg.transceiver import RankLayout
from meshserve.engine.messages import DisaggRequest

VERSION = 1
WHERE = "disaggregated_params"


def context_params(ctx_request_id: str, prompt_token_ids: Sequence[int], first_token: int,
                   layouts: Sequence[RankLayout], kv: dict, key: Optional[bytes] = None) -> dict:
    """The response's `disaggregated_params` of a finished context_only request; `kv` is its pinned
    KV as the engine reported it ({"block_ids": per KV group, "num_tokens": n})."""
    payload = {"v": VERSION, "ctx_request_id": ctx_request_id, "prompt_token_ids": list(prompt_token_ids),
               "first_token": first_token, "layouts": list(layouts), "block_ids": kv["block_ids"],
               "num_tokens": kv["num_tokens"]}
    return {"request_type": "context_only", "first_gen_tokens": [first_token], "ctx_request_id": ctx_request_id,
            "opaque_state": signed.sign(payload, signed.secret_key() if key is None else key)}


def generation_request(opaque_state: Optional[str], prompt_token_ids: Sequence[int], layouts: Sequence[RankLayout],
                       first_gen_tokens: Optional[Sequence[int]] = None, ctx_request_id: Optional[str] = None,
                       key: Optional[bytes] = None) -> DisaggRequest:
    """The engine's DisaggRequest of a generation_only request, from the params a context server
    signed; `layouts`: this server's ranks. A ValueError naming the mismatch otherwise."""
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
        block_ids = [[int(b) for b in t] for t in payload["block_ids"]]
        num_tokens = int(payload["num_tokens"])
    except (KeyError, TypeError, ValueError, msgspec.ValidationError) as e:
        raise ValueError(f"{WHERE}.opaque_state: malformed ({e})") from None
    if not sources:
        raise ValueError(f"{WHERE}.opaque_state: no context ranks")
    mine, theirs = layouts[0], sources[0]
    if theirs.model_id != mine.model_id:
        raise ValueError(f"{WHERE}: the context server runs model {theirs.model_id}, this server {mine.model_id} "
                         f"(architecture and config.json hash must match)")
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
                         src_block_ids=block_ids, src_num_tokens=num_tokens)
