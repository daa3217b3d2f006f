"""The skinny-GEMM kernel (kernels/gemv.py) under Triton's interpreter on CPU, against a float64
product: one K tile, several (its first tile is peeled for PDL's early weight loads), K not a
multiple of the tile, several rows, with and without bias. The GPU version: tests/gpu/test_gemv_kernel.py."""
import pytest
import torch

pytest.importorskip("triton")
from meshserve.kernels.gemv import gemv  # noqa: E402


@pytest.mark.parametrize("m,k,n,config", [
    (1, 64, 16, (4, 64, 4)),  # one K tile
    (1, 64, 16, (4, 16, 4)),  # four
    (3, 100, 10, (4, 32, 4)),  # K not a multiple of the tile, rows not a power of two
    (2, 30, 5, (2, 64, 4)),  # K smaller than the tile
])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_matches_float64(m, k, n, config, bias):
    g = torch.Generator().manual_seed(m * 1000 + k + n)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    y = gemv(x, w, b, config=config)
    ref = x.double() @ w.double().T + (b.double() if bias else 0)
    assert y.shape == (m, n) and y.dtype == x.dtype
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
