"""The padding of mixed-step CUDA graphs (worker/cuda_graph.py MixedStepBuffers): a step's inputs
copied into a bucket's buffers, padded with extra tokens, sequence slots and query tiles, give the
Triton KV write and attention exactly the real rows of the unpadded launch, and the padding
writes nowhere but the null block. On a GPU directly; on CPU under Triton's interpreter."""
import os
from types import SimpleNamespace

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

from meshserve.kernels import paged_attention as pa  # noqa: E402
from meshserve.kernels.paged_attention import block_q_for, paged_attention, plan_tiles, store_kv  # noqa: E402
from meshserve.layers.attention import AttentionMetadata, torch_paged_attention, write_kv  # noqa: E402
from meshserve.worker.cuda_graph import MixedStepBuffers, default_prefill_token_sizes  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
H, KVH, D, PAGE = 8, 2, 64, 16


def step(q_lens, ctx_lens, seed):
    """Random inputs of one mixed step over a scattered paged cache (block 0 never used)."""
    g = torch.Generator().manual_seed(seed)
    seq_lens = [c + q for c, q in zip(ctx_lens, q_lens)]
    nblk = [-(-s // PAGE) for s in seq_lens]
    perm = (torch.randperm(sum(nblk) + 4, generator=g) + 1).tolist()
    tables, at = [], 0
    for n in nblk:
        tables.append(perm[at:at + n])
        at += n
    bt = torch.zeros(len(q_lens), max(nblk), dtype=torch.int32)
    for i, t in enumerate(tables):
        bt[i, :len(t)] = torch.tensor(t)
    cache = torch.randn(2, sum(nblk) + 5, PAGE, KVH, D, generator=g)
    T = sum(q_lens)
    q, k, v = (torch.randn(T, h, D, generator=g) for h in (H, KVH, KVH))
    slots = [tables[i][p // PAGE] * PAGE + p % PAGE for i in range(len(q_lens))
             for p in range(ctx_lens[i], seq_lens[i])]
    qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    md = AttentionMetadata(slot_mapping=torch.tensor(slots), query_start_loc=qsl,
                           seq_lens=torch.tensor(seq_lens, dtype=torch.int32), block_tables=bt,
                           max_query_len=max(q_lens), max_seq_len=max(seq_lens), block_size=PAGE)
    return q, k, v, cache, md


@pytest.mark.parametrize("large_tiles", [False, True], ids=["small-step-tiles", "large-step-tiles"])
@pytest.mark.parametrize("q_lens,ctx_lens,bucket,seqs", [
    ([23, 1, 1, 40], [0, 17, 50, 9], 128, 8),   # prompt chunks with decode rows, lots of padding
    ([23, 1, 1, 40], [0, 17, 50, 9], 128, 4),   # every sequence slot used
    ([64], [0], 64, 1),                         # exactly a bucket: no padding tokens, only tiles
    ([5, 1, 1, 1, 9], [30, 2, 3, 4, 0], 32, 6),  # more sequences than full tiles
])
def test_padded_bucket_gives_the_unpadded_rows(q_lens, ctx_lens, bucket, seqs, large_tiles, monkeypatch):
    if large_tiles:  # these small steps planned with the tiles of steps past PREFILL_LARGE_TOKENS
        monkeypatch.setattr(pa, "PREFILL_LARGE_TOKENS", 8)
    q, k, v, cache, md = step(q_lens, ctx_lens, seed=len(q_lens))
    T, B = q.shape[0], len(q_lens)
    block_q = block_q_for(max(q_lens), H // KVH, T)
    assert block_q == (pa.PREFILL_ROWS if large_tiles else pa.PREFILL_ROWS_SMALL) // (H // KVH)
    ref_cache = cache.clone().double()
    write_kv(ref_cache, k.double(), v.double(), md.slot_mapping)
    ref = torch_paged_attention(q.double(), ref_cache, md, D ** -0.5)  # float64 oracle, unpadded

    buf = MixedStepBuffers(max_tokens=256, max_seqs=8, max_blocks=64, group=H // KVH, device=DEVICE)
    assert buf.block_q(bucket) == block_q
    tile_seq, tile_start = plan_tiles(q_lens, block_q, DEVICE)
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    inp = SimpleNamespace(
        num_tokens=T, req_ids=[f"r{i}" for i in range(B)], input_ids=dev(torch.arange(T) + 7),
        positions=dev(torch.arange(T)), logits_indices=dev(md.query_start_loc[1:].long() - 1),
        attn=AttentionMetadata(dev(md.slot_mapping), dev(md.query_start_loc), dev(md.seq_lens),
                               dev(md.block_tables), md.max_query_len, md.max_seq_len, PAGE,
                               backend_data={"tile_seq": tile_seq, "tile_start": tile_start, "block_q": block_q}))
    assert buf.fits(T, B, tile_seq.shape[0], md.block_tables.shape[1])
    # Stale values of an earlier step that would corrupt real rows if left: a padding sequence slot
    # claiming the first 5 queries over 40 tokens of context, padding slots on a real KV slot.
    buf.query_start_loc.zero_()
    buf.query_start_loc[-1] = 5
    buf.seq_lens.fill_(40)
    buf.slot_mapping.fill_(int(md.slot_mapping[0]))
    buf.input_ids.fill_(5)
    buf.logits_indices.fill_(255)  # past a small bucket: the graph's gather would read out of bounds
    buf.fill(inp, bucket, seqs)
    pmd = buf.metadata(bucket, seqs, PAGE)
    assert torch.equal(buf.input_ids[:T].cpu(), torch.arange(T) + 7)
    assert buf.input_ids[T:bucket].eq(0).all() and buf.slot_mapping[T:bucket].eq(0).all()
    assert torch.equal(buf.logits_indices[:B].cpu(), md.query_start_loc[1:].long() - 1)
    assert buf.logits_indices[:seqs].max() < bucket  # every row the graph gathers exists

    # The padded launch: padding query rows hold garbage, the output starts poisoned.
    qp = torch.randn(bucket, H, D).to(DEVICE)
    kp, vp = torch.randn(bucket, KVH, D).to(DEVICE), torch.randn(bucket, KVH, D).to(DEVICE)
    qp[:T], kp[:T], vp[:T] = q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)
    dcache = cache.to(DEVICE)
    store_kv(kp, vp, dcache, pmd.slot_mapping)
    assert torch.equal(dcache[:, 1:].cpu().double(), ref_cache[:, 1:]), "padding wrote outside the null block"
    out = torch.full_like(qp, float("nan"))
    bd = pmd.backend_data
    paged_attention(qp, dcache, pmd.block_tables, pmd.seq_lens, pmd.query_start_loc, bd["tile_seq"],
                    bd["tile_start"], bd["block_q"], D ** -0.5, None, 1, out=out)
    got = out[:T].double().cpu()
    assert not got.isnan().any()
    assert (got - ref).norm() / ref.norm() < 2e-6


def test_bucket_sizes_and_capacity():
    assert default_prefill_token_sizes(2048)[:4] == [16, 32, 64, 128] and default_prefill_token_sizes(2048)[-1] == 2048
    assert default_prefill_token_sizes(600) == [16, 32, 64, 128, 256, 384, 512, 600]
    assert default_prefill_token_sizes(0) == []
    buf = MixedStepBuffers(max_tokens=512, max_seqs=64, max_blocks=8, group=4, device="cpu")
    assert buf.block_q(512) == 32  # 128-row tiles: 512 tokens is a small step
    assert buf.seq_caps(16) == [8, 16] and buf.seq_caps(512) == [8, 32, 64] and buf.seq_caps(8) == [8]
    # every plan of a fitting step fits: sum(ceil(n_i / 32)) <= B + ceil(T / 32)
    assert buf.fits(100, 16, 16 + 4, 8)
    assert not buf.fits(100, 65, 10, 8)  # more sequences than the largest bucket holds
    assert not buf.fits(513, 1, 17, 8)  # more tokens than the largest bucket
    assert not buf.fits(100, 4, 8, 9)  # a block table wider than the buffers


def test_tile_rows_follow_the_step_size():
    """Steps of up to PREFILL_LARGE_TOKENS tokens get the small prefill tiles, larger ones the large
    tiles, decode steps one token per tile; the graph buffers hold the plan of any graph."""
    g = 4
    assert block_q_for(1, g, 10_000) == 1
    assert block_q_for(40, g, pa.PREFILL_LARGE_TOKENS) == pa.PREFILL_ROWS_SMALL // g
    assert block_q_for(40, g, pa.PREFILL_LARGE_TOKENS + 1) == pa.PREFILL_ROWS // g
    assert block_q_for(40, g) == pa.PREFILL_ROWS // g  # no token count: the large tiles
    for max_tokens in (300, pa.PREFILL_LARGE_TOKENS, 3 * pa.PREFILL_LARGE_TOKENS + 5):
        buf = MixedStepBuffers(max_tokens=max_tokens, max_seqs=64, max_blocks=8, group=g, device="cpu")
        most = 0
        for t in range(1, max_tokens + 1):  # every graph's plan: seqs + ceil(t / block_q), brute force
            bq = block_q_for(2, g, t)
            most = max(most, min(t, 64) + -(-t // bq))
        assert buf.tile_seq.shape[0] >= most


def test_custom_buckets_across_the_tile_threshold_gain_the_threshold_bucket():
    """Custom token buckets (1,000 and 4,000): graphs replay the tiles they were captured with, so
    PREFILL_LARGE_TOKENS becomes a bucket too; a 1,500-token step, planned with the small-step
    tiles, replays that bucket's graph (small tiles), and a 2,100-token one the 4,000 graph."""
    from meshserve.worker.cuda_graph import PrefillGraphRunner

    g = 4
    runner = SimpleNamespace(attn_layers=[SimpleNamespace(num_heads=8, num_kv_heads=2)], device="cpu",
                             cfg=SimpleNamespace(block_size=16, dtype=torch.float32),
                             model_config=SimpleNamespace(hidden_size=8))
    pg = PrefillGraphRunner(runner, [1000, 4000], max_seqs=8, max_seq_len=4096)
    assert pg.sizes == [1000, pa.PREFILL_LARGE_TOKENS, 4000]
    assert PrefillGraphRunner(runner, [16, 1000], max_seqs=8, max_seq_len=4096).sizes == [16, 1000]

    def step(lens):
        bq = block_q_for(2, g, sum(lens))
        tile_seq, tile_start = plan_tiles(lens, bq, "cpu")
        bd = {"tile_seq": tile_seq, "tile_start": tile_start, "block_q": bq}
        return SimpleNamespace(num_tokens=sum(lens), req_ids=[str(i) for i in range(len(lens))],
                               attn=SimpleNamespace(backend_data=bd, block_tables=torch.zeros(len(lens), 100,
                                                                                              dtype=torch.int32)))

    inp = step([1400, 1, 1, 98])
    assert inp.attn.backend_data["block_q"] == pa.PREFILL_ROWS_SMALL // g
    assert pg.bucket(inp) == (pa.PREFILL_LARGE_TOKENS, 8)
    inp = step([2000, 1, 99])
    assert inp.attn.backend_data["block_q"] == pa.PREFILL_ROWS // g
    assert pg.bucket(inp) == (4000, 8)
    assert pg.bucket(step([900])) == (1000, 8)
    # a plan whose tiles are not the bucket's (PREFILL_LARGE_TOKENS changed after capture) runs eagerly
    inp = step([900])
    inp.attn.backend_data["block_q"] = pa.PREFILL_ROWS // g
    assert pg.bucket(inp) is None
