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
@pytest.mark.parametrize("heads,kv,dim,partial", [(8, 2, 64, 1.0), (9, 3, 64, 1.0), (4, 4, 96, 0.5), (6, 1, 80, 1.0)])
def test_rotary_store_kv_matches_rotary_then_write(dtype, heads, kv, dim, partial):
    """The fused rotary + KV-cache write against the torch rotary and write_kv (layers/): q rotated
    in place, rotated k and plain v in the cache at the token's slots, k left as it was, and the
    cache's other slots untouched."""
    from meshserve.layers.attention import write_kv

    g = torch.Generator().manual_seed(heads * 31 + dim)
    rope = RotaryEmbedding(dim, 512, {"rope_type": "default", "rope_theta": 10000.0}, partial)
    T, num_blocks, block = 9, 6, 4
    qkv = torch.randn(T, (heads + 3 * kv) * dim, generator=g).to(dtype)  # a wider row: strided views
    pos = torch.randint(0, 512, (T,), generator=g)
    slots = torch.randperm(num_blocks * block, generator=g)[:T]
    cache = torch.randn(2, num_blocks, block, kv, dim, generator=g).to(dtype)

    def views(t):
        return (t[:, :heads * dim].reshape(T, heads, dim), t[:, heads * dim:(heads + kv) * dim].reshape(T, kv, dim),
                t[:, (heads + kv) * dim:(heads + 2 * kv) * dim].reshape(T, kv, dim))

    q, k, v = views(qkv)
    ref_q, ref_k = rope(pos, q.clone(), k.clone())
    ref_cache = cache.clone()
    write_kv(ref_cache, ref_k, v, slots)
    dqkv = qkv.to(DEVICE)
    dq, dk, dv = views(dqkv)
    dcache = cache.to(DEVICE)
    fused.rotary_store_kv(dq, dk, dv, pos.to(DEVICE), rope.cos_cache.to(DEVICE), rope.sin_cache.to(DEVICE), dcache,
                          slots.to(DEVICE))
    close(dq, ref_q, dtype)
    assert torch.equal(dk.cpu(), k)  # k itself is not rotated in place
    close(dcache, ref_cache, dtype)
    untouched = torch.ones(num_blocks * block, dtype=torch.bool)
    untouched[slots] = False
    flat = dcache.cpu().view(2, num_blocks * block, kv, dim)
    assert torch.equal(flat[:, untouched], cache.view(2, num_blocks * block, kv, dim)[:, untouched])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv,dim", [(8, 2, 64), (9, 3, 64), (32, 4, 128)])
def test_rotary_store_kv_with_qk_norm(dtype, heads, kv, dim):
    """Qwen3's per-head q/k RMSNorm fused into the rotary + KV write, against RMSNorm (torch path),
    the torch rotary and write_kv: q normalised and rotated in place, k's cache rows likewise."""
    from meshserve.layers.attention import write_kv

    g = torch.Generator().manual_seed(heads + dim)
    rope = RotaryEmbedding(dim, 512, {"rope_type": "default", "rope_theta": 1e6}, 1.0)
    qn, kn = RMSNorm(dim, 1e-6, dtype), RMSNorm(dim, 1e-6, dtype)
    qn.weight.data = (torch.rand(dim, generator=g) + 0.5).to(dtype)
    kn.weight.data = (torch.rand(dim, generator=g) + 0.5).to(dtype)
    T, num_blocks, block = 7, 4, 4
    qkv = (torch.randn(T, (heads + 2 * kv) * dim, generator=g) * 3).to(dtype)
    pos = torch.randint(0, 512, (T,), generator=g)
    slots = torch.randperm(num_blocks * block, generator=g)[:T]
    cache = torch.randn(2, num_blocks, block, kv, dim, generator=g).to(dtype)

    def views(t):
        return (t[:, :heads * dim].reshape(T, heads, dim), t[:, heads * dim:(heads + kv) * dim].reshape(T, kv, dim),
                t[:, (heads + kv) * dim:].reshape(T, kv, dim))

    q, k, v = views(qkv)
    ref_q, ref_k = rope(pos, qn(q.clone()), kn(k.clone()))
    ref_cache = cache.clone()
    write_kv(ref_cache, ref_k, v, slots)
    dqkv = qkv.to(DEVICE)
    dq, dk, dv = views(dqkv)
    dcache = cache.to(DEVICE)
    fused.rotary_store_kv(dq, dk, dv, pos.to(DEVICE), rope.cos_cache.to(DEVICE), rope.sin_cache.to(DEVICE), dcache,
                          slots.to(DEVICE), (qn.weight.to(DEVICE), kn.weight.to(DEVICE), 1e-6))
    close(dq, ref_q, dtype)
    close(dcache, ref_cache, dtype)
    if dtype == torch.float32:
        torch.testing.assert_close(dq.cpu(), ref_q, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dcache.cpu(), ref_cache, rtol=1e-5, atol=1e-5)



@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(dtype):
    x = torch.randn(5, 2 * 1536, generator=torch.Generator().manual_seed(1)).to(dtype)
    close(fused.silu_and_mul(x.to(DEVICE)), silu_and_mul(x), dtype)


def test_rotary_module_moves_between_devices_and_dtypes():
    """nn.Module.to() goes through Module._apply: the rotary module must not shadow it (it did,
    with its own `_apply(x, cos, sin)`, so `.to(...)` of it or of any module holding it raised)."""
    rope = RotaryEmbedding(64, 32, {"rope_type": "default", "rope_theta": 10000.0})
    moved = torch.nn.ModuleList([rope]).to(DEVICE).to(torch.float64)
    assert moved[0].cos_cache.device.type == DEVICE and moved[0].cos_cache.dtype == torch.float64


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,vocab", [(1, 128256), (3, 5000), (2, 4096), (5, 37)])
def test_argmax_rows_matches_torch_argmax_with_ties(dtype, rows, vocab):
    """First index of the maximum, as torch.argmax: ties inside a block, across blocks, and at the
    last element of a ragged vocabulary."""
    g = torch.Generator().manual_seed(rows * vocab)
    x = torch.randn(rows, vocab, generator=g).to(dtype)
    top = x.max() + 1
    x[0, vocab - 1] = top  # the ragged tail
    if rows > 1:
        x[1, vocab // 2] = x[1, vocab - 1] = x[1, 3] = top  # first of three, in different blocks
    if rows > 2:
        x[2] = 0.0  # all equal: index 0
    got = fused.argmax_rows(x.to(DEVICE)).cpu()
    assert got.dtype == torch.int64 and torch.equal(got, x.float().argmax(dim=-1))
    if rows > 1:
        assert got[1] == 3
