"""Context parallelism, ULYSSES, on CPU ranks (gloo): each cp rank runs 1/cp of every step's tokens
outside attention and every token of 1/cp of the heads inside it, so greedy ids must equal
transformers on dense, GQA (KV heads repeated when fewer than cp), Qwen3 (q/k norms) and MoE models,
alone, with TP and with pipeline stages; chunked prefill, preemption and prefix reuse keep parity; sampling with seeds,
logprobs and prompt logprobs equal a single-rank run; each rank's KV cache holds 1/cp of the bytes;
`meshserve serve --cp_size 2` answers the official client; the layouts and cp types it cannot run
are one-line errors naming the numbers."""
import os
import sys

import pytest

from helpers import (assert_same_as_one_rank, build_checkpoint, build_deepseek, hf_greedy, make_prompts,
                     seeded_logprob_params, served_token_ids)
from meshserve import LLM, SamplingParams
from meshserve.mapping import CpType

SP = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
KV = {"tokens_per_block": 4, "max_tokens": 2048}
ULYSSES = {"cp_type": CpType.ULYSSES}  # the seed's spelling


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for name, arch, extra in (("llama", "llama", {}), ("gqa", "llama", {"num_key_value_heads": 2}),
                              ("qwen3", "qwen3", {}), ("qwen3_moe", "qwen3_moe", {})):
        path = str(tmp_path_factory.mktemp(name))
        hf = build_checkpoint(path, arch, **extra)
        prompts = make_prompts(7, 320, 13, seed=3)
        out[name] = (path, prompts, [hf_greedy(hf, p, SP.max_tokens) for p in prompts])
    return out


def run(path, prompts, sp=SP, **kw):
    kw.setdefault("kv_cache_config", KV)
    with LLM(path, show_progress=False, **kw) as llm:
        outs = llm.generate(prompts, sp, use_tqdm=False)
        runner = llm._core.executor.runner
        return outs, llm.get_stats(), runner.kv_bytes_per_block(), llm._core.executor


LAYOUTS = {
    "llama-cp2": ("llama", dict(context_parallel_size=2, cp_config=ULYSSES), 2),
    "llama-tp2xcp2": ("llama", dict(tensor_parallel_size=2, context_parallel_size=2), 4),
    "gqa-cp4-kv-repeated": ("gqa", dict(context_parallel_size=4, cp_config={"cp_type": "ulysses"}), 4),
    "qwen3-cp2": ("qwen3", dict(context_parallel_size=2), 2),
    "gqa-cp2xpp2": ("gqa", dict(context_parallel_size=2, pipeline_parallel_size=2), 4),  # stages pass shares
    "qwen3_moe-cp2": ("qwen3_moe", dict(context_parallel_size=2, disable_overlap_scheduler=True), 2),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_ulysses_matches_transformers(checkpoints, name):
    arch, layout, world = LAYOUTS[name]
    path, prompts, ref = checkpoints[arch]
    outs, stats, _, ex = run(path, prompts, **layout)
    assert ex.world_size == world
    assert [o.outputs[0].token_ids for o in outs] == ref, name
    assert stats["num_running"] == 0 and stats["kv_cache_usage"] == 0.0


def test_kv_bytes_per_rank_and_expert_counts_against_one_rank(checkpoints):
    """Each cp rank caches its share of the heads: half the bytes per block at cp 2; the cp ranks'
    expert counts add up to a single rank's."""
    path, prompts, ref = checkpoints["qwen3_moe"]
    outs, stats, per_block, _ = run(path, prompts, context_parallel_size=2)
    with LLM(path, kv_cache_config=KV, show_progress=False) as llm:
        llm.generate(prompts, SP, use_tqdm=False)
        one = llm.get_stats()
        one_block = llm._core.executor.runner.kv_bytes_per_block()
    assert per_block * 2 == one_block
    assert stats["expert_tokens"] == one["expert_tokens"] and one["expert_tokens"]


def test_chunks_preemption_and_prefix_reuse(checkpoints):
    path, prompts, ref = checkpoints["gqa"]
    kv = {"tokens_per_block": 4, "max_tokens": 40}  # 10 blocks for 7 sequences of up to 21 tokens
    with LLM(path, context_parallel_size=2, max_num_tokens=5, kv_cache_config=kv, show_progress=False) as llm:
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, SP, use_tqdm=False)]
        again = llm.generate(prompts[-1], SP, use_tqdm=False)
        stats = llm.get_stats()
    assert got == ref and again.outputs[0].token_ids == ref[-1]
    assert stats["num_preemptions"] > 0 and again.num_cached_tokens >= 8


def test_sampling_logprobs_and_prompt_logprobs_equal_a_single_rank(checkpoints):
    path, prompts, _ = checkpoints["qwen3"]
    sps = seeded_logprob_params(len(prompts))
    outs = run(path, prompts, sps, context_parallel_size=2)[0]
    assert_same_as_one_rank(path, prompts, sps, outs, KV)


def test_serve_with_cp_size(checkpoints):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "serve"))
    from serve_util import start_server

    path, prompts, ref = checkpoints["llama"]
    server = start_server(path, "--cp_size", "2", api_key=None)
    try:
        assert served_token_ids(server.base_url, prompts, 8) == ref
    finally:
        server.stop()


@pytest.mark.parametrize("kw,needle", [
    (dict(context_parallel_size=2, cp_config={"cp_type": "RING"}),
     "cp_config.cp_type=RING: not supported yet; accepted: ULYSSES"),
    (dict(context_parallel_size=2, cp_config={"cp_type": "zigzag"}), "unknown cp_type 'zigzag'"),
    (dict(context_parallel_size=2, cp_config={"cp_type": "ULYSSES", "block_size": 4}),
     "cp_config has unknown keys ['block_size']; accepted: cp_type"),
    (dict(cp_config={"cp_type": "ULYSSES"}), "needs context_parallel_size > 1"),
    (dict(context_parallel_size=2, tensor_parallel_size=2, enable_attention_dp=True),
     "context_parallel_size=2 with enable_attention_dp=True is not supported yet"),
    (dict(context_parallel_size=8), "context_parallel_size=8 must divide the 4 attention heads"),
])
def test_what_ulysses_cannot_run_is_refused(checkpoints, kw, needle):
    with pytest.raises(ValueError) as e:
        LLM(checkpoints["llama"][0], show_progress=False, **kw)
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_latent_attention_is_refused(tmp_path):
    build_deepseek(str(tmp_path))
    with pytest.raises(ValueError, match="latent attention .* TensorRT-LLM uses HELIX for it"):
        LLM(str(tmp_path), context_parallel_size=2, show_progress=False)
