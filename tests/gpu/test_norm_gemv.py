"""The norm + skinny GEMM fusion (kernels/gemv.py norm_gemv) on the GPU, bf16, the MoE models' shapes:

- against the unfused kernels (kernels/fused.py rms_norm with the residual, then gemv): the new
  residual bitwise, the normed row and the product within bf16 rounding;
- the router epilogue, where programs really finish concurrently: inside a CUDA graph replayed on 200
  fresh inputs (PDL on and off), the (weights, ids) the last program computes equal router_topk on
  the logits of the same kernel without the epilogue (ids bitwise, weights to fp32 rounding), and the
  counter is 0 after each.
"""
import dataclasses

import pytest
import torch

pytest.importorskip("triton")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")]

from meshserve import kernels  # noqa: E402
from meshserve.kernels import settings as ks  # noqa: E402


@pytest.mark.parametrize("k,n", [(2048, 5120), (2048, 128), (4096, 6144), (576, 3072)])
def test_norm_gemv_equals_unfused_kernels(k, n):
    from meshserve.kernels.fused import rms_norm
    from meshserve.kernels.gemv import gemv, norm_gemv
    g = torch.Generator(device="cuda").manual_seed(k + n)
    x = torch.randn(1, k, device="cuda", generator=g, dtype=torch.bfloat16) * 4
    res = torch.randn(1, k, device="cuda", generator=g, dtype=torch.bfloat16)
    nw = torch.rand(k, device="cuda", generator=g, dtype=torch.bfloat16) + 0.5
    w = torch.randn(n, k, device="cuda", generator=g, dtype=torch.bfloat16) / k ** 0.5
    y, s, h = norm_gemv(x, res.clone(), nw, 1e-6, w, want_h=True)
    res2 = res.clone()
    rh, rs = rms_norm(x, nw, 1e-6, residual=res2)
    assert torch.equal(s, rs)
    torch.testing.assert_close(h, rh, rtol=1e-2, atol=1e-2)
    assert (h != rh).float().mean() < 0.01  # a rare last-bit difference of the fp32 reductions
    torch.testing.assert_close(y.float(), gemv(h, w).float(), rtol=1e-2, atol=1e-3)  # the product of the same h
    torch.testing.assert_close(y.float(), gemv(rh, w).float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("pdl", [False, True])
@pytest.mark.parametrize("e,top_k,sigmoid", [(128, 8, False), (64, 6, True), (8, 2, False)])
def test_routed_norm_gemv_in_a_graph(pdl, e, top_k, sigmoid):
    if pdl and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("PDL needs compute capability 9.0+")
    from meshserve.kernels.gemv import norm_gemv
    from meshserve.kernels.moe_router import route_constexprs, router_topk
    kernels.configure(dataclasses.replace(ks.H200, pdl=pdl))
    try:
        k = 2048
        g = torch.Generator(device="cuda").manual_seed(e)
        nw = torch.rand(k, device="cuda", generator=g, dtype=torch.bfloat16) + 0.5
        w = torch.randn(e, k, device="cuda", generator=g, dtype=torch.bfloat16) / k ** 0.5
        bias = torch.randn(e, device="cuda", generator=g) * 0.1 if sigmoid else None
        groups = dict(n_group=8, topk_group=4) if sigmoid else dict(n_group=None, topk_group=None)
        meta = route_constexprs(e, top_k, sigmoid=sigmoid, renormalize=True, has_bias=sigmoid, scale=2.5 if sigmoid else 1.0,
                                **groups)
        counter = torch.zeros(1, dtype=torch.int32, device="cuda")
        table = torch.zeros(1, top_k, dtype=torch.int64, device="cuda")
        x = torch.randn(1, k, device="cuda", generator=g, dtype=torch.bfloat16)
        res = torch.randn(1, k, device="cuda", generator=g, dtype=torch.bfloat16)

        def step():
            (rw, ids), _, h = norm_gemv(x, res, nw, 1e-6, w, want_h=True,
                                        route=(counter, meta, bias, 2.5 if sigmoid else 1.0, table))
            logits, _, _ = norm_gemv(x, res, nw, 1e-6, w)
            return rw, ids, logits

        step()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            rw, ids, logits = step()
        for i in range(200):
            x.copy_(torch.randn(1, k, device="cuda", generator=g, dtype=torch.bfloat16))
            res.copy_(torch.randn(1, k, device="cuda", generator=g, dtype=torch.bfloat16))
            graph.replay()
            ref_w, ref_ids = router_topk(logits, top_k, sigmoid=sigmoid, renormalize=True, bias=bias,
                                         scale=2.5 if sigmoid else 1.0, **groups)
            assert torch.equal(ids, ref_ids), i
            # the same logits; the weights' sums reduce over other warp counts (last-bit differences)
            torch.testing.assert_close(rw, ref_w, rtol=1e-6, atol=1e-7), i
            assert ids.data_ptr() == table.data_ptr()
        assert int(counter.item()) == 0
    finally:
        kernels.configure(ks.H200)
