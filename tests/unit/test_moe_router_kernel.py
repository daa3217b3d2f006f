"""The fused router kernel (kernels/moe_router.py) under Triton's interpreter against the torch path
of `select_experts` (kernel=False): softmax and sigmoid scoring, with and without renormalisation,
correction bias, group-limited top-k and a routed scaling factor, on random logits (no ties)."""
import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from meshserve.layers.moe import router as router_mod  # noqa: E402
from meshserve.layers.moe.router import RouterConfig, select_experts  # noqa: E402

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _check(logits, cfg, bias=None, ids_out=None):
    rw, rids = select_experts(logits, cfg, bias, kernel=False)
    w, ids = select_experts(logits, cfg, bias, ids_out=ids_out, kernel=True)
    assert w.dtype == torch.float32 and ids.dtype == torch.int64
    assert w.shape == ids.shape == (logits.shape[0], cfg.top_k)
    if ids_out is not None:
        assert ids.data_ptr() == ids_out.data_ptr()
    # the kernel's order: descending choice; compare as sets (sorted by id) for the unsorted sigmoid path
    order, rorder = ids.sort(-1)[1], rids.sort(-1)[1]
    assert torch.equal(ids.gather(1, order), rids.gather(1, rorder))
    torch.testing.assert_close(w.gather(1, order), rw.gather(1, rorder), rtol=2e-6, atol=1e-7)
    if cfg.scoring == "softmax" and cfg.n_group is None:
        assert torch.equal(ids, rids)  # torch.topk(sorted=True)'s order, too
    return w, ids


@pytest.mark.parametrize("T", [1, 7])  # up to 128 rows the kernel runs a program per row: 7 is several
@pytest.mark.parametrize("K", [1, 2, 8])
@pytest.mark.parametrize("E", [8, 60, 128])
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_router_kernel_matches_torch(scoring, E, K, T):
    g = torch.Generator().manual_seed(E * 1000 + K * 100 + T)
    logits = (torch.randn(T, E, generator=g) * 2).to(DEVICE)
    bias = (torch.randn(E, generator=g) * 0.1).to(DEVICE) if scoring == "sigmoid" else None
    for renorm in (True, False):
        cfg = RouterConfig(K, renormalize=renorm, scoring=scoring)
        w, ids = _check(logits, cfg, bias)
        if renorm and scoring == "softmax":
            torch.testing.assert_close(w.sum(-1), torch.ones(T, device=DEVICE))
    # descending weights (softmax; sigmoid: descending choice = score + bias)
    if scoring == "softmax":
        assert torch.all(w[:, :-1] >= w[:, 1:])


@pytest.mark.parametrize("cfg", [
    RouterConfig(8, scoring="sigmoid", n_group=8, topk_group=4, routed_scaling_factor=2.5),  # DeepSeek-V3
    RouterConfig(4, scoring="sigmoid", n_group=4, topk_group=2, renormalize=False),
    RouterConfig(6, scoring="softmax", n_group=8, topk_group=3, renormalize=False, routed_scaling_factor=16.0),
    RouterConfig(2, scoring="softmax", n_group=4, topk_group=1),
    RouterConfig(3, scoring="softmax", routed_scaling_factor=0.5),
], ids=str)
@pytest.mark.parametrize("E", [64, 256])
def test_router_kernel_groups_and_scaling(cfg, E):
    g = torch.Generator().manual_seed(E)
    logits = (torch.randn(9, E, generator=g) * 2).to(DEVICE)
    bias = (torch.randn(E, generator=g) * 0.1).to(DEVICE) if cfg.scoring == "sigmoid" else None
    cfg.check(E)
    w, ids = _check(logits, cfg, bias)
    if cfg.n_group:  # every id inside topk_group groups
        groups = ids // (E // cfg.n_group)
        assert all(len(set(r)) <= cfg.topk_group for r in groups.tolist())


def test_router_kernel_bf16_logits_and_ids_out():
    """bf16 logits (the gate linear's output) are upcast in the kernel; ids land in a table row slice."""
    g = torch.Generator().manual_seed(3)
    # distinct values, exact in bf16 (bf16 rounding of random logits makes ties)
    logits = (torch.stack([torch.randperm(128, generator=g) for _ in range(5)]) / 16 - 4).to(DEVICE, torch.bfloat16)
    table = torch.full((2, 8, 8), -7, dtype=torch.int64, device=DEVICE)
    _check(logits, RouterConfig(8), ids_out=table[1, :5])
    assert torch.all(table[0] == -7) and torch.all(table[1, 5:] == -7)
    assert torch.all((table[1, :5] >= 0) & (table[1, :5] < 128))


def test_router_kernel_switch_and_empty_batch(monkeypatch):
    logits = torch.randn(0, 16, device=DEVICE)
    w, ids = select_experts(logits, RouterConfig(2), kernel=True)
    assert w.shape == ids.shape == (0, 2)
    calls = []
    import meshserve.kernels.moe_router as mr
    real = mr.router_topk
    monkeypatch.setattr(mr, "router_topk", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(3, 16, device=DEVICE)
    select_experts(x, RouterConfig(2), kernel=False)
    assert calls == []
    monkeypatch.setattr(router_mod, "USE_KERNEL", True)
    select_experts(x, RouterConfig(2))
    assert calls == [1]
    monkeypatch.setattr(router_mod, "USE_KERNEL", None)
    select_experts(x, RouterConfig(2))
    assert calls == ([1, 1] if DEVICE.type == "cuda" else [1])  # CPU: only when asked


def test_fused_moe_layer_with_the_router_kernel(monkeypatch):
    """FusedMoE (VANILLA experts) gives the same output with the kernel router, and the expert-load
    table receives the kernel's ids."""
    from meshserve.layers.moe.layer import FusedMoE
    from meshserve.layers.moe.load import ExpertLoad
    g = torch.Generator().manual_seed(5)
    load = ExpertLoad([0], 16, 4, DEVICE)
    load.reserve(8)
    layer = FusedMoE(16, 32, 24, RouterConfig(4), backend="VANILLA", load=load).to(DEVICE)
    layer.w13.data.copy_(torch.randn(16, 48, 32, generator=g) / 6)
    layer.w2.data.copy_(torch.randn(16, 32, 24, generator=g) / 5)
    x, logits = torch.randn(6, 32, generator=g).to(DEVICE), torch.randn(6, 16, generator=g).to(DEVICE)
    monkeypatch.setattr(router_mod, "USE_KERNEL", False)
    ref = layer(x, logits)
    ref_ids = load.ids[0, :6].clone()
    load.ids.zero_()
    monkeypatch.setattr(router_mod, "USE_KERNEL", True)
    out = layer(x, logits)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(load.ids[0, :6], ref_ids)
