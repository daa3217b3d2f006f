"""The one-pass slot copy kernel (kernels/kv_copy.py) under Triton's interpreter on CPU against
kv_io.copy_slots' torch path (index_select + index_copy_): full caches with head ranges (the TP
re-slicing of the same-host GPU path) and re-blocking, latent caches, fp32 and bf16 bytes, and
nothing outside the destination slots and heads written. On the GPU copy_slots takes the kernel
(tests/gpu/test_kv_cuda_ipc.py runs it through the IPC path)."""
import pytest
import torch

pytest.importorskip("triton")
from meshserve.disagg import kv_io  # noqa: E402
from meshserve.kernels.kv_copy import copy_rows  # noqa: E402


def _kernel_copy(src, src_idx, src_heads, dst, dst_idx, dst_heads):
    sf, df = kv_io._flat(src), kv_io._flat(dst)
    if kv_io.cache_kind(src) == "latent":
        copy_rows(sf, src_idx, 0, df, dst_idx, 0, sf.shape[1])
    else:
        d = sf.shape[3]
        copy_rows(sf, src_idx, src_heads[0] * d, df, dst_idx, dst_heads[0] * d, (src_heads[1] - src_heads[0]) * d)


@pytest.mark.parametrize("kind,src_heads,dst_heads,bs_src,bs_dst", [
    ("full", (0, 4), (0, 4), 16, 16),
    ("full", (0, 4), (0, 4), 16, 32),  # re-blocking
    ("full", (2, 4), (0, 2), 16, 8),  # a TP-2 half into a TP-2 sink
    ("full", (0, 2), (2, 4), 4, 16),  # a source's two heads into the upper half of a TP-1 sink
    ("latent", None, None, 16, 32),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_copy_equals_torch(kind, src_heads, dst_heads, bs_src, bs_dst, dtype):
    g = torch.Generator().manual_seed(7)
    n, blocks, d = 37, 12, 8
    if kind == "full":
        src = torch.randn(2, blocks, bs_src, 4, d, generator=g).to(dtype)
        dst = torch.randn(2, blocks, bs_dst, 4, d, generator=g).to(dtype)
    else:
        src = torch.randn(blocks, bs_src, 20, generator=g).to(dtype)
        dst = torch.randn(blocks, bs_dst, 20, generator=g).to(dtype)
    src_ids = torch.randperm(blocks, generator=g)[:-(-n // bs_src)].tolist()
    dst_ids = torch.randperm(blocks, generator=g)[:-(-n // bs_dst)].tolist()
    src_idx = kv_io.token_slots(src_ids, bs_src, 0, n, blocks)
    dst_idx = kv_io.token_slots(dst_ids, bs_dst, 0, n, blocks)
    want = dst.clone()
    moved = kv_io.copy_slots(src, src_idx, src_heads, want, dst_idx, dst_heads)  # CPU: the torch path
    got = dst.clone()
    _kernel_copy(src, src_idx, src_heads, got, dst_idx, dst_heads)
    assert torch.equal(got.view(torch.int16) if dtype == torch.bfloat16 else got,
                       want.view(torch.int16) if dtype == torch.bfloat16 else want)
    assert not torch.equal(want, dst)  # something was copied
    assert moved == (2 * n * (src_heads[1] - src_heads[0]) * d if kind == "full" else n * 20) * src.element_size()
