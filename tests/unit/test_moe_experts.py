"""The MoE expert backends (layers/moe/experts.py) against a float64 loop written here, independent of
VANILLA: random small shapes, -1 ids (another rank's experts), rows with no local assignment. TRITON
runs under Triton's interpreter on CPU (TRITON_INTERPRET=1, set before triton loads), CUTLASS through
torch._grouped_mm's CPU implementation. The CUDA-graph and full-size checks are in tests/gpu/test_moe_kernel.py."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from meshserve.layers.moe.experts import BACKENDS, auto_backend, create_experts  # noqa: E402

CPU = torch.device("cpu")


def make_case(T, E, K, H=64, I=32, drop=0.25, seed=0, dtype=torch.float32):
    """Inputs with duplicate-free top-k ids per row, about `drop` of them -1, and one row all -1."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=g)
    w13 = torch.randn(E, 2 * I, H, generator=g) / H ** 0.5
    w2 = torch.randn(E, H, I, generator=g) / I ** 0.5
    k = min(K, E)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    ids[torch.rand(T, k, generator=g) < drop] = -1
    if T > 2:
        ids[T // 2] = -1
    weights = torch.rand(T, k, generator=g)
    return hidden.to(dtype), w13.to(dtype), w2.to(dtype), weights, ids


def reference(hidden, w13, w2, weights, ids):
    """float64, one (token, k) at a time."""
    T, H = hidden.shape
    I = w13.shape[1] // 2
    x, a, b = hidden.double(), w13.double(), w2.double()
    out = torch.zeros(T, H, dtype=torch.float64)
    for t in range(T):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if e < 0:
                continue
            gate = a[e, :I] @ x[t]
            up = a[e, I:] @ x[t]
            h = gate * torch.sigmoid(gate) * up
            out[t] += float(weights[t, j]) * (b[e] @ h)
    return out


def assert_close(out, ref, rtol):
    assert out.shape == ref.shape
    scale = ref.abs().max().clamp_min(1e-6)
    err = (out.double() - ref).abs().max() / scale
    assert err <= rtol, f"max error {err:.3g} of max |ref| {scale:.3g}"


CASES = [(T, E, K) for T in (1, 5, 33) for E in (1, 4, 8) for K in (1, 2, 4) if K <= E]


@pytest.mark.parametrize("T,E,K", CASES)
def test_vanilla_matches_float64(T, E, K):
    args = make_case(T, E, K, seed=T * 100 + E * 10 + K)
    out = create_experts("VANILLA", CPU, torch.float32).apply(*args)
    assert out.dtype == torch.float32
    assert_close(out, reference(*args), 1e-5)
    if T > 2:
        assert torch.all(out[T // 2] == 0)


def test_vanilla_keeps_the_model_dtype():
    h, w13, w2, wt, ids = make_case(5, 4, 2, dtype=torch.bfloat16)
    out = create_experts("vanilla", CPU, torch.bfloat16).apply(h, w13, w2, wt, ids.int())
    assert out.dtype == torch.bfloat16
    assert_close(out, reference(h, w13, w2, wt, ids), 1e-2)


def test_empty_batch():
    h, w13, w2, wt, ids = make_case(1, 4, 2)
    out = create_experts("VANILLA", CPU, torch.float32).apply(h[:0], w13, w2, wt[:0], ids[:0])
    assert out.shape == (0, 64)


def test_auto_on_cpu_is_vanilla():
    assert auto_backend(CPU, torch.float32) == "VANILLA"
    assert create_experts("auto", CPU, torch.bfloat16).name == "VANILLA"
    assert create_experts("AUTO", "cpu", torch.float32).name == "VANILLA"


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match=r"moe_config.backend='cublas' is not supported; accepted: "
                                         r"auto, VANILLA, TRITON, CUTLASS"):
        create_experts("cublas", CPU, torch.float32)
    assert BACKENDS == ("VANILLA", "TRITON", "CUTLASS")


def test_triton_on_cpu_without_the_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"moe_config.backend='triton' cannot run here: it needs a CUDA device "
                                         r"\(this one is 'cpu'\) or a CPU with TRITON_INTERPRET=1.*accepted: auto, "
                                         r"VANILLA, TRITON, CUTLASS"):
        create_experts("triton", CPU, torch.float32)
