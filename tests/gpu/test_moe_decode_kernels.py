"""The MoE decode kernels on a GPU: the fused router (kernels/moe_router.py) against select_experts'
torch path, also captured in a CUDA graph writing into the expert-load table; the one-program
alignment (_align_small_kernel) against the multi-program one; the two-kernel decode path
(MoeKernelConfig.down_sum) in bf16 at Qwen3-30B-A3B's shape against VANILLA fp32 and against the
four-kernel path, captured and replayed on new routing; a tuned config file picked up by
fused_experts through $MESHSERVE_MOE_CONFIG_DIR. CPU versions: tests/unit/test_moe_router_kernel.py,
test_moe_experts.py, test_moe_config_files.py."""
import json

import pytest
import torch

pytest.importorskip("triton")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from meshserve.layers.moe.experts import create_experts  # noqa: E402
from meshserve.layers.moe.router import RouterConfig, select_experts  # noqa: E402

QWEN = dict(H=2048, I=768, E=128, K=8)
BF16_TOL = 2e-2


def rel_err(got, ref):
    return ((got.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("T", [1, 7, 33, 300])
@pytest.mark.parametrize("E,K", [(8, 2), (60, 4), (128, 8), (256, 8)])
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_router_kernel_matches_torch(scoring, E, K, T):
    g = torch.Generator(device="cuda").manual_seed(T * E + K)
    logits = torch.randn(T, E, device="cuda", generator=g) * 2
    bias = torch.randn(E, device="cuda", generator=g) * 0.1 if scoring == "sigmoid" else None
    cfgs = [RouterConfig(K, scoring=scoring), RouterConfig(K, renormalize=False, scoring=scoring,
                                                          routed_scaling_factor=2.5)]
    if E % 8 == 0 and K <= E // 2:
        cfgs.append(RouterConfig(K, scoring=scoring, n_group=8, topk_group=4))
    for cfg in cfgs:
        rw, rids = select_experts(logits, cfg, bias, kernel=False)
        w, ids = select_experts(logits, cfg, bias, kernel=True)
        order, rorder = ids.sort(-1)[1], rids.sort(-1)[1]
        assert torch.equal(ids.gather(1, order), rids.gather(1, rorder)), cfg
        torch.testing.assert_close(w.gather(1, order), rw.gather(1, rorder), rtol=1e-5, atol=1e-6)


def test_router_kernel_in_a_cuda_graph_writes_the_load_table():
    table = torch.zeros(3, 4, 8, dtype=torch.int64, device="cuda")
    logits = torch.randn(4, 128, device="cuda").bfloat16()
    cfg = RouterConfig(8)
    select_experts(logits, cfg, ids_out=table[1], kernel=True)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        w, ids = select_experts(logits, cfg, ids_out=table[1], kernel=True)
    for seed in (1, 2):
        logits.copy_(torch.randn(4, 128, device="cuda", generator=torch.Generator(device="cuda").manual_seed(seed)))
        graph.replay()
        rw, rids = select_experts(logits, cfg, kernel=False)
        assert torch.equal(table[1], ids) and torch.equal(ids.sort(-1)[0], rids.sort(-1)[0])
        torch.testing.assert_close(w.sort(-1)[0], rw.sort(-1)[0], rtol=1e-5, atol=1e-6)
    assert torch.all(table[0] == 0) and torch.all(table[2] == 0)


@pytest.mark.parametrize("n", [1, 8, 16, 33, 64, 100, 256])
@pytest.mark.parametrize("block_m", [16, 64])
def test_small_alignment_matches_multi_program(n, block_m):
    from meshserve.kernels.moe_align import align_block_size
    ids = torch.randint(-1, 128, (n, 1), device="cuda", generator=torch.Generator(device="cuda").manual_seed(n))
    a = align_block_size(ids, 128, block_m)
    b = align_block_size(ids, 128, block_m, small_max=0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def _qwen_inputs(T, drop, seed):
    H, E, K = QWEN["H"], QWEN["E"], QWEN["K"]
    g = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn(T, H, device="cuda", generator=g).bfloat16()
    w, ids = torch.rand(T, E, device="cuda", generator=g).softmax(-1).topk(K, -1)
    if drop:
        ids = torch.where(torch.rand(T, K, device="cuda", generator=g) < drop, -1, ids)
    return hidden, (w / w.sum(-1, keepdim=True)).float(), ids


@pytest.fixture(scope="module")
def qwen_weights():
    H, I, E = QWEN["H"], QWEN["I"], QWEN["E"]
    g = torch.Generator(device="cuda").manual_seed(0)
    w13 = (torch.randn(E, 2 * I, H, device="cuda", generator=g) / H ** 0.5).bfloat16()
    w2 = (torch.randn(E, H, I, device="cuda", generator=g) / I ** 0.5).bfloat16()
    return w13, w2


def _configs():
    from meshserve.kernels.moe import GemmConfig, MoeKernelConfig
    base = MoeKernelConfig(16, GemmConfig(32, 128, 1, 4, 4), GemmConfig(64, 128, 1, 4, 4))
    out = {"four": base}
    for bn, bk, w in [(8, 128, 4), (4, 256, 4), (8, 256, 8), (2, 256, 2)]:
        out[f"two-{bn}x{bk}w{w}"] = MoeKernelConfig(16, base.gate_up, base.down, down_sum=GemmConfig(bn, bk, 1, w, 1))
    for bn, bk, w in [(2, 1024, 4), (4, 512, 4), (8, 2048, 8), (16, 256, 4)]:  # the gated product as GEMVs
        out[f"gemv-{bn}x{bk}w{w}"] = MoeKernelConfig(16, base.gate_up, base.down, down_sum=GemmConfig(2, 256, 1, 2, 1),
                                                     gate_up_gemv=GemmConfig(bn, bk, 1, w, 1))
    return out


@pytest.mark.parametrize("T", [1, 2, 4, 8])
@pytest.mark.parametrize("drop", [0.0, 0.3])
def test_two_kernel_path_bf16(qwen_weights, T, drop):
    from meshserve.kernels.moe import fused_experts
    w13, w2 = qwen_weights
    hidden, tw, ids = _qwen_inputs(T, drop, T)
    ref = create_experts("VANILLA", torch.device("cuda"), torch.float32).apply(
        hidden.float(), w13.float(), w2.float(), tw, ids)
    four = None
    for name, cfg in _configs().items():
        got = fused_experts(hidden, w13, w2, tw, ids, configs=cfg)
        assert rel_err(got, ref) < BF16_TOL, name
        if name == "four":
            four = got
        else:  # fp32 sum over k instead of bf16 rows: at least as close to fp32
            assert rel_err(got, ref) <= rel_err(four, ref) * 1.25 + 1e-4, name


@pytest.mark.parametrize("name", ["two-8x128w4", "gemv-4x512w4"])
@pytest.mark.parametrize("T", [1, 4])
def test_two_kernel_path_cuda_graph_on_new_routing(qwen_weights, T, name):
    from meshserve.kernels.moe import fused_experts
    w13, w2 = qwen_weights
    cfg = _configs()[name]
    hidden, tw, ids = _qwen_inputs(T, 0.2, 1)
    fused_experts(hidden, w13, w2, tw, ids, configs=cfg)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_experts(hidden, w13, w2, tw, ids, configs=cfg)
    vanilla = create_experts("VANILLA", torch.device("cuda"), torch.float32)
    for seed in (2, 3, 4):
        h2, w_2, ids2 = _qwen_inputs(T, 0.2, seed)
        hidden.copy_(h2)
        tw.copy_(w_2)
        ids.copy_(ids2)
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(out, vanilla.apply(hidden.float(), w13.float(), w2.float(), tw, ids)) < BF16_TOL, seed


def test_config_file_is_picked_up(tmp_path, monkeypatch, qwen_weights):
    from meshserve.kernels import moe, moe_config
    monkeypatch.setattr(moe_config, "_FOUND", {})
    name = moe.config_file_name(128, 2048, 768, torch.bfloat16, torch.cuda.get_device_name())
    cfg = moe.MoeKernelConfig(32, moe.GemmConfig(64, 64, 1, 4, 3), moe.GemmConfig(64, 64, 1, 4, 3))
    (tmp_path / name).write_text(json.dumps({"K": 8, "configs": {"4": moe.config_to_dict(cfg)}}))
    monkeypatch.setenv(moe.CONFIG_DIR_ENV, str(tmp_path))
    assert moe.default_config(4, 8, 128, 2048, 768, torch.bfloat16, torch.cuda.get_device_name()) == cfg
    w13, w2 = qwen_weights
    hidden, tw, ids = _qwen_inputs(4, 0.0, 5)
    ref = create_experts("VANILLA", torch.device("cuda"), torch.float32).apply(
        hidden.float(), w13.float(), w2.float(), tw, ids)
    assert rel_err(moe.fused_experts(hidden, w13, w2, tw, ids), ref) < BF16_TOL
