"""The Triton paged attention kernel against the torch reference (layers/attention/backends/torch.py)
on fresh random inputs: decode, prefill, chunked prefill over cached context, mixed batches, GQA
groups, sliding windows, KV splits, and each row's log-sum-exp (return_lse). On a GPU in fp32
(IEEE dots) and bf16; on CPU under Triton's interpreter (TRITON_INTERPRET=1) when Triton is installed."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

from meshserve.kernels.paged_attention import block_q_for, paged_attention, plan_tiles, store_kv  # noqa: E402
from meshserve.layers.attention import AttentionMetadata, torch_paged_attention, write_kv  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_batch(q_lens, ctx_lens, heads, kv_heads, head_dim, page, dtype, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    B = len(q_lens)
    seq_lens = [c + q for c, q in zip(ctx_lens, q_lens)]
    blocks_per = [-(-s // page) for s in seq_lens]
    num_blocks = sum(blocks_per) + 3
    perm = (torch.randperm(num_blocks - 1, generator=g) + 1).tolist()  # scattered, never block 0
    tables, it = [], iter(perm)
    for n in blocks_per:
        tables.append([next(it) for _ in range(n)])
    width = max(blocks_per)
    bt = torch.zeros(B, width, dtype=torch.int32)
    for i, t in enumerate(tables):
        bt[i, :len(t)] = torch.tensor(t)
    cache = torch.randn(2, num_blocks, page, kv_heads, head_dim, generator=g).to(dtype)
    T = sum(q_lens)
    q = torch.randn(T, heads, head_dim, generator=g).to(dtype)
    k = torch.randn(T, kv_heads, head_dim, generator=g).to(dtype)
    v = torch.randn(T, kv_heads, head_dim, generator=g).to(dtype)
    slots = []
    for i in range(B):
        for p in range(ctx_lens[i], seq_lens[i]):
            slots.append(tables[i][p // page] * page + p % page)
    qsl = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32)
    md = AttentionMetadata(slot_mapping=torch.tensor(slots), query_start_loc=qsl,
                           seq_lens=torch.tensor(seq_lens, dtype=torch.int32), block_tables=bt,
                           max_query_len=max(q_lens), max_seq_len=max(seq_lens), block_size=page)
    return q, k, v, cache, md


def to(md, dev):
    return AttentionMetadata(md.slot_mapping.to(dev), md.query_start_loc.to(dev), md.seq_lens.to(dev),
                             md.block_tables.to(dev), md.max_query_len, md.max_seq_len, md.block_size)


CASES = [
    # (query lens, cached context lens, heads, kv heads, head_dim, page, window, splits)
    ([1, 1, 1, 1], [7, 33, 64, 129], 8, 2, 64, 16, None, 1),          # decode, GQA 4
    ([1, 1, 1], [300, 5, 77], 32, 8, 128, 32, None, 4),               # decode with KV splits
    ([17, 40], [0, 0], 4, 4, 64, 16, None, 1),                       # prefill, MHA
    ([1, 9, 1, 30], [20, 11, 3, 45], 8, 1, 64, 16, None, 1),          # mixed decode + chunked prefill, MQA
    ([12, 1], [30, 50], 8, 2, 96, 16, 24, 1),                        # sliding window, head_dim 96
    ([1, 1], [90, 10], 16, 8, 128, 64, 32, 3),                       # window + splits, page 64
]


@pytest.mark.parametrize("heavy_first", [None, False, True], ids=["default-order", "in-order", "heavy-first"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_kernel_matches_torch_reference(case, dtype, heavy_first):
    q_lens, ctx, H, KVH, D, page, window, splits = CASES[case]
    if DEVICE == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the interpreter checks fp32; bf16 runs on the GPU")
    q, k, v, cache, md = make_batch(q_lens, ctx, H, KVH, D, page, dtype, seed=case)
    ref_cache = cache.clone()
    write_kv(ref_cache, k, v, md.slot_mapping)
    ref = torch_paged_attention(q.double(), ref_cache.double(), md, D ** -0.5, window)

    dev_cache = cache.to(DEVICE)
    dmd = to(md, DEVICE)
    store_kv(k.to(DEVICE), v.to(DEVICE), dev_cache, dmd.slot_mapping)
    assert torch.equal(dev_cache.cpu(), ref_cache)
    block_q = block_q_for(max(q_lens), H // KVH)
    tile_seq, tile_start = plan_tiles(q_lens, block_q, DEVICE)
    out = torch.full_like(q, float("nan"), device=DEVICE)  # poisoned: every element must be written
    paged_attention(q.to(DEVICE), dev_cache, dmd.block_tables, dmd.seq_lens, dmd.query_start_loc, tile_seq,
                    tile_start, block_q, D ** -0.5, window, splits, out=out, heavy_first=heavy_first)
    got = out.double().cpu()
    assert not got.isnan().any()
    err = (got - ref).norm() / ref.norm()
    assert err < (2e-6 if dtype == torch.float32 else 1e-2), f"relative error {err:.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_kernel_returns_the_lse_of_the_torch_reference(case, dtype):
    """return_lse=True (the RETURN_LSE variant): each row's natural-log LSE of the scaled scores, from
    the unsplit store, a lone split's store and the merge of splits, against the reference's in float64."""
    q_lens, ctx, H, KVH, D, page, window, splits = CASES[case]
    if DEVICE == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the interpreter checks fp32; bf16 runs on the GPU")
    q, k, v, cache, md = make_batch(q_lens, ctx, H, KVH, D, page, dtype, seed=case)
    write_kv(cache, k, v, md.slot_mapping)
    ref, ref_lse = torch_paged_attention(q.double(), cache.double(), md, D ** -0.5, window, return_lse=True)
    dmd = to(md, DEVICE)
    block_q = block_q_for(max(q_lens), H // KVH)
    tile_seq, tile_start = plan_tiles(q_lens, block_q, DEVICE)
    out, lse = paged_attention(q.to(DEVICE), cache.to(DEVICE), dmd.block_tables, dmd.seq_lens, dmd.query_start_loc,
                               tile_seq, tile_start, block_q, D ** -0.5, window, splits, return_lse=True)
    assert lse.shape == (sum(q_lens), H) and lse.dtype == torch.float32
    err = (lse.double().cpu() - ref_lse).abs().max()
    assert err < (1e-5 if dtype == torch.float32 else 1e-2), f"lse error {err:.2e}"
    assert (out.double().cpu() - ref).norm() / ref.norm() < (2e-6 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("splits", [2, 16])
def test_split_decode_merges_in_one_launch_and_leaves_counters_at_zero(splits):
    """Splits are merged by the last one to finish (an atomic counter per tile and kv head); a
    reused workspace (as in a CUDA graph's replays) must give the same result every launch."""
    q_lens, ctx = [1, 1], [1000, 70]
    q, k, v, cache, md = make_batch(q_lens, ctx, 32, 8, 128, 16, torch.float32, seed=99)
    ref_cache = cache.clone()
    write_kv(ref_cache, k, v, md.slot_mapping)
    ref = torch_paged_attention(q.double(), ref_cache.double(), md, 128 ** -0.5, None)
    dev_cache, dmd = ref_cache.to(DEVICE), to(md, DEVICE)
    tile_seq, tile_start = plan_tiles(q_lens, 1, DEVICE)
    ws = {}
    runs = 20 if DEVICE == "cuda" else 2
    for _ in range(runs):
        out = torch.full_like(q, float("nan"), device=DEVICE)
        paged_attention(q.to(DEVICE), dev_cache, dmd.block_tables, dmd.seq_lens, dmd.query_start_loc, tile_seq,
                        tile_start, 1, 128 ** -0.5, None, splits, out=out, workspace=ws)
        got = out.double().cpu()
        assert not got.isnan().any()
        assert (got - ref).norm() / ref.norm() < 2e-6
        assert int(ws["counter"].abs().sum()) == 0


@pytest.mark.parametrize("limit,elt,expect", [
    (232448, 2, (128, 3)),   # H200, bf16: the tuned prefill tiles fit as they are
    (166912, 2, (128, 2)),   # A100, bf16: one stage fewer
    (101376, 2, (64, 2)),    # L40S / RTX, bf16: and half the KV tile
    (232448, 4, (64, 2)),    # H200, fp32 (the case that ran out of shared memory)
])
def test_tile_shapes_shrink_to_the_shared_memory_of_the_gpu(limit, elt, expect):
    """128 query rows, head_dim 128: (K + V) x stages + Q bytes must fit; the first shape of the
    shrink order that fits is taken (the previous one does not)."""
    from meshserve.kernels.paged_attention import fit_tiles, shrink_tiles

    def size(bn, st):
        return st * 2 * bn * 128 * elt + 128 * 128 * elt

    got = fit_tiles(128, 128, 128, elt, 3, limit)
    assert got == expect and size(*got) <= limit
    shapes = [(128, 3)]
    while shapes[-1] != got:
        shapes.append(shrink_tiles(*shapes[-1]))
    assert all(size(*s) > limit for s in shapes[:-1])


def test_a_launch_out_of_shared_memory_retries_smaller_and_remembers(monkeypatch):
    """Triton's OutOfResources at compile time (its own estimate can exceed ours) makes the launch
    retry with the next smaller tiles; the result still equals the reference, and the next call
    starts from the shape that worked."""
    from triton.runtime.errors import OutOfResources

    import meshserve.kernels.paged_attention as pa

    real, launched = pa._attn_kernel, []

    class Tight:  # a GPU whose blocks hold at most 64-token KV tiles in 2 stages
        def __getitem__(self, grid):
            def launch(*args, **kw):
                launched.append((kw["BLOCK_N"], kw["num_stages"]))
                if kw["BLOCK_N"] * kw["num_stages"] > 128:
                    raise OutOfResources(kw["BLOCK_N"] * kw["num_stages"] * 1024, 128 * 1024, "shared memory")
                return real[grid](*args, **kw)
            return launch

    monkeypatch.setattr(pa, "_attn_kernel", Tight())
    monkeypatch.setattr(pa, "_FITTED", {})
    q_lens, ctx = [40], [0]
    q, k, v, cache, md = make_batch(q_lens, ctx, 4, 4, 64, 16, torch.float32, seed=7)
    write_kv(cache, k, v, md.slot_mapping)
    ref = torch_paged_attention(q.double(), cache.double(), md, 64 ** -0.5, None)
    dmd, dev_cache = to(md, DEVICE), cache.to(DEVICE)
    tile_seq, tile_start = plan_tiles(q_lens, 16, DEVICE)
    for _ in range(2):
        out = pa.paged_attention(q.to(DEVICE), dev_cache, dmd.block_tables, dmd.seq_lens, dmd.query_start_loc,
                                 tile_seq, tile_start, 16, 64 ** -0.5, None, 1, block_n=128, num_stages=3)
        assert (out.double().cpu() - ref).norm() / ref.norm() < 2e-6
    assert launched == [(128, 3), (128, 2), (64, 2), (64, 2)]
    with pytest.raises(OutOfResources):  # a sweep's exact shape is never shrunk
        pa.paged_attention(q.to(DEVICE), dev_cache, dmd.block_tables, dmd.seq_lens, dmd.query_start_loc,
                           tile_seq, tile_start, 16, 64 ** -0.5, None, 1, block_n=128, num_stages=3,
                           exact_tiles=True)
