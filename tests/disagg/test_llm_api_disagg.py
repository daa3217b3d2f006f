"""Disaggregated serving from the LLM API (TensorRT-LLM's `generate(..., disaggregated_params=...)`):
a context LLM (TP 2, 16-token blocks) runs the prompts and their first tokens and answers
`disaggregated_params`; a generation LLM (TP 1, 32-token blocks) takes them with the same prompts and
decodes on. Greedy ids equal transformers', logprobs come with the first token, generate_async works,
the context LLM's KV is released, and what cannot be is a one-line ValueError."""
from __future__ import annotations

import asyncio
import os
import time

import pytest

from helpers import build_checkpoint, hf_greedy, make_prompts
from meshserve import LLM, SamplingParams
from meshserve.llmapi import DisaggregatedParams

pytestmark = pytest.mark.timeout(300)
DISAGG = {"backend": "DEFAULT", "kv_transfer_timeout_ms": 30000}


@pytest.fixture(scope="module")
def llms(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("llm_disagg")
    path = str(tmp / "tiny")
    hf = build_checkpoint(path, "llama")
    saved = {k: os.environ.get(k) for k in ("MESHSERVE_SECRET", "MESHSERVE_SECRET_FILE", "XDG_CACHE_HOME")}
    for k in ("MESHSERVE_SECRET", "MESHSERVE_SECRET_FILE"):
        os.environ.pop(k, None)
    os.environ["XDG_CACHE_HOME"] = str(tmp / "cache")  # the default key file goes here, not to ~/.cache
    try:
        ctx = LLM(path, tensor_parallel_size=2, cache_transceiver_config=DISAGG, show_progress=False,
                  kv_cache_config={"tokens_per_block": 16, "max_tokens": 2048}, max_num_tokens=64)
        gen = LLM(path, cache_transceiver_config=DISAGG, show_progress=False,
                  kv_cache_config={"tokens_per_block": 32, "max_tokens": 2048})
        try:
            yield {"ctx": ctx, "gen": gen, "hf": hf, "path": path, "key": tmp / "cache" / "meshserve" / "disagg.key"}
        finally:
            ctx.shutdown()
            gen.shutdown()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def released(llm: LLM, timeout_s: float = 20.0) -> bool:
    """Whether the context LLM's pinned KV is all released (its next steps take the releases)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with llm._lock:
            llm._step()
            if not llm._core.scheduler.pinned:
                return llm._core.kv.num_free_blocks == llm._core.kv.num_usable_blocks
        time.sleep(0.01)
    return False


def test_context_then_generation_equals_transformers(llms):
    ctx, gen, hf = llms["ctx"], llms["gen"], llms["hf"]
    prompts = make_prompts(4, 300, 70, seed=3)[1:]  # 2..70 tokens: several blocks on both sides
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    firsts = ctx.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False,
                          disaggregated_params=DisaggregatedParams("context_only"))
    assert llms["key"].exists()  # the shared key the ranks and the other LLM read (as serve settles it)
    for p, out in zip(prompts, firsts):
        ref = hf_greedy(hf, p, 10)
        assert out.outputs[0].token_ids == ref[:1] and out.outputs[0].finish_reason == "length"
        dp = out.disaggregated_params
        assert dp.request_type == "context_only" and dp.first_gen_tokens == ref[:1] and dp.opaque_state
    outs = gen.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False,
                        disaggregated_params=[o.disaggregated_params.for_generation() for o in firsts])
    for p, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, p, 10)
        assert out.disaggregated_params is None
    assert released(ctx)


def test_logprobs_and_generate_async(llms):
    ctx, gen = llms["ctx"], llms["gen"]
    prompt = "The quick brown fox jumps over"
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=2)
    ref = gen.generate(prompt, params, use_tqdm=False).outputs[0]  # aggregated, on the generation LLM
    first = ctx.generate(prompt, params, use_tqdm=False, disaggregated_params=DisaggregatedParams("context_only"))

    async def run():
        return await gen.generate_async(prompt, params, streaming=False,
                                        disaggregated_params=first.disaggregated_params.for_generation())

    out = asyncio.run(run()).outputs[0]
    assert out.token_ids == ref.token_ids and out.text == ref.text
    assert len(out.logprobs) == 6
    for got, want in zip(out.logprobs, ref.logprobs):
        assert got.keys() == want.keys()
        assert all(abs(got[t] - want[t]) < 1e-4 for t in want)
        assert [got[t].rank for t in want] == [want[t].rank for t in want]  # the first token's carried over too
    assert released(ctx)


def test_what_cannot_be_is_one_line(llms, tmp_path):
    ctx, gen = llms["ctx"], llms["gen"]
    with pytest.raises(ValueError, match="request_type='both' is not one of context_only, generation_only"):
        DisaggregatedParams("both")
    params = SamplingParams(max_tokens=4, temperature=0)
    first = ctx.generate("Hello there", params, use_tqdm=False,
                         disaggregated_params=DisaggregatedParams("context_only"))
    dp = first.disaggregated_params.for_generation()
    with pytest.raises(ValueError, match="differs from the one the context server ran"):
        gen.generate("Hello there, friend", params, use_tqdm=False, disaggregated_params=dp)
    with pytest.raises(ValueError, match="logprobs=1: the context server computed no logprobs"):
        gen.generate("Hello there", params.clone(logprobs=1), use_tqdm=False, disaggregated_params=dp)
    with pytest.raises(ValueError, match="n=2"):
        gen.generate("Hello there", params.clone(n=2), use_tqdm=False, disaggregated_params=dp)
    with pytest.raises(ValueError, match="opaque_state is required"):
        gen.generate("Hello there", params, use_tqdm=False,
                     disaggregated_params=DisaggregatedParams("generation_only"))
    with pytest.raises(ValueError, match="2 entries but there are 1 prompts"):
        gen.generate(["Hello there"], params, use_tqdm=False, disaggregated_params=[dp, dp])
    # nothing of that touched the pinned KV: the right request still gets it
    out = gen.generate("Hello there", params, use_tqdm=False, disaggregated_params=dp)
    assert out.outputs[0].token_ids[:1] == first.outputs[0].token_ids and len(out.outputs[0].token_ids) >= 1
    assert released(ctx)
    with LLM(llms["path"], show_progress=False, kv_cache_config={"max_tokens": 512}) as plain:
        with pytest.raises(ValueError, match="without cache_transceiver_config"):
            plain.generate("Hello", params, use_tqdm=False, disaggregated_params=DisaggregatedParams("context_only"))


def test_a_streamed_context_request_ends_with_its_params(llms):
    """generate_async(streaming=True) of a context_only request: its last (finished) output carries
    the params, made once however many times a step hands the final output out."""
    ctx, gen, hf = llms["ctx"], llms["gen"], llms["hf"]
    prompt = make_prompts(3, 300, 40, seed=5)[2]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)

    async def run():
        outs = [o async for o in ctx.generate_async({"prompt_token_ids": prompt}, params, streaming=True,
                                                    disaggregated_params=DisaggregatedParams("context_only"))]
        return outs

    outs = asyncio.run(run())
    assert outs[-1].finished and outs[-1].disaggregated_params is not None
    out = gen.generate({"prompt_token_ids": prompt}, params, use_tqdm=False,
                       disaggregated_params=outs[-1].disaggregated_params.for_generation())
    assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 8)
    assert released(ctx)


def test_structured_outputs_hold_across_the_handover(llms):
    """The context LLM constrains the first token, the generation LLM's matcher takes it with the KV and
    goes on: the answer equals one LLM's run of the same request, and matches the regex."""
    import re

    from meshserve import StructuredOutputsParams
    ctx, gen = llms["ctx"], llms["gen"]
    prompts = make_prompts(3, 300, 40, seed=5)
    regex = r"[a-c]{2}-[0-9]{2,3}"
    params = SamplingParams(max_tokens=12, temperature=0, structured_outputs=StructuredOutputsParams(regex=regex))
    want = [o.outputs[0] for o in gen.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)]
    firsts = ctx.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False,
                          disaggregated_params=DisaggregatedParams("context_only"))
    outs = gen.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False,
                        disaggregated_params=[o.disaggregated_params.for_generation() for o in firsts])
    for w, f, out in zip(want, firsts, outs):
        assert f.outputs[0].token_ids == w.token_ids[:1]
        assert out.outputs[0].token_ids == w.token_ids and w.finish_reason == "stop"
        assert re.fullmatch(regex, out.outputs[0].text), out.outputs[0].text
    assert released(ctx)
