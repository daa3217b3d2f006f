"""The skinny-GEMM kernel (kernels/gemv.py) against a float64 torch product on fresh random
inputs: every row count it serves, K divisible by the tile or not, with and without bias, several
tile configurations. On a GPU in bf16 and fp32; on CPU under Triton's interpreter (fp32)."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from meshserve.kernels.gemv import gemv, use_gemv  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", [(1, 96, 256), (1, 37, 200), (2, 64, 512), (3, 50, 130), (4, 128, 1024)])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_matches_float64(dtype, m, n, k, bias):
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = torch.randn(n, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    ref = x.double() @ w.double().T + (b.double() if bias else 0)
    got = gemv(x.to(DEVICE), w.to(DEVICE), b.to(DEVICE) if bias else None)
    assert got.shape == (m, n) and got.dtype == dtype
    err = (got.double().cpu() - ref).norm() / ref.norm()
    assert err < TOL[dtype], f"relative error {err:.2e}"


@pytest.mark.parametrize("config", [(1, 64, 2), (2, 128, 4), (8, 256, 4), (16, 64, 8)])
def test_gemv_tile_configs(config):
    g = torch.Generator().manual_seed(7)
    x, w = torch.randn(1, 300, generator=g), torch.randn(70, 300, generator=g)
    got = gemv(x.to(DEVICE), w.to(DEVICE), config=config).cpu()
    ref = x.double() @ w.double().T
    assert (got.double() - ref).norm() / ref.norm() < 1e-5


def test_use_gemv_only_for_few_half_precision_rows_on_cuda():
    w = torch.empty(8, 16, dtype=torch.bfloat16)
    assert not use_gemv(torch.empty(1, 16, dtype=torch.bfloat16), w)  # CPU tensors: never
    if DEVICE == "cuda":
        wc = w.cuda()
        assert use_gemv(torch.empty(1, 16, dtype=torch.bfloat16, device="cuda"), wc)
        assert not use_gemv(torch.empty(64, 16, dtype=torch.bfloat16, device="cuda"), wc)
        assert not use_gemv(torch.empty(1, 16, dtype=torch.float32, device="cuda"), wc.float())
        big = torch.empty(1, 1, dtype=torch.bfloat16, device="cuda").expand(65 * 2**20, 1)
        assert not use_gemv(torch.empty(1, 1, dtype=torch.bfloat16, device="cuda"), big)

