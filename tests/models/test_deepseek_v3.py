"""DeepSeek-V3 / V2: multi-head latent attention (MLA) and DeepSeekMoE, fp32 on CPU ranks.

Greedy ids equal transformers for tiny random checkpoints (q_lora on and off, DeepSeek's YaRN with
mscale / mscale_all_dim, a dense first layer then grouped sigmoid routing over 8 experts in 2
groups with e_score_correction_bias and a shared expert; V2's softmax group-limited routing) at
tp1, tp2, pp2, tp2 x pp2, tp2 x ep2 (experts split the TP ranks), tp1 x ep2 (attention
replicas) and the seed's tp16 x ep4 on 16 ranks, under chunked prefill (decode rows beside prefill
chunks in one step), preemption and prefix reuse, and with the Triton decode kernel under Triton's
interpreter. The KV
cache holds one latent vector per token and layer: (kv_lora_rank + qk_rope_head_dim) x dtype bytes,
asserted from the KV manager's specs and the runner's tensors. The absorbed (decode) and expanded
(prefill) forms agree with each other, and the Triton kernel with its torch reference. Multi-token
prediction layers in a checkpoint are skipped with a log line; FP8 tensors without a quantization_config are refused (FP8 checkpoints: tests/models/test_fp8.py)."""
import json
import logging
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import DEEPSEEK_YARN, build_deepseek, hf_greedy, make_prompts
from meshserve import LLM, SamplingParams
from meshserve.engine.kv_spec import MLAAttentionSpec

BLOCK = 4
MAX_NEW = 10
SP = SamplingParams(max_tokens=MAX_NEW, temperature=0, ignore_eos=True)
LORA, ROPE = 32, 8  # kv_lora_rank, qk_rope_head_dim of helpers.DEEPSEEK_DEFAULTS


@pytest.fixture(scope="module")
def prompts():
    return make_prompts(7, 320, 3 * BLOCK + 3)  # lengths 1 .. 15


@pytest.fixture(scope="module")
def v3(tmp_path_factory, prompts):
    """3 layers: dense, MoE, MoE; q_lora on; YaRN."""
    path = str(tmp_path_factory.mktemp("deepseek-v3"))
    hf = build_deepseek(path, num_hidden_layers=3, rope_parameters=DEEPSEEK_YARN)
    return path, [hf_greedy(hf, p, MAX_NEW) for p in prompts]


def generate(path, prompts, ref, **kw):
    kv = {"tokens_per_block": BLOCK, "max_tokens": 4096}
    kv.update(kw.pop("kv", {}))
    with LLM(path, kv_cache_config=kv, show_progress=False, **kw) as llm:
        outs = llm.generate(prompts, SP, use_tqdm=False)
        stats = llm.get_stats()
        runner = getattr(llm._core.executor, "runner", None)
        specs = list(llm._core.kv.specs)
        caches = list(runner.kv_caches) if runner is not None else None
        backend = runner.attn_backend.name if runner is not None else None
    got = [o.outputs[0].token_ids for o in outs]
    for i, (g, r) in enumerate(zip(got, ref)):
        assert g == r, f"prompt {i} (length {len(prompts[i])}): meshserve {g} != transformers {r}"
    return stats, specs, caches, backend


def test_tp1_matches_transformers_with_a_latent_kv_cache(v3, prompts):
    path, ref = v3
    stats, specs, caches, backend = generate(path, prompts, ref)
    assert backend == "mla-torch"
    # the KV manager: one group, every layer a latent spec of (kv_lora_rank + rope dims) values per token
    assert specs == [MLAAttentionSpec(LORA, ROPE)]
    assert specs[0].bytes_per_token(4) == (LORA + ROPE) * 4
    # the runner: one [num_blocks, block_size, L + R] tensor per layer, the same bytes per token
    assert len(caches) == 3
    for t in caches:
        assert t.shape[1:] == (BLOCK, LORA + ROPE)
        assert t.numel() * t.element_size() // (t.shape[0] * BLOCK) == (LORA + ROPE) * 4
    assert sorted(stats["expert_tokens"]) == [1, 2]  # the first layer is dense


CASES = {
    "v3-no-q-lora": ("deepseek_v3", dict(q_lora_rank=None)),
    "v3-rope-not-interleaved-bias": ("deepseek_v3", dict(rope_interleave=False, attention_bias=True)),
    "v2-lite-group-limited": ("deepseek_v2", dict(q_lora_rank=None, rope_parameters=DEEPSEEK_YARN)),
    "v2-greedy-q-lora": ("deepseek_v2", dict(topk_method="greedy", n_group=None, topk_group=None)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_variants_match_transformers(tmp_path, prompts, name):
    arch, overrides = CASES[name]
    hf = build_deepseek(str(tmp_path), arch, **overrides)
    generate(str(tmp_path), prompts, [hf_greedy(hf, p, MAX_NEW) for p in prompts])


@pytest.mark.parametrize("layout", [
    dict(tensor_parallel_size=2),
    dict(pipeline_parallel_size=2),
    dict(tensor_parallel_size=2, pipeline_parallel_size=2),
    dict(tensor_parallel_size=2, moe_expert_parallel_size=2),  # split: the experts split the TP ranks
    dict(moe_expert_parallel_size=2),  # replicate: 2 attention replicas of TP 1, 2 expert slots
], ids=["tp2", "pp2", "tp2xpp2", "tp2xep2-split", "tp1xep2-replicate"])
def test_parallel_layouts_match_transformers(v3, prompts, layout):
    path, ref = v3
    stats = generate(path, prompts, ref, **layout)[0]
    assert sorted(stats["expert_tokens"]) == [1, 2]


def test_seed_layout_tp16_ep4_on_16_ranks(tmp_path):
    """The seed's --tp_size 16 --ep_size 4: 16 CPU ranks, one attention head each (the latent
    cache replicated on every rank), experts split 4 ways (moe_tp 4 x moe_ep 4)."""
    hf = build_deepseek(str(tmp_path), num_hidden_layers=2, num_attention_heads=16, num_key_value_heads=16)
    prompts = make_prompts(3, 320, 9, seed=3)
    sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    ref = [hf_greedy(hf, p, sp.max_tokens) for p in prompts]
    with LLM(str(tmp_path), tensor_parallel_size=16, moe_expert_parallel_size=4, show_progress=False,
             kv_cache_config={"tokens_per_block": BLOCK, "max_tokens": 512}) as llm:
        assert llm._core.executor.world_size == 16
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]
    assert got == ref


def test_chunked_prefill_preemption_and_prefix_reuse(v3, prompts):
    path, ref = v3
    # 6 tokens a step: long prompts are chunked and share steps with decode rows; 12 blocks for 7
    # sequences of up to 25 tokens: preemption; the repeated prompt finds its blocks cached
    kv = {"tokens_per_block": BLOCK, "max_tokens": 48}
    with LLM(path, max_num_tokens=6, enable_chunked_prefill=True, kv_cache_config=kv, show_progress=False) as llm:
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, SP, use_tqdm=False)]
        again = llm.generate(prompts[-1], SP, use_tqdm=False)
        stats = llm.get_stats()
    assert got == ref and again.outputs[0].token_ids == ref[-1]
    assert stats["num_preemptions"] > 0
    assert again.num_cached_tokens >= 3 * BLOCK


def test_triton_decode_kernel_in_the_engine(v3, prompts):
    pytest.importorskip("triton")
    path, ref = v3
    _, _, _, backend = generate(path, prompts, ref, attention_backend="triton", dtype="float32", max_num_tokens=8,
                                enable_chunked_prefill=True)
    assert backend == "mla-triton"


# ---- the attention pieces -------------------------------------------------------------------------
def _layer_and_cache(heads=3, nope=16, rope=8, v=12, lora=32, num_blocks=12, dtype=torch.float64, seed=0):
    from meshserve.layers.attention.mla import MLAAttention
    g = torch.Generator().manual_seed(seed)
    layer = MLAAttention(heads, lora, nope, rope, v, (nope + rope) ** -0.5)
    layer.kv_cache = torch.randn(num_blocks, BLOCK, lora + rope, generator=g, dtype=dtype)
    w_kv_b = torch.randn(heads * (nope + v), lora, generator=g, dtype=dtype) * 0.3
    return layer, w_kv_b, g


def test_absorbed_and_expanded_forms_agree():
    from meshserve.layers.attention.mla import MLAPart, TorchMLABackend, _expanded_attention
    from meshserve.layers.attention.backend import AttentionShape
    layer, w_kv_b, g = _layer_and_cache()
    seq_lens = torch.tensor([1, 6, 11], dtype=torch.int32)
    tables = torch.tensor([[1, 2, 3], [4, 5, 6], [9, 8, 7]], dtype=torch.int32)
    q = torch.randn(3, 3, 24, generator=g, dtype=torch.float64)
    part = MLAPart(None, torch.arange(4, dtype=torch.int32), seq_lens, tables, 1, 11, 3)
    backend = TorchMLABackend(AttentionShape(3, 1, 40), BLOCK, "cpu")
    out_a, lse_a = backend.absorbed(layer, q, w_kv_b, part, return_lse=True)
    out_e, lse_e = _expanded_attention(layer, q, w_kv_b, part, return_lse=True)
    torch.testing.assert_close(out_a, out_e)
    torch.testing.assert_close(lse_a, lse_e)
    torch.testing.assert_close(_expanded_attention(layer, q, w_kv_b, part, return_lse=False), out_e)


def test_a_mixed_step_equals_its_sequences_one_by_one():
    """Decode rows beside prefill rows: the step's split into the two forms changes nothing."""
    from meshserve.layers.attention.backend import AttentionMetadata
    layer, w_kv_b, g = _layer_and_cache(dtype=torch.float32)
    q_lens, ctx = [1, 5, 1, 3], [7, 0, 2, 4]  # tokens this step, tokens cached before it
    tables = torch.tensor([[1, 2, 3], [4, 5, 0], [6, 0, 0], [7, 8, 0]], dtype=torch.int32)
    T = sum(q_lens)
    q = torch.randn(T, 3, 24, generator=g)
    latent = torch.randn(T, 40, generator=g)
    slots, pos = [], []
    for b, (n, c) in enumerate(zip(q_lens, ctx)):
        for p in range(c, c + n):
            slots.append(int(tables[b, p // BLOCK]) * BLOCK + p % BLOCK)
            pos.append(p)
    cache0 = layer.kv_cache.clone()

    def md_for(seqs):
        loc = [0]
        for b in seqs:
            loc.append(loc[-1] + q_lens[b])
        sl = [slots[sum(q_lens[:b]) + i] for b in seqs for i in range(q_lens[b])]
        return AttentionMetadata(slot_mapping=torch.tensor(sl), query_start_loc=torch.tensor(loc, dtype=torch.int32),
                                 seq_lens=torch.tensor([ctx[b] + q_lens[b] for b in seqs], dtype=torch.int32),
                                 block_tables=tables[seqs], max_query_len=max(q_lens[b] for b in seqs),
                                 max_seq_len=max(ctx[b] + q_lens[b] for b in seqs), block_size=BLOCK)

    whole = layer(q.clone(), latent.clone(), w_kv_b, md_for([0, 1, 2, 3]))
    for b in range(4):
        layer.kv_cache = cache0.clone()
        lo, hi = sum(q_lens[:b]), sum(q_lens[:b + 1])
        one = layer(q[lo:hi].clone(), latent[lo:hi].clone(), w_kv_b, md_for([b]))
        torch.testing.assert_close(whole[lo:hi], one, rtol=1e-5, atol=1e-5)


def test_triton_decode_graph_plan_gives_the_eager_result():
    """What a decode CUDA graph runs (graph_metadata: rows padded to the graph's batch size with
    seq_len 0 and slot 0, the model's longest context as the bound) against the eager plan, here
    run eagerly under the interpreter."""
    pytest.importorskip("triton")
    from meshserve.layers.attention.backend import AttentionMetadata, AttentionShape
    from meshserve.layers.attention.backends.mla_triton import TritonMLABackend
    layer, w_kv_b, g = _layer_and_cache(dtype=torch.float32)
    backend = TritonMLABackend(AttentionShape(3, 1, 40), BLOCK, "cpu")
    assert backend.supports_cuda_graphs and not backend.supports_mixed_graphs
    tables = torch.tensor([[1, 2, 0], [3, 4, 5], [0, 0, 0], [0, 0, 0]], dtype=torch.int32)
    pos = [5, 9]  # the decoded token's position in each real sequence
    slots = torch.tensor([int(tables[b, p // BLOCK]) * BLOCK + p % BLOCK for b, p in enumerate(pos)] + [0, 0])
    seq_lens = torch.tensor([6, 10, 0, 0], dtype=torch.int32)
    q, latent = torch.randn(4, 3, 24, generator=g), torch.randn(4, 40, generator=g)
    positions = torch.tensor(pos + [0, 0])

    def common(b, max_len):
        return AttentionMetadata(slot_mapping=slots[:b], query_start_loc=torch.arange(b + 1, dtype=torch.int32),
                                 seq_lens=seq_lens[:b], block_tables=tables[:b], max_query_len=1,
                                 max_seq_len=max_len, block_size=BLOCK, num_decodes=b)
    from meshserve.layers.rotary import RotaryEmbedding
    rotary = RotaryEmbedding(8, 64, {"rope_type": "default", "rope_theta": 10000.0})
    cache0 = layer.kv_cache.clone()
    eager = layer(q[:2].clone(), latent[:2].clone(), w_kv_b, backend.build(common(2, 10), [1, 1]), rotary,
                  positions[:2])
    eager_cache, layer.kv_cache = layer.kv_cache, cache0.clone()
    graph_md = backend.graph_metadata(common(4, 3 * BLOCK), 4, 4, decode=True)
    graphed = layer(q.clone(), latent.clone(), w_kv_b, graph_md, rotary, positions)
    torch.testing.assert_close(graphed[:2], eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.kv_cache[1:], eager_cache[1:])  # block 0 took the padding rows
    with pytest.raises(NotImplementedError, match="steps with prompt tokens run eagerly"):
        backend.graph_metadata(common(4, 3 * BLOCK), 4, 4, decode=False)


@pytest.mark.parametrize("splits", [1, 3, 16])
@pytest.mark.parametrize("page,lora,rope,page_tiles", [(BLOCK, 48, 8, True), (64, 48, 8, True), (64, 64, 16, True),
                                                       (64, 64, 16, False)])
def test_triton_kernel_matches_the_reference(splits, page, lora, rope, page_tiles):
    """Pages of 64 hold whole 32-key tiles: the one-block-id tile loop (page_tiles), with L and R
    powers of two (unmasked loads) or not, and a partial last tile; pages of BLOCK and page_tiles
    off take the gathering loop."""
    pytest.importorskip("triton")
    from meshserve.kernels.mla_decode import mla_decode
    from meshserve.layers.attention.mla import paged_latent_decode
    g = torch.Generator().manual_seed(splits)
    heads, blocks = 20, 24  # heads over two head blocks
    width = -(-160 // page)
    cache = torch.randn(blocks, page, lora + rope, generator=g)
    q = torch.randn(4, heads, lora + rope, generator=g)
    seq_lens = torch.tensor([1, 9 if page == BLOCK else 96, 0, 37 if page == BLOCK else 150],
                            dtype=torch.int32)  # a padding row of no context too
    tables = torch.randint(1, blocks, (4, max(10, width)), generator=g, dtype=torch.int32)
    out, lse = mla_decode(q, cache, tables, seq_lens, lora, 0.2, splits, return_lse=True, page_tiles=page_tiles)
    ref, ref_lse = paged_latent_decode(q, cache, tables, seq_lens, lora, 0.2, return_lse=True)
    valid = seq_lens > 0
    torch.testing.assert_close(out[valid], ref[valid], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse[valid], ref_lse[valid], rtol=1e-5, atol=1e-5)
    assert torch.isinf(lse[~valid]).all() and (out[~valid] == 0).all()


# ---- checkpoints ------------------------------------------------------------------------------------
def _add_tensors(path: str, extra: dict) -> None:
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    tensors.update(extra)
    save_file(tensors, file, metadata={"format": "pt"})


def test_multi_token_prediction_layers_are_skipped_with_a_log_line(tmp_path, prompts, caplog):
    hf = build_deepseek(str(tmp_path), num_nextn_predict_layers=1)
    _add_tensors(str(tmp_path), {"model.layers.2.eh_proj.weight": torch.zeros(64, 128),
                                 "model.layers.2.self_attn.kv_b_proj.weight": torch.zeros(4 * 36, LORA)})
    with caplog.at_level(logging.INFO, logger="meshserve.models.deepseek_v3"):
        generate(str(tmp_path), prompts[:2], [hf_greedy(hf, p, MAX_NEW) for p in prompts[:2]])
    assert any("multi-token-prediction layer(s) [2]" in r.getMessage() for r in caplog.records)


def test_fp8_tensors_without_quantization_config_are_refused(tmp_path):
    """(FP8 checkpoints with their quantization_config: tests/models/test_fp8.py.)"""
    build_deepseek(str(tmp_path))
    _add_tensors(str(tmp_path), {"model.layers.0.self_attn.kv_b_proj.weight_scale_inv": torch.ones(1, 1)})
    with pytest.raises(ValueError, match="is part of FP8 quantisation, but .* has no quantization_config"):
        LLM(str(tmp_path), show_progress=False)


def test_config_errors_name_the_field(tmp_path):
    from meshserve.models.config import ModelConfig
    from meshserve.models.deepseek_v3 import router_config
    build_deepseek(str(tmp_path), "deepseek_v2")
    with open(os.path.join(str(tmp_path), "config.json")) as f:
        raw = json.load(f)
    with pytest.raises(ValueError, match="topk_method='noaux_tc' is not supported; accepted: greedy, group_limited"):
        router_config(ModelConfig.from_dict(dict(raw, topk_method="noaux_tc")))
    with pytest.raises(ValueError, match="kv_lora_rank=None must be a positive integer"):
        ModelConfig.from_dict(dict(raw, kv_lora_rank=None))
