"""The padding of mixed-step CUDA graphs (worker/cuda_graph.py MixedStepBuffers with the Triton
attention backend's plan buffers): a step's inputs copied into a bucket's buffers, padded with
extra tokens, sequence slots and query tiles, give the backend's KV write and attention exactly the
real rows of the unpadded launch, and the padding writes nowhere but the null block. On a GPU
directly; on CPU under Triton's interpreter."""
import dataclasses
import os
from types import SimpleNamespace

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

from meshserve.kernels.paged_attention import block_q_for  # noqa: E402
from meshserve.kernels.settings import H200  # noqa: E402
from meshserve.layers.attention import AttentionMetadata, AttentionShape, torch_paged_attention, write_kv  # noqa: E402
from meshserve.layers.attention.backends.triton import TritonAttentionBackend  # noqa: E402
from meshserve.worker.cuda_graph import MixedStepBuffers, PrefillGraphRunner, default_prefill_token_sizes  # noqa: E402

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


def triton_backend(heads=H, kv_heads=KVH, large_tokens=None, device=DEVICE):
    """The backend with the H200's tile settings; large_tokens: its attn_prefill_large_tokens instead."""
    settings = H200 if large_tokens is None else dataclasses.replace(H200, attn_prefill_large_tokens=large_tokens)
    return TritonAttentionBackend(AttentionShape(heads, kv_heads, D), PAGE, device, settings)


def step_inputs(backend, q_lens, width=100, device="cpu"):
    """StepInputs-like: the backend's metadata of a step with these query lengths (no real tensors)."""
    T, B = sum(q_lens), len(q_lens)
    common = AttentionMetadata(torch.zeros(T, dtype=torch.int64), torch.zeros(B + 1, dtype=torch.int32),
                               torch.zeros(B, dtype=torch.int32), torch.zeros(B, width, dtype=torch.int32),
                               max(q_lens), 1, PAGE)
    return SimpleNamespace(num_tokens=T, req_ids=[str(i) for i in range(B)], attn=backend.build(common, q_lens))


@pytest.mark.parametrize("large_tiles", [False, True], ids=["small-step-tiles", "large-step-tiles"])
@pytest.mark.parametrize("q_lens,ctx_lens,bucket,seqs", [
    ([23, 1, 1, 40], [0, 17, 50, 9], 128, 8),   # prompt chunks with decode rows, lots of padding
    ([23, 1, 1, 40], [0, 17, 50, 9], 128, 4),   # every sequence slot used
    ([64], [0], 64, 1),                         # exactly a bucket: no padding tokens, only tiles
    ([5, 1, 1, 1, 9], [30, 2, 3, 4, 0], 32, 6),  # more sequences than full tiles
])
def test_padded_bucket_gives_the_unpadded_rows(q_lens, ctx_lens, bucket, seqs, large_tiles):
    # large tiles: these small steps planned with the tiles of steps past attn_prefill_large_tokens
    backend = triton_backend(large_tokens=8 if large_tiles else None)
    q, k, v, cache, md = step(q_lens, ctx_lens, seed=len(q_lens))
    T, B = q.shape[0], len(q_lens)
    ref_cache = cache.clone().double()
    write_kv(ref_cache, k.double(), v.double(), md.slot_mapping)
    ref = torch_paged_attention(q.double(), ref_cache, md, D ** -0.5)  # float64 oracle, unpadded

    buf = MixedStepBuffers(max_tokens=256, max_seqs=8, max_blocks=64, block_size=PAGE, backend=backend, device=DEVICE)
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    step_md = backend.build(AttentionMetadata(dev(md.slot_mapping), dev(md.query_start_loc), dev(md.seq_lens),
                                              dev(md.block_tables), md.max_query_len, md.max_seq_len, PAGE), q_lens)
    assert step_md.block_q == (256 if large_tiles else 128) // (H // KVH)  # the H200's prefill rows
    assert backend.graph_block_q(bucket) == step_md.block_q
    inp = SimpleNamespace(
        num_tokens=T, req_ids=[f"r{i}" for i in range(B)], input_ids=dev(torch.arange(T) + 7),
        positions=dev(torch.arange(T)), logits_indices=dev(md.query_start_loc[1:].long() - 1), attn=step_md)
    assert buf.fits(T, B, md.block_tables.shape[1]) and backend.graph_accepts(step_md, bucket, seqs)
    pmd = buf.metadata(bucket, seqs)  # what the graph is captured with
    # Stale values of an earlier step that would corrupt real rows if left: a padding sequence slot
    # claiming the first 5 queries over 40 tokens of context, padding slots on a real KV slot.
    buf.query_start_loc.zero_()
    buf.query_start_loc[-1] = 5
    buf.seq_lens.fill_(40)
    buf.slot_mapping.fill_(int(md.slot_mapping[0]))
    buf.input_ids.fill_(5)
    buf.logits_indices.fill_(255)  # past a small bucket: the graph's gather would read out of bounds
    buf.fill(inp, bucket, seqs)
    assert torch.equal(buf.input_ids[:T].cpu(), torch.arange(T) + 7)
    assert buf.input_ids[T:bucket].eq(0).all() and buf.slot_mapping[T:bucket].eq(0).all()
    assert torch.equal(buf.logits_indices[:B].cpu(), md.query_start_loc[1:].long() - 1)
    assert buf.logits_indices[:seqs].max() < bucket  # every row the graph gathers exists
    assert pmd.tile_seq[step_md.num_tiles:].eq(seqs).all()  # padding tiles point at a padding slot

    # The padded forward, as the graph runs it: padding query rows hold garbage.
    qp = torch.randn(bucket, H, D).to(DEVICE)
    kp, vp = torch.randn(bucket, KVH, D).to(DEVICE), torch.randn(bucket, KVH, D).to(DEVICE)
    qp[:T], kp[:T], vp[:T] = q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)
    layer = SimpleNamespace(kv_cache=cache.to(DEVICE), scale=D ** -0.5, sliding_window=None)
    out = backend.forward(layer, qp, kp, vp, pmd)
    assert torch.equal(layer.kv_cache[:, 1:].cpu().double(), ref_cache[:, 1:]), "padding wrote outside the null block"
    got = out[:T].double().cpu()
    assert not got.isnan().any()
    assert (got - ref).norm() / ref.norm() < 2e-6


def test_bucket_sizes_and_capacity():
    assert default_prefill_token_sizes(2048)[:4] == [16, 32, 64, 128] and default_prefill_token_sizes(2048)[-1] == 2048
    assert default_prefill_token_sizes(600) == [16, 32, 64, 128, 256, 384, 512, 600]
    assert default_prefill_token_sizes(0) == []
    backend = triton_backend(8, 2, device="cpu")
    buf = MixedStepBuffers(max_tokens=512, max_seqs=64, max_blocks=8, block_size=PAGE, backend=backend, device="cpu")
    assert backend.graph_block_q(512) == 32  # 128-row tiles: 512 tokens is a small step
    assert buf.seq_caps(16) == [8, 16] and buf.seq_caps(512) == [8, 32, 64] and buf.seq_caps(8) == [8]
    assert buf.fits(100, 16, 8)
    assert not buf.fits(100, 65, 8)  # more sequences than the largest bucket holds
    assert not buf.fits(513, 1, 8)  # more tokens than the largest bucket
    assert not buf.fits(100, 4, 9)  # a block table wider than the buffers
    # a graph of 128 tokens and 16 slots has 16 + ceil(128 / 32) = 20 tiles: plans of up to 20 fit
    assert backend.graph_accepts(SimpleNamespace(block_q=32, num_tiles=20), 128, 16)
    assert not backend.graph_accepts(SimpleNamespace(block_q=32, num_tiles=21), 128, 16)
    assert not backend.graph_accepts(SimpleNamespace(block_q=64, num_tiles=2), 128, 16)  # other tiles


def test_tile_rows_follow_the_step_size():
    """Steps of up to attn_prefill_large_tokens tokens get the small prefill tiles, larger ones the
    large tiles, decode steps one token per tile; the backend's graph buffers hold the plan of any
    graph, and every plan of a step that fits a graph fits its tiles."""
    g, large = 4, H200.attn_prefill_large_tokens
    assert block_q_for(1, g, 10_000) == 1
    assert block_q_for(40, g, large) == H200.attn_prefill_rows_small // g
    assert block_q_for(40, g, large + 1) == H200.attn_prefill_rows // g
    assert block_q_for(40, g) == H200.attn_prefill_rows // g  # no token count: the large tiles
    for max_tokens in (300, large, 3 * large + 5):
        backend = triton_backend(8, 2, device="cpu")
        buf = MixedStepBuffers(max_tokens=max_tokens, max_seqs=64, max_blocks=8, block_size=PAGE, backend=backend,
                               device="cpu")
        for t in range(1, max_tokens + 1):  # every graph's plan: seqs + ceil(t / block_q), brute force
            s = min(t, 64)
            assert buf.metadata(t, s).num_tiles == s + -(-t // block_q_for(2, g, t))  # not cut short by the buffer
    backend = triton_backend(8, 2, device="cpu")
    for lens in ([1400, 1, 1, 98], [5] * 64, [300], [2000, 1, 99]):
        inp = step_inputs(backend, lens)
        t = inp.num_tokens
        assert backend.graph_accepts(inp.attn, t, len(lens))


def test_custom_buckets_across_the_tile_threshold_gain_the_threshold_bucket():
    """Custom token buckets (1,000 and 4,000): graphs replay the tiles they were captured with, so
    attn_prefill_large_tokens becomes a bucket too; a 1,500-token step, planned with the small-step
    tiles, replays that bucket's graph (small tiles), and a 2,100-token one the 4,000 graph."""
    g, large = 4, H200.attn_prefill_large_tokens
    backend = triton_backend(8, 2, device="cpu")
    runner = SimpleNamespace(attn_backend=backend, device="cpu", model_config=SimpleNamespace(hidden_size=8),
                             cfg=SimpleNamespace(block_size=16, dtype=torch.float32))
    pg = PrefillGraphRunner(runner, [1000, 4000], max_seqs=8, max_seq_len=4096)
    assert pg.sizes == [1000, large, 4000]
    assert PrefillGraphRunner(runner, [16, 1000], max_seqs=8, max_seq_len=4096).sizes == [16, 1000]

    inp = step_inputs(backend, [1400, 1, 1, 98])
    assert inp.attn.block_q == H200.attn_prefill_rows_small // g
    assert pg.bucket(inp) == (large, 8)
    inp = step_inputs(backend, [2000, 1, 99])
    assert inp.attn.block_q == H200.attn_prefill_rows // g
    assert pg.bucket(inp) == (4000, 8)
    assert pg.bucket(step_inputs(backend, [900])) == (1000, 8)
    # a plan whose tiles are not the bucket's (planned with other settings) runs eagerly
    inp = step_inputs(backend, [900])
    inp.attn.block_q = H200.attn_prefill_rows // g
    assert pg.bucket(inp) is None
    # the threshold follows the kernel settings
    other = triton_backend(8, 2, large_tokens=512, device="cpu")
    runner.attn_backend = other
    assert PrefillGraphRunner(runner, [1000, 4000], max_seqs=8, max_seq_len=4096).sizes == [512, 1000, 4000]
