"""Mixture-of-experts models on one rank (fp32, CPU): greedy ids equal transformers for tiny Mixtral,
Qwen2-MoE (shared expert, dense layers by decoder_sparse_step / mlp_only_layers) and Qwen3-MoE, from
the Hub's per-expert checkpoint layout and from transformers 5's fused one; under chunked prefill,
preemption and prefix reuse; the router against a float64 computation of HF's routing rules; the
expert load counts against the tokens the model actually ran."""
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from helpers import build_checkpoint, hf_greedy, make_prompts
from meshserve import LLM, SamplingParams
from meshserve.layers.moe.router import RouterConfig, select_experts

BLOCK = 4
MAX_NEW = 10
SP = SamplingParams(max_tokens=MAX_NEW, temperature=0, ignore_eos=True)

CASES = {
    "mixtral": ("mixtral", {}),
    "qwen3-moe-norm-topk": ("qwen3_moe", {}),
    "qwen3-moe-dense-layer": ("qwen3_moe", dict(norm_topk_prob=False, mlp_only_layers=[1], num_hidden_layers=3)),
    "qwen2-moe-shared-expert": ("qwen2_moe", {}),
    "qwen2-moe-sparse-step": ("qwen2_moe", dict(decoder_sparse_step=2, num_hidden_layers=3)),
}


@pytest.fixture(scope="module")
def prompts():
    return make_prompts(7, 320, 3 * BLOCK + 3)


def run(path, prompts, ref, **kw):
    kv = {"tokens_per_block": BLOCK, "max_tokens": 4096}
    kv.update(kw.pop("kv", {}))
    with LLM(path, kv_cache_config=kv, show_progress=False, **kw) as llm:
        outs = llm.generate(prompts, SP, use_tqdm=False)
        stats = llm.get_stats()
    got = [o.outputs[0].token_ids for o in outs]
    for i, (g, r) in enumerate(zip(got, ref)):
        assert g == r, f"prompt {i} (length {len(prompts[i])}): meshserve {g} != transformers {r}"
    return stats


@pytest.mark.parametrize("name", list(CASES))
def test_moe_greedy_matches_transformers(tmp_path, prompts, name):
    arch, overrides = CASES[name]
    hf = build_checkpoint(str(tmp_path), arch, **overrides)
    ref = [hf_greedy(hf, p, MAX_NEW) for p in prompts]
    stats = run(str(tmp_path), prompts, ref)
    # expert load: every token the model ran (prompt + all but the last generated) was routed to
    # top_k experts in every sparse layer
    cfg = hf.config
    ran = sum(len(p) for p in prompts) + len(prompts) * (MAX_NEW - 1)
    sparse = [i for i in range(cfg.num_hidden_layers) if type(hf.model.layers[i].mlp).__name__.endswith("SparseMoeBlock")]
    assert sorted(stats["expert_tokens"]) == sparse
    for layer, counts in stats["expert_tokens"].items():
        assert len(counts) == 8 and sum(counts) == ran * cfg.num_experts_per_tok, (layer, counts)


def _write_fused(path: str, hf) -> None:
    """Rewrite the checkpoint in transformers 5's in-memory layout: experts.gate_up_proj [E, 2I, H],
    experts.down_proj [E, H, I] (what save_pretrained turns back into per-expert tensors)."""
    for f in os.listdir(path):
        if f.endswith(".safetensors") or f.endswith(".index.json"):
            os.remove(os.path.join(path, f))
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in state)
    save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_fused_expert_layout_loads(tmp_path, prompts, arch):
    hf = build_checkpoint(str(tmp_path), arch)
    ref = [hf_greedy(hf, p, MAX_NEW) for p in prompts]
    _write_fused(str(tmp_path), hf)
    run(str(tmp_path), prompts, ref)


def test_moe_chunked_prefill_preemption_and_prefix_reuse(tmp_path, prompts):
    hf = build_checkpoint(str(tmp_path), "qwen3_moe")
    ref = [hf_greedy(hf, p, MAX_NEW) for p in prompts]
    run(str(tmp_path), prompts, ref, max_num_tokens=5, enable_chunked_prefill=True)
    stats = run(str(tmp_path), prompts, ref, kv={"max_tokens": 40, "enable_block_reuse": False})
    assert stats["num_preemptions"] > 0
    shared = list(range(40, 53))  # 3 full blocks shared, the 4th differs per prompt
    again = [shared + [5 + i, 6, 7] for i in range(3)]
    ref2 = [hf_greedy(hf, p, MAX_NEW) for p in again]
    with LLM(str(tmp_path), kv_cache_config={"tokens_per_block": BLOCK}, show_progress=False) as llm:
        got = [llm.generate([p], SP, use_tqdm=False)[0].outputs[0].token_ids for p in again]  # one after another
        assert llm.get_stats()["prefix_cache_hits"] > 0
    assert got == ref2


def _hf_route(logits: torch.Tensor, cfg: RouterConfig, bias=None):
    """HF's routing rules in float64 (Mixtral/Qwen: softmax top-k; DeepSeek-V3: sigmoid, groups)."""
    x = logits.double()
    if cfg.scoring == "softmax":
        p = torch.softmax(x, -1)
        w, ids = torch.topk(p, cfg.top_k, -1)
        if cfg.renormalize:
            w = w / w.sum(-1, keepdim=True)
        return w * cfg.routed_scaling_factor, ids
    s = x.sigmoid()
    choice = s + (bias.double() if bias is not None else 0)
    t, e = s.shape
    if cfg.n_group:
        g = choice.view(t, cfg.n_group, -1).topk(2, -1)[0].sum(-1)
        keep = torch.zeros_like(g).scatter_(1, g.topk(cfg.topk_group, -1)[1], 1).bool()
        choice = choice.masked_fill(~keep.repeat_interleave(e // cfg.n_group, 1), float("-inf"))
    ids = choice.topk(cfg.top_k, -1)[1]
    w = s.gather(1, ids)
    if cfg.renormalize:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return w * cfg.routed_scaling_factor, ids


@pytest.mark.parametrize("cfg", [
    RouterConfig(2), RouterConfig(3, renormalize=False),
    RouterConfig(4, scoring="sigmoid", n_group=4, topk_group=2, routed_scaling_factor=2.5),
    RouterConfig(2, scoring="sigmoid", renormalize=False)], ids=str)
def test_router_matches_float64_reference(cfg):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(37, 16, generator=g)
    bias = torch.randn(16, generator=g) * 0.1 if cfg.scoring == "sigmoid" else None
    w, ids = select_experts(logits, cfg, bias)
    rw, rids = _hf_route(logits, cfg, bias)
    order, rorder = ids.sort(-1)[1], rids.sort(-1)[1]
    assert torch.equal(ids.gather(1, order), rids.gather(1, rorder))
    torch.testing.assert_close(w.double().gather(1, order), rw.gather(1, rorder), rtol=1e-6, atol=1e-7)


def test_router_config_errors_name_the_numbers():
    with pytest.raises(ValueError, match="num_experts_per_tok=9 is larger than the number of experts 8"):
        RouterConfig(9).check(8)
    with pytest.raises(ValueError, match="n_group=3 must divide the number of experts 8"):
        RouterConfig(2, scoring="sigmoid", n_group=3, topk_group=1).check(8)
    with pytest.raises(ValueError, match="scoring='relu'"):
        RouterConfig(2, scoring="relu")


def test_moe_settings_on_a_dense_model_are_refused(tmp_path):
    build_checkpoint(str(tmp_path), "llama")
    with pytest.raises(ValueError, match="moe_expert_parallel_size=2: LlamaForCausalLM has no experts"):
        LLM(str(tmp_path), moe_expert_parallel_size=2, show_progress=False)
    with pytest.raises(ValueError, match="moe_config.backend='TRITON': LlamaForCausalLM has no experts"):
        LLM(str(tmp_path), moe_config={"backend": "TRITON"}, show_progress=False)
    with pytest.raises(ValueError, match="moe_config.backend='FAST' is not supported; accepted: auto, VANILLA"):
        LLM(str(tmp_path), moe_config={"backend": "FAST"}, show_progress=False)


def test_qwen3_moe_checkpoint_uses_hub_expert_count_key(tmp_path):
    """Hub configs spell the expert count `num_experts`; transformers 5 saves `num_local_experts`."""
    hf = build_checkpoint(str(tmp_path), "qwen3_moe")
    cfg_path = os.path.join(str(tmp_path), "config.json")
    raw = json.load(open(cfg_path))
    raw["num_experts"] = raw.pop("num_local_experts", raw.get("num_experts"))
    json.dump(raw, open(cfg_path, "w"))
    prompts = make_prompts(3, 320, 9)
    run(str(tmp_path), prompts, [hf_greedy(hf, p, MAX_NEW) for p in prompts])


@pytest.mark.parametrize("backend", ["VANILLA", "TRITON", "CUTLASS"])
def test_each_expert_backend_gives_transformers_ids(tmp_path, prompts, backend):
    """moe_config.backend through the engine: TRITON under Triton's interpreter on CPU (conftest sets
    TRITON_INTERPRET=1 without a GPU), CUTLASS through torch._grouped_mm's CPU path."""
    hf = build_checkpoint(str(tmp_path), "qwen2_moe")
    if backend == "CUTLASS" and torch.cuda.is_available():
        # this fp32 checkpoint on a GPU: torch._grouped_mm's CUDA kernels take bf16 only, so the engine
        # refuses in one line (CUTLASS in bf16 on the GPU: tests/gpu/test_moe_kernel.py)
        with pytest.raises(ValueError, match=r"moe_config.backend='CUTLASS' cannot run here: .*bfloat16 only"):
            LLM(str(tmp_path), kv_cache_config={"tokens_per_block": BLOCK, "max_tokens": 4096}, show_progress=False,
                moe_config={"backend": backend})
        return
    ref = [hf_greedy(hf, p, MAX_NEW) for p in prompts[:4]]
    with LLM(str(tmp_path), kv_cache_config={"tokens_per_block": BLOCK, "max_tokens": 4096}, show_progress=False,
             moe_config={"backend": backend}) as llm:
        blocks = llm._core.executor.runner.model.moe_blocks()
        assert {b.experts.backend_name for b in blocks.values()} == {backend}
        got = [o.outputs[0].token_ids for o in llm.generate(prompts[:4], SP, use_tqdm=False)]
    assert got == ref
