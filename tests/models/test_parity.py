"""Greedy token ids of LLM.generate equal transformers' greedy ids exactly (fp32, CPU), for every
supported architecture and config option, and under chunked prefill, preemption and prefix reuse."""
import pytest

from helpers import build_checkpoint, hf_greedy, make_prompts
from meshserve import LLM, SamplingParams

BLOCK = 4
MAX_NEW = 12

CASES = {
    "llama-gqa": dict(arch="llama"),
    "llama-mqa": dict(arch="llama", num_key_value_heads=1),
    "llama-mha-head-dim": dict(arch="llama", num_key_value_heads=4, head_dim=24),
    "llama-tied-bias": dict(arch="llama", tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
    "llama-rope-linear": dict(arch="llama", rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0}),
    "llama-rope-llama3": dict(arch="llama", rope_parameters={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32, "rope_theta": 500000.0}),
    "llama-rope-yarn": dict(arch="llama", rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0}),
    "llama-rope-llama3-hub-spelling": dict(arch="llama", legacy_rope={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32, "rope_theta": 500000.0}),
    "llama-rope-yarn-hub-spelling": dict(arch="llama", legacy_rope={
        "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 20000.0}),
    "llama-sharded": dict(arch="llama", max_shard_size="60KB"),
    "mistral": dict(arch="mistral", sliding_window=None),
    "mistral-sliding-window": dict(arch="mistral", sliding_window=6),
    "qwen2-bias": dict(arch="qwen2"),
    "qwen2-tied": dict(arch="qwen2", tie_word_embeddings=True),
    "qwen3-qk-norm": dict(arch="qwen3"),
    "qwen3-tied-mqa": dict(arch="qwen3", tie_word_embeddings=True, num_key_value_heads=1),
}


@pytest.fixture(scope="module")
def prompts():
    return make_prompts(9, 320, 3 * BLOCK + 3)  # lengths 1 .. 15: more than 3 blocks


def run_case(tmp_path, prompts, case, **llm_kwargs):
    kwargs = dict(case)
    arch = kwargs.pop("arch")
    hf = build_checkpoint(str(tmp_path), arch, **kwargs)
    ref = [hf_greedy(hf, p, MAX_NEW) for p in prompts]
    kv = {"tokens_per_block": BLOCK, "max_tokens": 4096}
    kv.update(llm_kwargs.pop("kv", {}))
    with LLM(str(tmp_path), kv_cache_config=kv, show_progress=False, **llm_kwargs) as llm:
        outs = llm.generate(prompts, SamplingParams(max_tokens=MAX_NEW, temperature=0, ignore_eos=True),
                            use_tqdm=False)
        stats = llm.get_stats()
    got = [o.outputs[0].token_ids for o in outs]
    for i, (g, r) in enumerate(zip(got, ref)):
        assert g == r, f"prompt {i} (length {len(prompts[i])}): meshserve {g} != transformers {r}"
    return stats


@pytest.mark.parametrize("name", list(CASES))
def test_greedy_matches_transformers(tmp_path, prompts, name):
    run_case(tmp_path, prompts, CASES[name])


def test_chunked_prefill_matches(tmp_path, prompts):
    # 5 tokens per step: every prompt longer than 5 is split over several steps
    run_case(tmp_path, prompts, {"arch": "qwen3"}, max_num_tokens=5, enable_chunked_prefill=True)


def test_preemption_keeps_outputs(tmp_path, prompts):
    # room for 40 tokens (10 blocks): the batch of 9 sequences growing to 27 tokens must preempt
    stats = run_case(tmp_path, prompts, {"arch": "llama"}, kv={"max_tokens": 40, "enable_block_reuse": False})
    assert stats["num_preemptions"] > 0


@pytest.mark.timeout(120)
def test_preemption_without_chunked_prefill(tmp_path, prompts):
    # whole prefills of at most 16 tokens, and preemption: a request preempted at 15 + k tokens > 16 must
    # still resume (its recomputation is chunked) instead of blocking the waiting queue forever
    stats = run_case(tmp_path, prompts, {"arch": "llama"}, max_num_tokens=16, enable_chunked_prefill=False,
                     kv={"max_tokens": 40, "enable_block_reuse": False})
    assert stats["num_preemptions"] > 0


def test_prefix_reuse_counts_hits(tmp_path):
    shared = list(range(40, 53))  # 13 tokens: 3 full blocks, the 4th differs per prompt
    prompts = [shared + [5 + i, 6, 7] for i in range(4)]
    hf = build_checkpoint(str(tmp_path), "llama")
    ref = [hf_greedy(hf, p, MAX_NEW) for p in prompts]
    with LLM(str(tmp_path), kv_cache_config={"tokens_per_block": BLOCK}, show_progress=False) as llm:
        sp = SamplingParams(max_tokens=MAX_NEW, temperature=0, ignore_eos=True)
        first = llm.generate(prompts[:1], sp, use_tqdm=False)  # fills the cache
        rest = llm.generate(prompts[1:], sp, use_tqdm=False)
        stats = llm.get_stats()
    got = [o.outputs[0].token_ids for o in first + rest]
    assert got == ref
    assert stats["prefix_cache_hits"] >= 3 * 3 * BLOCK  # three later prompts reuse 3 blocks each
    assert all(o.num_cached_tokens == 3 * BLOCK for o in rest)
