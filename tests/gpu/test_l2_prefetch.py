"""kernel_config.decode_l2_prefetch and l2_prefetch_next_layer on a GPU: the L2 prefetch
(kernels/prefetch.py) compiles and runs (inline PTX, which Triton's interpreter cannot run); decode
attention with the o_proj weight to prefetch, the skinny GEMM and the fused norm + gate + router with
a weight to prefetch, and the experts' decode kernels loading evict-first each give bitwise the output
without (eager and in CUDA graphs, with and without PDL); greedy ids of a tiny Qwen3 and Qwen3-MoE
with the switches on equal transformers' (fp32) and the switches off (bf16, where the skinny GEMMs run).
"""
import dataclasses

import pytest
import torch

from helpers import build_checkpoint, hf_greedy, make_prompts
from meshserve import LLM, SamplingParams, kernels
from meshserve.kernels import settings as ks

pytest.importorskip("triton")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")]
SP = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)


@pytest.mark.parametrize("numel", [1, 64, 4096 * 2048, 4096 * 2048 + 3])
def test_prefetch_kernel_runs_and_leaves_the_tensor_alone(numel):
    from meshserve.kernels.prefetch import prefetch_l2

    t = torch.randn(numel, device="cuda", dtype=torch.bfloat16)
    before = t.clone()
    prefetch_l2(t)
    prefetch_l2(t[1:] if numel > 1 else t, programs=7)  # an odd byte offset's lines, a grid not dividing them
    torch.cuda.synchronize()
    assert torch.equal(t, before)


@pytest.mark.parametrize("pdl", [False, True])
@pytest.mark.parametrize("rope", [False, True])
def test_decode_attention_with_prefetch_equals_without_in_a_graph(pdl, rope):
    """Qwen3-30B-A3B's decode attention shape (32 / 4 heads of 128) at batch 1 and 8 over a few hundred
    keys, with its o_proj weight [2048, 4096] to prefetch: graph replays on fresh q equal the launch
    without the prefetch, bitwise."""
    if pdl and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("PDL needs compute capability 9.0+")
    from test_paged_attention_kernel import make_batch, to
    from meshserve.kernels import paged_attention as pa

    w = torch.randn(2048, 4096, device="cuda", dtype=torch.bfloat16)
    kernels.configure(dataclasses.replace(ks.H200, pdl=pdl))
    try:
        for batch in (1, 8):
            ctx = [200 + 37 * i for i in range(batch)]
            q, k, v, cache, md = make_batch([1] * batch, ctx, 32, 4, 128, 32, torch.bfloat16, seed=batch)
            d = to(md, "cuda")
            tiles = pa.plan_tiles([1] * batch, 1, "cuda")
            qd, kd, vd, cd = q.cuda(), k.cuda(), v.cuda(), cache.cuda()
            pos = (md.seq_lens.long() - 1).cuda()
            cos = torch.rand(4096, 64, device="cuda")
            sin = torch.rand(4096, 64, device="cuda")

            def attn(prefetch, qd=qd, cd=cd):
                r = pa.RopeInputs(kd, vd, pos, cos, sin, d.slot_mapping) if rope else None
                return pa.paged_attention(qd, cd, d.block_tables, d.seq_lens, d.query_start_loc, *tiles, 1,
                                          128 ** -0.5, None, 16, workspace={}, rope=r, prefetch=prefetch)

            ref_cache = cd.clone()
            ref = attn(None, cd=ref_cache).clone()
            got_cache = cd.clone()
            assert torch.equal(attn(w, cd=got_cache), ref)
            assert torch.equal(got_cache, ref_cache)
            static_q = qd.clone()
            graph_cache = cd.clone()
            attn(w, qd=static_q, cd=graph_cache)  # compiled before the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = attn(w, qd=static_q, cd=graph_cache)
            for seed in range(3):
                fresh = torch.randn(qd.shape, generator=torch.Generator().manual_seed(seed)).to(qd)
                static_q.copy_(fresh)
                graph.replay()
                want = attn(None, qd=fresh.clone(), cd=graph_cache.clone())
                assert torch.equal(out, want)
    finally:
        kernels.configure(ks.H200)


@pytest.mark.parametrize("pdl", [False, True])
def test_skinny_gemms_with_prefetch_equal_without_in_a_graph(pdl):
    """gemv (o_proj's shape) and norm_gemv with the router epilogue (the gate's shape, top-8 of 128),
    each prefetching a 21 MB weight (the next layer's q/k/v), replayed on fresh rows."""
    if pdl and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("PDL needs compute capability 9.0+")
    from meshserve.kernels.gemv import gemv, norm_gemv
    from meshserve.kernels.moe_router import route_constexprs

    g = torch.Generator(device="cuda").manual_seed(3)
    nxt = torch.randn(5120, 2048, device="cuda", dtype=torch.bfloat16, generator=g)
    w_o = torch.randn(2048, 4096, device="cuda", dtype=torch.bfloat16, generator=g) / 64
    gate = torch.randn(128, 2048, device="cuda", dtype=torch.bfloat16, generator=g) / 45
    nw = torch.rand(2048, device="cuda", dtype=torch.bfloat16, generator=g) + 0.5
    meta = route_constexprs(128, 8, sigmoid=False, renormalize=True, has_bias=False, n_group=None, topk_group=None,
                            scale=1.0)
    counter = torch.zeros(1, dtype=torch.int32, device="cuda")

    def chain(x, res, prefetch):
        y = gemv(x, w_o, prefetch=nxt if prefetch else None)
        (weights, ids), s, h = norm_gemv(y, res, nw, 1e-6, gate, want_h=True, route=(counter, meta, None, 1.0, None),
                                         prefetch=nxt if prefetch else None)
        return torch.cat([y.float().flatten(), s.float().flatten(), h.float().flatten(), weights.flatten(),
                          ids.float().flatten()])

    kernels.configure(dataclasses.replace(ks.H200, pdl=pdl))
    try:
        x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16, generator=g)
        res = torch.randn(1, 2048, device="cuda", dtype=torch.bfloat16, generator=g)
        assert torch.equal(chain(x, res, True), chain(x, res, False))
        sx, sres = x.clone(), res.clone()
        chain(sx, sres, True)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = chain(sx, sres, True)
        for _ in range(3):
            fx = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16, generator=g)
            fres = torch.randn(1, 2048, device="cuda", dtype=torch.bfloat16, generator=g)
            sx.copy_(fx)
            sres.copy_(fres)
            graph.replay()
            assert torch.equal(out, chain(fx, fres, False))
    finally:
        kernels.configure(ks.H200)


def test_experts_evict_first_equal_the_default_at_one_token(monkeypatch):
    """The experts' decode kernels (GEMV gated product, down + sum) at Qwen3-30B-A3B's shape, one token,
    loading their weights evict-first (kernel_config.l2_prefetch_next_layer) and by default: bitwise equal."""
    from meshserve.kernels.moe import GemmConfig, MoeKernelConfig, fused_experts
    from meshserve.kernels.moe_router import router_topk

    H, I, E, K = 2048, 768, 128, 8
    g = torch.Generator(device="cuda").manual_seed(5)
    w13 = torch.randn(E, 2 * I, H, device="cuda", generator=g, dtype=torch.bfloat16) / H ** 0.5
    w2 = torch.randn(E, H, I, device="cuda", generator=g, dtype=torch.bfloat16) / I ** 0.5
    x = torch.randn(1, H, device="cuda", generator=g, dtype=torch.bfloat16)
    weights, ids = router_topk(torch.randn(1, E, device="cuda", generator=g), K)
    cfg = MoeKernelConfig(16, GemmConfig(64, 128, 1, 4, 4), GemmConfig(64, 128, 1, 4, 4),
                          down_sum=GemmConfig(2, 256, 1, 2, 1), gate_up_gemv=GemmConfig(4, 512, 1, 4, 1))
    base = fused_experts(x, w13, w2, weights, ids, configs=cfg)
    monkeypatch.setattr(kernels, "L2_PREFETCH_NEXT_LAYER", True)
    assert kernels.expert_eviction(1) == "evict_first"
    assert torch.equal(fused_experts(x, w13, w2, weights, ids, configs=cfg), base)


@pytest.mark.parametrize("kind", ["qwen3", "qwen3_moe"])
def test_prefetch_greedy_ids_match_transformers_with_graphs(tmp_path, kind):
    path = str(tmp_path / kind)
    hf = (build_checkpoint(path, "qwen3", num_hidden_layers=3, num_key_value_heads=1) if kind == "qwen3"
          else build_checkpoint(path, "qwen3_moe", num_hidden_layers=3))
    prompts = make_prompts(4, 300, 40, seed=7)
    ref = [hf_greedy(hf, p, 16) for p in prompts]
    switches = {"decode_l2_prefetch": True, "l2_prefetch_next_layer": True}

    def run(dtype, **kc):
        with LLM(path, show_progress=False, dtype=dtype, kernel_config=kc,
                 kv_cache_config={"tokens_per_block": 16, "max_tokens": 4096}) as llm:
            runner = llm._core.executor.runner
            got = [o.outputs[0].token_ids for o in llm.generate(prompts, SP, use_tqdm=False)]
            got += [o.outputs[0].token_ids for o in llm.generate(prompts[:1], SP, use_tqdm=False)]  # batch 1
            assert runner.graphs is not None and runner.graphs.replays > 0
            return got

    assert run("float32", **switches) == ref + ref[:1]
    # bf16: the one-row steps take the skinny GEMMs (and with fuse_norm_linear the fused router), which prefetch
    assert run("bfloat16", **switches) == run("bfloat16")
    pdl = torch.cuda.get_device_capability()[0] >= 9
    assert run("bfloat16", fuse_norm_linear=True, pdl=pdl, **switches) == run("bfloat16", fuse_norm_linear=True,
                                                                              pdl=pdl)
