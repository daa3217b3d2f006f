"""kernel_config.pdl on a GPU (compute capability 9.0+): the Triton kernels launched with programmatic
dependent launch give the same results as without it, in CUDA graphs, where a kernel that read its
input before the previous one finished would show stale values on a replay with new inputs.

- kernel chains captured in a graph with PDL on and off, replayed on fresh inputs: skinny GEMM into
  skinny GEMM (weights load before the wait, x after), RMSNorm + residual into a GEMM, bitwise equal;
- greedy ids equal transformers in fp32 with decode and prefill graphs for a tiny Qwen3 (dense), a
  tiny Qwen3-MoE (router, two-kernel experts) and a tiny DeepSeek-V3 (latent attention), and bf16
  gives the same tokens with PDL on and off.
"""
import dataclasses

import pytest
import torch

from helpers import build_checkpoint, build_deepseek, hf_greedy, make_prompts
from meshserve import LLM, SamplingParams, kernels
from meshserve.kernels import settings as ks

pytest.importorskip("triton")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                                 reason="needs a GPU of compute capability 9.0+")]
SP = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)


def _chain(pdl: bool, fn, inputs: list[dict]) -> list[torch.Tensor]:
    """fn(**inputs[0]) captured in a graph with PDL on or off, replayed on each input set in turn."""
    kernels.configure(dataclasses.replace(ks.H200, pdl=pdl))
    try:
        static = {k: v.clone() for k, v in inputs[0].items()}
        fn(**static)  # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn(**static)
        results = []
        for given in inputs:
            for k, v in given.items():
                static[k].copy_(v)
            graph.replay()
            results.append(out.clone())
        torch.cuda.synchronize()
        return results
    finally:
        kernels.configure(ks.H200)


@pytest.mark.parametrize("m,k,n", [(1, 2048, 5120), (1, 4096, 2048), (4, 3000, 1000), (1, 2048, 128)])
def test_gemv_chain_in_a_graph_equals_without_pdl(m, k, n):
    from meshserve.kernels.gemv import gemv
    from meshserve.kernels.fused import rms_norm

    g = torch.Generator(device="cuda").manual_seed(m * k + n)
    w1 = torch.randn(k, k, device="cuda", generator=g, dtype=torch.bfloat16) / k ** 0.5
    w2 = torch.randn(n, k, device="cuda", generator=g, dtype=torch.bfloat16) / k ** 0.5
    norm_w = torch.rand(k, device="cuda", generator=g, dtype=torch.bfloat16) + 0.5

    def fn(x, res):
        h, _ = rms_norm(gemv(x, w1), norm_w, 1e-6, residual=res)
        return gemv(h, w2)

    inputs = [{"x": torch.randn(m, k, device="cuda", generator=g, dtype=torch.bfloat16),
               "res": torch.randn(m, k, device="cuda", generator=g, dtype=torch.bfloat16)} for _ in range(4)]
    off, on = _chain(False, fn, inputs), _chain(True, fn, inputs)
    for a, b in zip(off, on):
        assert torch.equal(a, b)
    assert not torch.equal(off[0], off[1])  # the replays saw new inputs


@pytest.mark.parametrize("gemv_gate_up", [False, True])
@pytest.mark.parametrize("T", [1, 4])
def test_moe_decode_chain_in_a_graph_equals_without_pdl(T, gemv_gate_up):
    """The MoE decode chain (router gate GEMV -> router top-k -> gated product -> down + sum over k)
    in a graph with PDL, replayed on new routings, equals the same graph without PDL (the gated
    product as dot tiles and as GEMV programs)."""
    from meshserve.kernels.gemv import gemv
    from meshserve.kernels.moe import GemmConfig, MoeKernelConfig, fused_experts
    from meshserve.kernels.moe_router import router_topk

    H, I, E, K = 2048, 768, 128, 8
    g = torch.Generator(device="cuda").manual_seed(T)
    gate_w = torch.randn(E, H, device="cuda", generator=g, dtype=torch.bfloat16) / H ** 0.5
    w13 = torch.randn(E, 2 * I, H, device="cuda", generator=g, dtype=torch.bfloat16) / H ** 0.5
    w2 = torch.randn(E, H, I, device="cuda", generator=g, dtype=torch.bfloat16) / I ** 0.5
    cfg = MoeKernelConfig(16, GemmConfig(64, 128, 1, 4, 4), GemmConfig(64, 128, 1, 4, 4),
                          down_sum=GemmConfig(2, 256, 1, 2, 1),
                          gate_up_gemv=GemmConfig(4, 512, 1, 4, 1) if gemv_gate_up else None)

    def fn(x):
        weights, ids = router_topk(gemv(x, gate_w), K)
        return fused_experts(x, w13, w2, weights, ids, configs=cfg)

    inputs = [{"x": torch.randn(T, H, device="cuda", generator=g, dtype=torch.bfloat16)} for _ in range(4)]
    off, on = _chain(False, fn, inputs), _chain(True, fn, inputs)
    for a, b in zip(off, on):
        assert torch.equal(a, b)
    assert not torch.equal(off[0], off[1])


def _model(kind: str, path: str):
    if kind == "qwen3":
        return build_checkpoint(path, "qwen3", num_hidden_layers=3, num_key_value_heads=1)
    if kind == "qwen3_moe":
        return build_checkpoint(path, "qwen3_moe", num_hidden_layers=2)
    return build_deepseek(path, "deepseek_v3")


@pytest.mark.parametrize("kind", ["qwen3", "qwen3_moe", "deepseek_v3"])
def test_pdl_greedy_ids_match_transformers_with_graphs(tmp_path, kind):
    path = str(tmp_path / kind)
    hf = _model(kind, path)
    prompts = make_prompts(8, 300, 40, seed=3)
    ref = [hf_greedy(hf, p, 16) for p in prompts]

    def run(dtype, pdl, **more):
        with LLM(path, show_progress=False, dtype=dtype, kernel_config={"pdl": pdl, **more},
                 kv_cache_config={"tokens_per_block": 16, "max_tokens": 4096}) as llm:
            runner = llm._core.executor.runner
            assert runner.kernel_settings.pdl is pdl and kernels.PDL is pdl
            outs = llm.generate(prompts, SP, use_tqdm=False)
            graphs = runner.graphs
            return [o.outputs[0].token_ids for o in outs], graphs

    got, graphs = run("float32", True)
    if kind != "deepseek_v3":
        assert graphs is not None and graphs.replays > 0
    assert got == ref
    assert run("bfloat16", True)[0] == run("bfloat16", False)[0]
    if kind == "qwen3":  # the rotary + KV write inside decode attention, under PDL, in graphs
        assert run("float32", True, fuse_rope_attention=True)[0] == ref
    kernels.configure(ks.H200)
