"""kernel_config.decode_l2_prefetch on a GPU: the L2 prefetch (kernels/prefetch.py) compiles and runs
(inline PTX, which Triton's interpreter cannot run), decode attention with the o_proj weight to
prefetch gives bitwise the output without it (eager, in a CUDA graph, with and without PDL and the
fused rotary), and greedy ids of a tiny Qwen3 and Qwen3-MoE with the switch on equal transformers'.
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


@pytest.mark.parametrize("kind", ["qwen3", "qwen3_moe"])
def test_prefetch_greedy_ids_match_transformers_with_graphs(tmp_path, kind):
    path = str(tmp_path / kind)
    hf = (build_checkpoint(path, "qwen3", num_hidden_layers=3, num_key_value_heads=1) if kind == "qwen3"
          else build_checkpoint(path, "qwen3_moe", num_hidden_layers=2))
    prompts = make_prompts(4, 300, 40, seed=7)
    ref = [hf_greedy(hf, p, 16) for p in prompts]
    with LLM(path, show_progress=False, dtype="float32", kernel_config={"decode_l2_prefetch": True},
             kv_cache_config={"tokens_per_block": 16, "max_tokens": 4096}) as llm:
        runner = llm._core.executor.runner
        assert runner.kernel_settings.decode_l2_prefetch
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, SP, use_tqdm=False)]
        got += [o.outputs[0].token_ids for o in llm.generate(prompts[:1], SP, use_tqdm=False)]  # batch 1
        assert runner.graphs is not None and runner.graphs.replays > 0
    assert got == ref + ref[:1]
