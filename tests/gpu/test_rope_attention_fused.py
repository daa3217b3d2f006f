"""paged_attention(rope=...) (kernel_config.fuse_rope_attention): decode tiles that rotate q (and
apply Qwen3's q/k norm) and write the new token's k / v themselves, against the separate kernels
they replace (kernels/fused.py rotary_store_kv, then paged_attention) and against the torch path
(layers/: RMSNorm, RotaryEmbedding, write_kv, torch_paged_attention): outputs and every cache slot.
On CPU under Triton's interpreter (fp32), on a GPU in fp32 and bf16."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from test_paged_attention_kernel import DEVICE, make_batch, to  # noqa: E402
from meshserve.kernels import paged_attention as pa  # noqa: E402
from meshserve.kernels.fused import rotary_store_kv  # noqa: E402
from meshserve.layers.attention import torch_paged_attention, write_kv  # noqa: E402
from meshserve.layers.norm import RMSNorm  # noqa: E402
from meshserve.layers.rotary import RotaryEmbedding  # noqa: E402

DTYPES = [torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])

CASES = [
    # (cached context lens, heads, kv heads, head_dim, page, splits, qk_norm, partial rotary, block_n, split_tiles,
    #  sliding window)
    ([7, 33, 64, 129], 8, 2, 64, 16, 1, True, 1.0, 16, 1, None),
    ([300, 5, 77], 16, 4, 128, 32, 4, True, 1.0, 32, 1, None),  # splits: the last one writes the new token
    ([40, 18], 4, 1, 64, 16, 3, False, 0.5, 16, 1, None),       # MQA, half the dims rotated, no norm
    ([95], 6, 3, 32, 8, 2, False, 1.0, 16, 2, None),
    ([150, 20], 8, 2, 64, 16, 3, True, 1.0, 16, 1, 48),         # a sliding window over split KV
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ctx,heads,kvh,dim,page,splits,norm,partial,block_n,split_tiles,window", CASES)
def test_fused_rope_decode_equals_the_separate_kernels(dtype, ctx, heads, kvh, dim, page, splits, norm, partial,
                                                       block_n, split_tiles, window):
    q, k, v, cache, md = make_batch([1] * len(ctx), ctx, heads, kvh, dim, page, dtype, seed=sum(ctx) + dim)
    g = torch.Generator().manual_seed(dim)
    rope = RotaryEmbedding(dim, 1024, {"rope_type": "default", "rope_theta": 1e4}, partial)
    qk = None
    if norm:
        qn, kn = RMSNorm(dim, 1e-6, dtype), RMSNorm(dim, 1e-6, dtype)
        qn.weight.data = (torch.rand(dim, generator=g) + 0.5).to(dtype)
        kn.weight.data = (torch.rand(dim, generator=g) + 0.5).to(dtype)
        qk = (qn.weight.to(DEVICE), kn.weight.to(DEVICE), 1e-6)
    pos = md.seq_lens.long() - 1
    d = to(md, DEVICE)
    tiles = pa.plan_tiles([1] * len(ctx), 1, DEVICE)
    cos, sin = rope.cos_cache.to(DEVICE), rope.sin_cache.to(DEVICE)
    kw = dict(num_splits=splits, block_n=block_n, split_tiles=split_tiles, workspace={})

    def run(fused):
        qd, kd, vd, cd = q.to(DEVICE).clone(), k.to(DEVICE).clone(), v.to(DEVICE).clone(), cache.to(DEVICE).clone()
        if fused:
            r = pa.RopeInputs(kd, vd, pos.to(DEVICE), cos, sin, d.slot_mapping, qk)
        else:
            rotary_store_kv(qd, kd, vd, pos.to(DEVICE), cos, sin, cd, d.slot_mapping, qk)
            r = None
        out = pa.paged_attention(qd, cd, d.block_tables, d.seq_lens, d.query_start_loc, *tiles, 1, dim ** -0.5,
                                 window, rope=r, **kw)
        return out.cpu(), cd.cpu()

    fused_out, fused_cache = run(True)
    sep_out, sep_cache = run(False)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(fused_cache, sep_cache, rtol=tol, atol=tol)
    torch.testing.assert_close(fused_out, sep_out, rtol=tol, atol=tol)
    # the torch path: norm, rotary, write_kv, torch attention
    qr, kr = (qn(q.clone()), kn(k.clone())) if norm else (q.clone(), k.clone())
    qr, kr = rope(pos, qr, kr)
    ref_cache = cache.clone()
    write_kv(ref_cache, kr, v, md.slot_mapping)
    ref = torch_paged_attention(qr.float(), ref_cache.float(), md, dim ** -0.5, window)
    torch.testing.assert_close(fused_cache, ref_cache, rtol=tol, atol=tol)
    err = (fused_out.double() - ref.double()).norm() / ref.double().norm()
    assert err < (1e-5 if dtype == torch.float32 else 2e-2), err


def test_rope_outside_decode_tiles_is_refused():
    q, k, v, cache, md = make_batch([3], [5], 4, 2, 32, 8, torch.float32, seed=1)
    rope = RotaryEmbedding(32, 64, {"rope_type": "default", "rope_theta": 1e4}, 1.0)
    tiles = pa.plan_tiles([3], 4, "cpu")
    with pytest.raises(ValueError, match="decode tiles only"):
        pa.paged_attention(q, cache, md.block_tables, md.seq_lens, md.query_start_loc, *tiles, 4, 0.1,
                           rope=pa.RopeInputs(k, v, torch.arange(3), rope.cos_cache, rope.sin_cache, md.slot_mapping))
