"""The norm fused into the linear that reads it (RMSNorm.then_linear: kernels/gemv.py norm_gemv under
Triton's interpreter on CPU; on the GPU it runs for every batch-1 decode step): greedy ids equal
transformers one request at a time (so decode steps have one row) for a dense Qwen3 (q/k/v and
gate_up), Qwen3-MoE (norm + router gate + top-k in one kernel, the expert-load counts still exact),
Qwen2-MoE (shared expert, which reads the normed row the kernel writes) and DeepSeek-V3 (its dense
first layer's MLP; latent attention takes the unfused path); the fused kernel ran on every decode
step of every layer it applies to."""
import pytest
import torch

from helpers import build_checkpoint, build_deepseek, hf_greedy, make_prompts
from meshserve import LLM, SamplingParams
from meshserve.kernels import gemv as gemv_mod
from meshserve.layers import norm as norm_mod

pytest.importorskip("triton")
MAX_NEW = 4
SP = SamplingParams(max_tokens=MAX_NEW, temperature=0, ignore_eos=True)
# Under the interpreter each fused launch costs one program per two output rows (gemv._config's
# one-row tiles), a few milliseconds each: the checkpoints keep the tiny defaults' shapes (GQA group 2,
# head_dim 16, 2 layers) with fewer heads and a narrower MLP, so q/k/v is 64 rows wide, not 128, and
# a dense gate_up 64, not 192.
SMALL = {"qwen3": dict(num_attention_heads=2, num_key_value_heads=1, intermediate_size=32),
         "qwen3_moe": dict(num_attention_heads=2, num_key_value_heads=1),
         "qwen2_moe": dict(num_attention_heads=2, num_key_value_heads=1, hidden_size=32),  # head_dim 32 / 2
         "deepseek_v3": dict(intermediate_size=32)}  # the dense first layer's MLP


def spy_fused_launches(monkeypatch) -> dict:
    """Fusion on under the interpreter, and a count of the fused launches (n) and of those that route."""
    calls = {"n": 0, "routed": 0}
    real = gemv_mod.norm_gemv

    def spy(*args, **kw):
        calls["n"] += 1
        calls["routed"] += kw.get("route") is not None
        return real(*args, **kw)

    monkeypatch.setattr(gemv_mod, "norm_gemv", spy)
    monkeypatch.setattr(norm_mod, "FUSE_LINEAR", True)
    return calls


@pytest.mark.skipif(torch.cuda.is_available(), reason="counts the fused kernel under the interpreter on CPU; on a "
                    "GPU this fp32 checkpoint runs unfused (the fusion takes bf16/fp16 rows): the GPU kernel is "
                    "tests/gpu/test_norm_gemv.py")
@pytest.mark.parametrize("arch,per_layer", [("qwen3", 2), ("qwen3_moe", 2), ("qwen2_moe", 2), ("deepseek_v3", None)])
def test_fused_norm_linear_greedy_matches_transformers(tmp_path, monkeypatch, arch, per_layer):
    if arch == "deepseek_v3":
        hf = build_deepseek(str(tmp_path), arch, **SMALL[arch])
    else:
        hf = build_checkpoint(str(tmp_path), arch, num_hidden_layers=2, **SMALL[arch])
    prompts = make_prompts(2, 300, 7)
    ref = [hf_greedy(hf, p, MAX_NEW) for p in prompts]
    calls = spy_fused_launches(monkeypatch)
    with LLM(str(tmp_path), kv_cache_config={"tokens_per_block": 4, "max_tokens": 1024}, show_progress=False,
             cuda_graph_config=None, kernel_config={"fuse_norm_linear": True}) as llm:
        calls.update(n=0, routed=0)  # not the start-up's warm-up step
        got = [llm.generate([p], SP, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
        stats = llm.get_stats()
    assert got == ref
    # one-row steps: the decode steps, and a one-token prefill (a prompt whose other tokens hit the
    # prefix cache) or an overlap step past a request's end if the engine runs one
    steps = len(prompts) * (MAX_NEW - 1)
    assert calls["n"] >= steps
    layers = hf.config.num_hidden_layers
    if per_layer is not None:
        per_step = layers * per_layer
    else:  # DeepSeek-V3 test model: only the dense first layers' MLPs fuse
        per_step = hf.config.first_k_dense_replace
    assert calls["n"] % per_step == 0 and calls["n"] // per_step in (steps, steps + 1, steps + 2)
    if arch.endswith("moe"):
        assert calls["routed"] == calls["n"] // 2
        ran = sum(len(p) for p in prompts) + len(prompts) * (MAX_NEW - 1)
        for layer, counts in stats["expert_tokens"].items():
            assert sum(counts) == ran * hf.config.num_experts_per_tok, (layer, counts)


def test_fusion_is_off_unless_kernel_config_asks(tmp_path, monkeypatch):
    """kernel_config.fuse_norm_linear defaults to off (until measured on the GPU): no fused launch."""
    build_checkpoint(str(tmp_path), "qwen3", num_hidden_layers=1)
    calls = []
    real = gemv_mod.norm_gemv
    monkeypatch.setattr(gemv_mod, "norm_gemv", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(norm_mod, "FUSE_LINEAR", True)
    with LLM(str(tmp_path), kv_cache_config={"tokens_per_block": 4, "max_tokens": 256}, show_progress=False) as llm:
        llm.generate([make_prompts(1, 300, 5)[0]], SP, use_tqdm=False)
    assert calls == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="counts the fused kernel under the interpreter on CPU; on a "
                    "GPU this fp32 checkpoint runs unfused (the fusion takes bf16/fp16 rows): the GPU kernel is "
                    "tests/gpu/test_norm_gemv.py")
@pytest.mark.parametrize("part", ["attention", "mlp"])
def test_fusing_one_part_only(tmp_path, monkeypatch, part):
    """kernel_config.fuse_norm_linear 'attention' or 'mlp': only the norm before q/k/v, or only the
    post-attention norm with the MoE router gate and its top-k; greedy ids still equal transformers."""
    hf = build_checkpoint(str(tmp_path), "qwen3_moe", num_hidden_layers=2, **SMALL["qwen3_moe"])
    prompts = make_prompts(1, 300, 6)
    ref = [hf_greedy(hf, p, MAX_NEW) for p in prompts]
    calls = spy_fused_launches(monkeypatch)
    with LLM(str(tmp_path), kv_cache_config={"tokens_per_block": 4, "max_tokens": 1024}, show_progress=False,
             cuda_graph_config=None, kernel_config={"fuse_norm_linear": part}) as llm:
        calls.update(n=0, routed=0)
        got = [llm.generate([p], SP, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    assert got == ref
    assert calls["n"] >= 2 * (MAX_NEW - 1)  # one fused launch per layer and decode step
    assert calls["routed"] == (calls["n"] if part == "mlp" else 0)
