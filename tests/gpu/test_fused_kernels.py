"""Fused Triton kernels against their torch references (layers/), fresh random inputs; on a GPU in
fp32 and bf16, on CPU under Triton's interpreter (fp32)."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from meshserve.kernels import fused  # noqa: E402
from meshserve.layers.activation import silu_and_mul  # noqa: E402
from meshserve.layers.norm import RMSNorm  # noqa: E402
from meshserve.layers.rotary import RotaryEmbedding  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def close(got, ref, dtype):
    err = (got.double().cpu() - ref.double().cpu()).norm() / ref.double().norm()
    assert err < TOL[dtype], f"relative error {err:.2e}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [64, 576, 4096])
def test_rmsnorm_with_and_without_residual(dtype, n):
    g = torch.Generator().manual_seed(n)
    x, r = (torch.randn(7, n, generator=g).to(dtype) for _ in range(2))
    norm = RMSNorm(n, 1e-5, dtype)
    norm.weight.data = torch.rand(n, generator=g).to(dtype) + 0.5
    ref = norm(x.clone())  # torch path on CPU
    ref2, ref_res = norm(x.clone(), r.clone())
    w = norm.weight.to(DEVICE)
    close(fused.rms_norm(x.to(DEVICE), w, 1e-5), ref, dtype)
    res = r.to(DEVICE).clone()
    out, res = fused.rms_norm(x.to(DEVICE), w, 1e-5, res)
    close(out, ref2, dtype)
    close(res, ref_res, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv,dim,partial", [(8, 2, 64, 1.0), (9, 3, 64, 1.0), (4, 4, 96, 0.5)])
def test_rotary_in_place_on_strided_views(dtype, heads, kv, dim, partial):
    g = torch.Generator().manual_seed(heads)
    rope = RotaryEmbedding(dim, 512, {"rope_type": "default", "rope_theta": 10000.0}, partial)
    T = 11
    qkv = torch.randn(T, (heads + 2 * kv) * dim, generator=g).to(dtype)
    pos = torch.randint(0, 512, (T,), generator=g)
    q = qkv[:, :heads * dim].reshape(T, heads, dim)
    k = qkv[:, heads * dim:(heads + kv) * dim].reshape(T, kv, dim)
    ref_q, ref_k = rope(pos, q.clone(), k.clone())
    dqkv = qkv.to(DEVICE)
    dq = dqkv[:, :heads * dim].reshape(T, heads, dim)
    dk = dqkv[:, heads * dim:(heads + kv) * dim].reshape(T, kv, dim)
    fused.rotary_(dq, dk, pos.to(DEVICE), rope.cos_cache.to(DEVICE), rope.sin_cache.to(DEVICE))
    close(dq, ref_q, dtype)
    close(dk, ref_k, dtype)
    close(dqkv[:, (heads + kv) * dim:], qkv[:, (heads + kv) * dim:], dtype)  # v untouched


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(dtype):
    x = torch.randn(5, 2 * 1536, generator=torch.Generator().manual_seed(1)).to(dtype)
    close(fused.silu_and_mul(x.to(DEVICE)), silu_and_mul(x), dtype)
