"""Context parallelism on CPU ranks (gloo). ULYSSES: each cp rank runs 1/cp of every step's tokens
outside attention and every token of 1/cp of the heads inside it. RING: the same token split, but
each rank caches its sub-blocks of every KV block (the cache sharded by sequence) and attention
merges the ranks' partials by their log-sum-exp. For both, greedy ids must equal transformers on
dense, GQA (ULYSSES: KV heads repeated when fewer than cp), Qwen3 (q/k norms) and MoE models, alone,
with TP and with pipeline stages; chunked prefill, preemption and prefix reuse keep parity; sampling
with seeds, logprobs and prompt logprobs equal a single-rank run; each rank's KV cache holds 1/cp of
the bytes; `meshserve serve --cp_size 2` (and `--cp_type ring`) answers the official client; the
layouts and cp types they cannot run are one-line errors naming the numbers."""
import os
import sys

import pytest

from helpers import (DEEPSEEK_YARN, assert_same_as_one_rank, build_checkpoint, build_deepseek, hf_greedy, make_prompts,
                     seeded_logprob_params, served_token_ids)
from meshserve import LLM, SamplingParams
from meshserve.mapping import CpType

SP = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
KV = {"tokens_per_block": 4, "max_tokens": 2048}
ULYSSES = {"cp_type": CpType.ULYSSES}  # the seed's spelling
RING = {"cp_type": CpType.RING}
HELIX = {"cp_type": CpType.HELIX}
KV_RING = {"tokens_per_block": 8, "max_tokens": 2048}  # 8 / cp tokens of each block on each cp rank


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
    "ring-llama-cp2": ("llama", dict(context_parallel_size=2, cp_config=RING, kv_cache_config=KV_RING), 2),
    "ring-gqa-cp4": ("gqa", dict(context_parallel_size=4, cp_config={"cp_type": "ring"}, kv_cache_config=KV_RING), 4),
    "ring-llama-tp2xcp2": ("llama", dict(tensor_parallel_size=2, context_parallel_size=2, cp_config=RING,
                                         kv_cache_config=KV_RING), 4),
    "ring-qwen3-cp3": ("qwen3", dict(context_parallel_size=3, cp_config=RING,
                                     kv_cache_config={"tokens_per_block": 6, "max_tokens": 2048}), 3),
    "ring-gqa-cp2xpp2": ("gqa", dict(context_parallel_size=2, pipeline_parallel_size=2, cp_config=RING,
                                     kv_cache_config=KV_RING), 4),
    "ring-qwen3_moe-cp2": ("qwen3_moe", dict(context_parallel_size=2, cp_config=RING, kv_cache_config=KV_RING), 2),
    "helix-llama-cp2": ("llama", dict(context_parallel_size=2, cp_config=HELIX, kv_cache_config=KV_RING), 2),
    "helix-gqa-tp2xcp2": ("gqa", dict(tensor_parallel_size=2, context_parallel_size=2, cp_config=HELIX,
                                      kv_cache_config=KV_RING), 4),
    "helix-qwen3-cp4": ("qwen3", dict(context_parallel_size=4, cp_config={"cp_type": "helix"},
                                      kv_cache_config=KV_RING), 4),
    "helix-gqa-cp2xpp2": ("gqa", dict(context_parallel_size=2, pipeline_parallel_size=2, cp_config=HELIX,
                                      kv_cache_config=KV_RING), 4),
    "helix-qwen3_moe-tp2xcp2": ("qwen3_moe", dict(tensor_parallel_size=2, context_parallel_size=2, cp_config=HELIX,
                                                  kv_cache_config=KV_RING), 4),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_cp_matches_transformers(checkpoints, name):
    arch, layout, world = LAYOUTS[name]
    path, prompts, ref = checkpoints[arch]
    outs, stats, _, ex = run(path, prompts, **layout)
    assert ex.world_size == world
    assert [o.outputs[0].token_ids for o in outs] == ref, name
    assert stats["num_running"] == 0 and stats["kv_cache_usage"] == 0.0


@pytest.mark.parametrize("cp_config", [ULYSSES, RING])
def test_kv_bytes_per_rank_and_expert_counts_against_one_rank(checkpoints, cp_config):
    """Each cp rank caches its share, half the bytes per block at cp 2: ULYSSES half the KV heads of
    every block's tokens, RING every KV head of half of each block's tokens; the cp ranks' expert
    counts add up to a single rank's."""
    path, prompts, ref = checkpoints["qwen3_moe"]
    with LLM(path, context_parallel_size=2, cp_config=cp_config, kv_cache_config=KV, show_progress=False) as llm:
        outs = llm.generate(prompts, SP, use_tqdm=False)
        stats = llm.get_stats()
        runner = llm._core.executor.runner
        per_block, cache_shape = runner.kv_bytes_per_block(), tuple(runner.attn_layers[0].kv_cache.shape)
    with LLM(path, kv_cache_config=KV, show_progress=False) as llm:
        llm.generate(prompts, SP, use_tqdm=False)
        one = llm.get_stats()
        one_runner = llm._core.executor.runner
        one_block, one_shape = one_runner.kv_bytes_per_block(), tuple(one_runner.attn_layers[0].kv_cache.shape)
    assert [o.outputs[0].token_ids for o in outs] == ref
    assert per_block * 2 == one_block
    tokens, heads = (one_shape[2] // 2, one_shape[3]) if cp_config is RING else (one_shape[2], one_shape[3] // 2)
    assert cache_shape[2:4] == (tokens, heads), (cache_shape, one_shape)
    assert stats["expert_tokens"] == one["expert_tokens"] and one["expert_tokens"]


@pytest.mark.parametrize("cp_config", [ULYSSES, RING])
def test_chunks_preemption_and_prefix_reuse(checkpoints, cp_config):
    path, prompts, ref = checkpoints["gqa"]
    kv = {"tokens_per_block": 4, "max_tokens": 40}  # 10 blocks for 7 sequences of up to 21 tokens
    with LLM(path, context_parallel_size=2, cp_config=cp_config, max_num_tokens=5, kv_cache_config=kv,
             show_progress=False) as llm:
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, SP, use_tqdm=False)]
        again = llm.generate(prompts[-1], SP, use_tqdm=False)
        stats = llm.get_stats()
    assert got == ref and again.outputs[0].token_ids == ref[-1]
    assert stats["num_preemptions"] > 0 and again.num_cached_tokens >= 8


@pytest.mark.parametrize("cp_config", [ULYSSES, RING])
def test_sampling_logprobs_and_prompt_logprobs_equal_a_single_rank(checkpoints, cp_config):
    path, prompts, _ = checkpoints["qwen3"]
    sps = seeded_logprob_params(len(prompts))
    outs = run(path, prompts, sps, context_parallel_size=2, cp_config=cp_config)[0]
    assert_same_as_one_rank(path, prompts, sps, outs, KV)


@pytest.mark.parametrize("flags", [("--cp_size", "2"), ("--cp_size", "2", "--cp_type", "ring")])
def test_serve_with_cp_size(checkpoints, flags):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "serve"))
    from serve_util import start_server

    path, prompts, ref = checkpoints["llama"]
    server = start_server(path, *flags, api_key=None)
    try:
        assert served_token_ids(server.base_url, prompts, 8) == ref
    finally:
        server.stop()


@pytest.mark.parametrize("kw,needle", [
    (dict(context_parallel_size=2, cp_config={"cp_type": "STAR"}),
     "cp_config.cp_type=STAR: not supported yet; accepted: ULYSSES, RING, HELIX"),
    (dict(context_parallel_size=3, cp_config=HELIX, kv_cache_config={"tokens_per_block": 6}),
     "context_parallel_size=3 must divide the 4 attention heads of each tensor parallel rank with cp_type HELIX"),
    (dict(context_parallel_size=3, cp_config=RING),
     "kv_cache_config.tokens_per_block=32 must be a multiple of context_parallel_size=3 with cp_type RING"),
    (dict(context_parallel_size=2, cp_config={"cp_type": "zigzag"}), "unknown cp_type 'zigzag'"),
    (dict(context_parallel_size=2, cp_config={"cp_type": "ULYSSES", "block_size": 4}),
     "cp_config has unknown keys ['block_size']; accepted: cp_type"),
    (dict(cp_config={"cp_type": "ULYSSES"}), "needs context_parallel_size > 1"),
    (dict(context_parallel_size=2, tensor_parallel_size=2, enable_attention_dp=True),
     "context_parallel_size=2 with enable_attention_dp=True is not supported yet"),
    (dict(context_parallel_size=8), "context_parallel_size=8 must divide the 4 attention heads"),
    (dict(context_parallel_size=2, cache_transceiver_config={"backend": "DEFAULT"}),
     "cp_type ULYSSES and cache_transceiver_config (a disaggregated server; accepted: cp_type RING"),
    (dict(context_parallel_size=2, cp_config=RING, cache_transceiver_config={"backend": "NIXL"}),
     "cache_transceiver_config.backend NIXL (its reads land in whole blocks; accepted: DEFAULT, UCX, MPI)"),
])
def test_what_cp_cannot_run_is_refused(checkpoints, kw, needle):
    with pytest.raises(ValueError) as e:
        LLM(checkpoints["llama"][0], show_progress=False, **kw)
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_deepseek_latent_attention_ring_and_helix_with_chunks_and_preemption(tmp_path):
    """DeepSeek-V3 (MLA, a dense first layer, grouped routing, YaRN) with RING and HELIX at tp2 x cp2: each cp
    rank caches half of every block's latent rows; 6-token steps (chunked prompts) and 12 blocks
    (preemption) keep greedy parity with transformers. ULYSSES (no heads to split) is refused."""
    hf = build_deepseek(str(tmp_path), num_hidden_layers=3, rope_parameters=DEEPSEEK_YARN)
    prompts = make_prompts(5, 320, 15)  # up to 15 + 8 tokens each, 12 blocks of 4 for all five: preemption
    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    ref = [hf_greedy(hf, p, 8) for p in prompts]
    for cp_config in (RING, HELIX):
        with LLM(str(tmp_path), tensor_parallel_size=2, context_parallel_size=2, cp_config=cp_config,
                 max_num_tokens=6, kv_cache_config={"tokens_per_block": 4, "max_tokens": 48},
                 show_progress=False) as llm:
            outs = llm.generate(prompts, sp, use_tqdm=False)
            stats = llm.get_stats()
            cache_shape = tuple(llm._core.executor.runner.attn_layers[0].kv_cache.shape)
        assert [o.outputs[0].token_ids for o in outs] == ref, cp_config
        assert stats["num_preemptions"] > 0
        assert cache_shape[1] == 2  # tokens per block on this rank: 4 / cp
    with pytest.raises(ValueError, match="latent attention and cp_type ULYSSES .* accepted: cp_type RING"):
        LLM(str(tmp_path), context_parallel_size=2, show_progress=False)


def test_ring_with_sliding_windows_is_refused(tmp_path):
    build_checkpoint(str(tmp_path), "mistral", sliding_window=6)
    with pytest.raises(ValueError) as e:
        LLM(str(tmp_path), context_parallel_size=2, cp_config=RING, show_progress=False)
    assert str(e.value) == ("cp_type RING with MistralForCausalLM's sliding-window attention (window 6) is not "
                            "supported yet; accepted: ULYSSES for this model")


def test_helix_splits_the_mlp_and_o_proj_over_tp_x_cp(checkpoints):
    """HELIX at tp2 x cp2: each rank holds 1/4 of the MLP and of o_proj's input (its head slice), half
    of each block's tokens of its tp rank's KV heads, and answers as transformers does."""
    path, prompts, ref = checkpoints["gqa"]
    with LLM(path, tensor_parallel_size=2, context_parallel_size=2, cp_config=HELIX, kv_cache_config=KV_RING,
             show_progress=False) as llm:
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, SP, use_tqdm=False)]
        model = llm._core.executor.runner.model
    layer = model.model.layers[0]
    hf_cfg = model.cfg
    assert got == ref
    assert layer.mlp.gate_up_proj.weight.shape[0] == 2 * hf_cfg.intermediate_size // 4
    assert layer.self_attn.o_proj.weight.shape[1] == hf_cfg.num_attention_heads * hf_cfg.head_dim // 4
    assert tuple(layer.self_attn.attn.kv_cache.shape[2:4]) == (KV_RING["tokens_per_block"] // 2,
                                                                hf_cfg.num_key_value_heads // 2)
