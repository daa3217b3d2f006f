"""The RMSNorm + skinny GEMM fusion (kernels/gemv.py norm_gemv) under Triton's interpreter on CPU:
against the unfused torch ops in float64 (residual add, RMSNorm as HF computes it, the product), with
and without a residual, bias and the normed output; with the router epilogue against the torch router
(`select_experts(kernel=False)` on the same logits), softmax and sigmoid, grouped, with ids written
into an expert-load table; the counter is back to 0 after each launch. The GPU version, where the
last-program handshake really runs concurrently: tests/gpu/test_norm_gemv.py."""
import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")

from meshserve.layers.moe.router import RouterConfig, select_experts  # noqa: E402


def _ref(x, res, nw, eps, w, b):
    s = x.double() + (res.double() if res is not None else 0)
    h = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps) * nw.double()
    y = h @ w.double().T + (b.double() if b is not None else 0)
    return y, s, h


@pytest.mark.parametrize("k,n", [(64, 16), (100, 7), (256, 130)])
@pytest.mark.parametrize("has_res", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_norm_gemv_matches_float64(k, n, has_res, bias):
    from meshserve.kernels.gemv import norm_gemv
    g = torch.Generator().manual_seed(k * 10 + n)
    x, res = torch.randn(1, k, generator=g) * 3, torch.randn(1, k, generator=g)
    nw, w = torch.rand(k, generator=g) + 0.5, torch.randn(n, k, generator=g) / k ** 0.5
    b = torch.randn(n, generator=g) if bias else None
    res_before = res.clone()
    y, s, h = norm_gemv(x, res if has_res else None, nw, 1e-6, w, b, want_h=True)
    ry, rs, rh = _ref(x, res if has_res else None, nw, 1e-6, w, b)
    assert y.shape == (1, n) and s.shape == h.shape == (1, k)
    torch.testing.assert_close(y.double(), ry, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s.double(), rs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(h.double(), rh, rtol=1e-5, atol=1e-5)
    assert torch.equal(res, res_before)  # the residual is not written in place
    y2, _, none = norm_gemv(x, res if has_res else None, nw, 1e-6, w, b)
    assert none is None and torch.equal(y2, y)


@pytest.mark.parametrize("cfg,e", [
    (RouterConfig(8, renormalize=True), 128),
    (RouterConfig(2, renormalize=False), 60),
    (RouterConfig(4, renormalize=True, scoring="sigmoid", n_group=4, topk_group=2, routed_scaling_factor=2.5), 64),
])
def test_norm_gemv_route_matches_torch_router(cfg, e):
    from meshserve.kernels.gemv import norm_gemv
    from meshserve.kernels.moe_router import route_constexprs
    k = 96
    g = torch.Generator().manual_seed(e)
    x, res = torch.randn(1, k, generator=g), torch.randn(1, k, generator=g)
    nw, w = torch.rand(k, generator=g) + 0.5, torch.randn(e, k, generator=g) / k ** 0.5
    bias = torch.randn(e, generator=g) * 0.1 if cfg.scoring == "sigmoid" else None
    counter = torch.zeros(1, dtype=torch.int32)
    meta = route_constexprs(e, cfg.top_k, sigmoid=cfg.scoring == "sigmoid", renormalize=cfg.renormalize,
                            has_bias=bias is not None, n_group=cfg.n_group, topk_group=cfg.topk_group,
                            scale=cfg.routed_scaling_factor)
    table = torch.full((5, cfg.top_k), -1, dtype=torch.int64)
    for step in range(2):
        (rw, ids), s, h = norm_gemv(x, res, nw, 1e-6, w, None, want_h=True,
                                    route=(counter, meta, bias, cfg.routed_scaling_factor, table[step:step + 1]))
        assert int(counter) == 0
        logits, _, rh = _ref(x, res, nw, 1e-6, w, None)
        ref_w, ref_ids = select_experts(logits.float(), cfg, bias, kernel=False)
        order, rorder = ids.sort(-1)[1], ref_ids.sort(-1)[1]
        assert torch.equal(ids.gather(1, order), ref_ids.gather(1, rorder))
        torch.testing.assert_close(rw.gather(1, order), ref_w.gather(1, rorder), rtol=1e-5, atol=1e-6)
        assert ids.data_ptr() == table[step:step + 1].data_ptr()
        torch.testing.assert_close(h.double(), rh, rtol=1e-5, atol=1e-5)
    assert (table[2:] == -1).all() and torch.equal(table[0], table[1])
