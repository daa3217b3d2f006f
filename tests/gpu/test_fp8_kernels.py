"""The FP8 block-scaled linear kernels (kernels/fp8_gemm.py) on the GPU in bf16 against a float64
product of the dequantised weights: the decode GEMV and the GEMM at the Llama-3.1-8B and
Qwen3-30B-A3B projection shapes, partial blocks, bias, capture in a CUDA graph, and the engine with
quantization="fp8" and the FP8 KV cache against its own bf16 run on the same checkpoint (first
greedy ids mostly equal), the FP8 KV write bit for bit. CPU coverage (fp32, the interpreter): tests/models/test_fp8.py."""
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("triton")

from meshserve.kernels.fp8 import dequantize, quantize  # noqa: E402
from meshserve.kernels.fp8_gemm import fp8_gemm, fp8_gemv, fp8_linear  # noqa: E402

SHAPES = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096), (2048, 5120), (4096, 2048), (576, 576)]


@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("m", [1, 3, 8, 64, 300])
def test_fp8_kernels_bf16(m, k, n):
    g = torch.Generator(device="cuda").manual_seed(m + n)
    w = torch.randn(n, k, device="cuda", generator=g) * 0.02
    x = torch.randn(m, k, device="cuda", generator=g).bfloat16()
    q, s = quantize(w, (128, 128))
    ref = x.double() @ dequantize(q, s, (128, 128), torch.float64).T
    for fn in ((fp8_gemv, fp8_gemm) if m <= 8 else (fp8_gemm,)):
        y = fn(x, q, s, (128, 128))
        err = ((y.double() - ref).norm() / ref.norm()).item()
        assert y.dtype == torch.bfloat16 and err < 1e-2, (fn.__name__, err)


def test_fp8_gemv_captures_in_a_cuda_graph():
    w = torch.randn(1024, 2048, device="cuda") * 0.02
    q, s = quantize(w, (128, 128))
    x = torch.randn(1, 2048, device="cuda").bfloat16()
    fp8_linear(x, q, s, (128, 128))  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = fp8_linear(x, q, s, (128, 128))
    x.copy_(torch.randn(1, 2048, device="cuda").bfloat16())
    graph.replay()
    ref = x.double() @ dequantize(q, s, (128, 128), torch.float64).T
    assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-2


@pytest.mark.parametrize("T", [1, 4, 64, 512])
def test_fp8_experts_bf16_qwen3_30b_shape(T):
    """The fused MoE kernels with FP8 experts at Qwen3-30B-A3B's shape (128 experts, 8 per token,
    H 2048, I 768) in bf16 against VANILLA's fp32 loop over the dequantised experts; T=1 also
    replayed from a CUDA graph on new routing."""
    from meshserve.kernels.moe import fused_experts
    from meshserve.layers.moe.experts import VanillaExperts
    E, H, I, K = 128, 2048, 768, 8
    g = torch.Generator(device="cuda").manual_seed(T)
    w13 = torch.randn(E, 2 * I, H, device="cuda", generator=g) * 0.02
    w2 = torch.randn(E, H, I, device="cuda", generator=g) * 0.02
    q13, s13 = map(torch.stack, zip(*(quantize(w, (128, 128)) for w in w13)))
    q2, s2 = map(torch.stack, zip(*(quantize(w, (128, 128)) for w in w2)))
    fp8 = (s13, s2, (128, 128))
    x = torch.randn(T, H, device="cuda", generator=g).bfloat16()
    weights, ids = torch.topk(torch.randn(T, E, device="cuda", generator=g).softmax(-1), K)
    ids = ids.int()
    ref = VanillaExperts("cuda", torch.float32).apply(x.float(), q13, q2, weights, ids, fp8=fp8).double()
    got = fused_experts(x, q13, q2, weights, ids, fp8=fp8)
    assert ((got.double() - ref).norm() / ref.norm()).item() < 2e-2
    if T == 1:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fused_experts(x, q13, q2, weights, ids, fp8=fp8)
        ids.copy_(torch.randperm(E, device="cuda")[:K].int()[None])
        graph.replay()
        ref = VanillaExperts("cuda", torch.float32).apply(x.float(), q13, q2, weights, ids, fp8=fp8).double()
        assert ((out.double() - ref).norm() / ref.norm()).item() < 2e-2


def test_fp8_kv_write_and_attention_on_the_gpu():
    """The KV write into an FP8 cache equals torch's cast bit for bit; attention over it (bf16 queries)
    equals the torch backend reading the same cache."""
    from meshserve.kernels.paged_attention import store_kv
    g = torch.Generator(device="cuda").manual_seed(0)
    k = torch.randn(256, 8, 128, device="cuda", generator=g) * 4
    v = torch.randn(256, 8, 128, device="cuda", generator=g)
    cache = torch.zeros(2, 64, 16, 8, 128, dtype=torch.float8_e4m3fn, device="cuda")
    slots = torch.randperm(64 * 16, device="cuda", generator=g)[:256]
    store_kv(k.bfloat16(), v.bfloat16(), cache, slots)
    for i, src in enumerate((k, v)):
        want = src.bfloat16().to(torch.float8_e4m3fn).view(torch.uint8)
        assert torch.equal(cache[i].view(-1, 8, 128)[slots].view(torch.uint8), want)


def test_engine_fp8_close_to_bf16(tmp_path):
    import sys
    sys.path.insert(0, "tests")
    from helpers import build_checkpoint, make_prompts
    from meshserve import LLM, SamplingParams
    build_checkpoint(str(tmp_path), "qwen3", hidden_size=256, intermediate_size=512, num_attention_heads=8,
                     num_key_value_heads=4, head_dim=32)
    prompts = make_prompts(6, 320, 40)
    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=0)
    runs = {}
    for name, kw in (("bf16", {}), ("fp8", {"quantization": "fp8"}),
                     ("fp8-kv", {"kv_cache_config": {"dtype": "fp8"}})):
        with LLM(str(tmp_path), dtype="bfloat16", show_progress=False, **kw) as llm:
            runs[name] = llm.generate(prompts, sp, use_tqdm=False)
    for name in ("fp8", "fp8-kv"):
        first = [(a.outputs[0].token_ids[0], b.outputs[0].token_ids[0]) for a, b in zip(runs["bf16"], runs[name])]
        assert sum(x == y for x, y in first) >= len(first) - 1, (name, first)
