"""The MoE expert backends on a GPU: TRITON (kernels/moe.py) and CUTLASS (torch._grouped_mm) in bf16
against VANILLA in fp32, eagerly over every row-block config of the table, and captured in a CUDA
graph at T=1 and T=64 and replayed on new hidden states and new routing (so nothing about the
routing may be baked in at capture: no host sync, no data-dependent shape). Small shapes and
Qwen3-30B-A3B's (H=2048, I=768, E=128, K=8). The CPU checks are in tests/unit/test_moe_experts.py."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from meshserve.layers.moe.experts import create_experts  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SMALL = dict(H=256, I=128, E=16, K=4)
QWEN3_30B_A3B = dict(H=2048, I=768, E=128, K=8)
BF16_TOL = 2e-2  # relative norm error of bf16 against fp32 (bf16 intermediate and per-assignment rows)


def hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


def backends():
    return ["TRITON", pytest.param("CUTLASS", marks=pytest.mark.skipif(not hopper(), reason="needs sm90+"))]


def weights(H, I, E, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    w13 = (torch.randn(E, 2 * I, H, device="cuda", generator=g) / H ** 0.5).to(dtype)
    w2 = (torch.randn(E, H, I, device="cuda", generator=g) / I ** 0.5).to(dtype)
    return w13, w2


def routing(T, E, K, drop=0.0, seed=0):
    """Distinct top-k ids per row from softmax scores (as a router gives them), renormalised weights,
    `drop` of the assignments set to -1 (another rank's experts)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    scores = torch.rand(T, E, device="cuda", generator=g).softmax(-1)
    w, ids = scores.topk(K, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    if drop:
        ids = torch.where(torch.rand(T, K, device="cuda", generator=g) < drop, -1, ids)
    return w.float(), ids


def rel_err(got, ref):
    return ((got.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("shape", [SMALL, QWEN3_30B_A3B], ids=["small", "qwen3-30b-a3b"])
@pytest.mark.parametrize("T", [1, 16, 200, 300, 600, 2048])
def test_bf16_matches_vanilla_fp32(backend, shape, T):
    H, I, E, K = shape["H"], shape["I"], shape["E"], shape["K"]
    w13, w2 = weights(H, I, E, torch.bfloat16)
    hidden = torch.randn(T, H, device="cuda").bfloat16()
    tw, ids = routing(T, E, K, drop=0.2, seed=T)
    ref = create_experts("VANILLA", torch.device("cuda"), torch.float32).apply(
        hidden.float(), w13.float(), w2.float(), tw, ids)
    got = create_experts(backend, torch.device("cuda"), torch.bfloat16).apply(hidden, w13, w2, tw, ids)
    assert got.dtype == torch.bfloat16 and got.shape == (T, H)
    assert rel_err(got, ref) < BF16_TOL


@pytest.mark.parametrize("T", [1, 33, 300])
def test_triton_fp32_is_exact(T):
    H, I, E, K = SMALL["H"], SMALL["I"], SMALL["E"], SMALL["K"]
    w13, w2 = weights(H, I, E, torch.float32)
    hidden = torch.randn(T, H, device="cuda")
    tw, ids = routing(T, E, K, drop=0.2, seed=T)
    ref = create_experts("VANILLA", torch.device("cuda"), torch.float32).apply(hidden, w13, w2, tw, ids)
    got = create_experts("TRITON", torch.device("cuda"), torch.float32).apply(hidden, w13, w2, tw, ids)
    assert rel_err(got, ref) < 1e-5


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("shape", [SMALL, QWEN3_30B_A3B], ids=["small", "qwen3-30b-a3b"])
@pytest.mark.parametrize("T", [1, 64])
@pytest.mark.parametrize("drop", [0.0, 0.3])
def test_cuda_graph_capture_and_replay_on_new_routing(backend, shape, T, drop):
    H, I, E, K = shape["H"], shape["I"], shape["E"], shape["K"]
    dev = torch.device("cuda")
    w13, w2 = weights(H, I, E, torch.bfloat16)
    experts = create_experts(backend, dev, torch.bfloat16)
    hidden = torch.randn(T, H, device=dev).bfloat16()
    tw, ids = routing(T, E, K, drop=drop, seed=1)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up: Triton compiles, allocators settle
        for _ in range(2):
            experts.apply(hidden, w13, w2, tw, ids)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = experts.apply(hidden, w13, w2, tw, ids)
    vanilla = create_experts("VANILLA", dev, torch.float32)
    for seed in (2, 3, 4):  # new inputs in place, replay, against the reference on those inputs
        hidden.copy_(torch.randn(T, H, device=dev).bfloat16())
        new_w, new_ids = routing(T, E, K, drop=drop, seed=seed)
        tw.copy_(new_w)
        ids.copy_(new_ids)
        graph.replay()
        torch.cuda.synchronize()
        ref = vanilla.apply(hidden.float(), w13.float(), w2.float(), tw, ids)
        assert rel_err(out, ref) < BF16_TOL, seed
        if drop:
            none_local = (ids < 0).all(-1)
            assert torch.all(out[none_local] == 0)
