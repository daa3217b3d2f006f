"""The attention backend interface (layers/attention): the torch reference returns each query row's
log-sum-exp next to the output, both equal to a float64 computation written here; partial
attentions over disjoint key sets (Helix-style decode shards, ring-style context/diagonal parts)
merged by their LSEs equal full attention. The Triton backend (on a GPU, or on CPU under Triton's
interpreter) returns the same LSE as the reference for prefill chunks, decode rows, KV splits and
sliding windows, and its partials merge to full attention too; its CUDA graphs refuse return_lse."""
import math
import os
from types import SimpleNamespace

import pytest
import torch

from meshserve.layers.attention import (Attention, AttentionMetadata, AttentionShape, TorchAttentionBackend,
                                        merge_attention, select_attention_backend, write_kv)

H, KVH, D, PAGE = 8, 2, 16, 4
SCALE = D ** -0.5


def paged(keys: list[torch.Tensor], values: list[torch.Tensor], q_lens: list[int], dtype=torch.float64):
    """A paged cache holding each sequence's keys/values [L_i, KVH, D] contiguously from position 0
    (fresh blocks from 1 on), and the metadata of a step whose queries are each sequence's last q_lens."""
    tables, slots, next_block = [], [], 1
    for k in keys:
        n = -(-k.shape[0] // PAGE)
        tables.append(list(range(next_block, next_block + n)))
        next_block += n
    cache = torch.zeros(2, next_block, PAGE, KVH, D, dtype=dtype)
    for table, k, v in zip(tables, keys, values):
        at = torch.tensor([table[p // PAGE] * PAGE + p % PAGE for p in range(k.shape[0])])
        write_kv(cache, k, v, at)
    for table, k, n in zip(tables, keys, q_lens):  # the step's tokens: the last n of each sequence
        slots += [table[p // PAGE] * PAGE + p % PAGE for p in range(k.shape[0] - n, k.shape[0])]
    width = max(len(t) for t in tables)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    seq_lens = [k.shape[0] for k in keys]
    md = AttentionMetadata(torch.tensor(slots), qsl, torch.tensor(seq_lens, dtype=torch.int32), bt, max(q_lens),
                           max(seq_lens), PAGE)
    return cache, md


def float64_attention(q, k, v, q_pos, window=None):
    """q [Q, H, D] at absolute positions q_pos, over keys/values [L, KVH, D] at positions 0..L-1,
    causal: out [Q, H, D] and lse [Q, H], written out in float64 with math on every row."""
    q, k, v = q.double(), k.double(), v.double()
    out = torch.zeros(q.shape, dtype=torch.float64)
    lse = torch.zeros(q.shape[:2], dtype=torch.float64)
    for i, p in enumerate(q_pos):
        for h in range(H):
            kh = h // (H // KVH)
            seen = [j for j in range(k.shape[0]) if j <= p and (window is None or j > p - window)]
            s = [SCALE * float(q[i, h] @ k[j, kh]) for j in seen]
            m = max(s)
            total = sum(math.exp(x - m) for x in s)
            lse[i, h] = m + math.log(total)
            out[i, h] = sum(math.exp(x - m) / total * v[j, kh] for x, j in zip(s, seen))
    return out, lse


def on(md: AttentionMetadata, device) -> AttentionMetadata:
    """The metadata with its tensors on `device`."""
    return AttentionMetadata(md.slot_mapping.to(device), md.query_start_loc.to(device), md.seq_lens.to(device),
                             md.block_tables.to(device), md.max_query_len, md.max_seq_len, md.block_size)


def layer(cache, window=None):
    return SimpleNamespace(kv_cache=cache, scale=SCALE, sliding_window=window)


@pytest.mark.parametrize("window", [None, 5])
def test_torch_backend_returns_the_lse_of_every_row(window):
    """A mixed step (a prompt chunk over cached context, a whole prompt, two decode rows) in fp32:
    out and lse against the float64 computation; out also equals the SDPA path's."""
    g = torch.Generator().manual_seed(3)
    ctx, q_lens = [9, 0, 14, 3], [6, 7, 1, 1]
    seq_lens = [c + n for c, n in zip(ctx, q_lens)]
    keys = [torch.randn(n, KVH, D, generator=g) for n in seq_lens]
    values = [torch.randn(n, KVH, D, generator=g) for n in seq_lens]
    q = torch.randn(sum(q_lens), H, D, generator=g)
    cache, md = paged(keys, values, q_lens, torch.float32)
    backend = TorchAttentionBackend(AttentionShape(H, KVH, D), PAGE, "cpu")
    md = backend.build(md, q_lens)
    assert md.backend is backend
    k_new = torch.cat([k[-n:] for k, n in zip(keys, q_lens)])
    v_new = torch.cat([v[-n:] for v, n in zip(values, q_lens)])
    out, lse = backend.forward(layer(cache, window), q, k_new, v_new, md, return_lse=True)
    assert out.shape == (sum(q_lens), H, D) and lse.shape == (sum(q_lens), H) and lse.dtype == torch.float32
    refs = [float64_attention(q[a:a + n], k, v, range(c, c + n), window)
            for a, n, c, k, v in zip(md.query_start_loc[:-1].tolist(), q_lens, ctx, keys, values)]
    ref_out, ref_lse = torch.cat([r[0] for r in refs]), torch.cat([r[1] for r in refs])
    assert (out.double() - ref_out).norm() / ref_out.norm() < 1e-6
    assert (lse.double() - ref_lse).abs().max() < 1e-5
    plain = backend.forward(layer(cache, window), q, k_new, v_new, md)  # SDPA
    assert (plain - out).abs().max() < 1e-5


def test_attention_layer_passes_the_lse_through():
    g = torch.Generator().manual_seed(4)
    keys, values = [torch.randn(11, KVH, D, generator=g)], [torch.randn(11, KVH, D, generator=g)]
    cache, md = paged(keys, values, [3], torch.float32)
    md = TorchAttentionBackend(AttentionShape(H, KVH, D), PAGE, "cpu").build(md, [3])
    attn = Attention(H, D, SCALE, KVH)
    attn.kv_cache = cache
    q = torch.randn(3, H * D, generator=g)
    out, lse = attn(q, keys[0][-3:].reshape(3, -1), values[0][-3:].reshape(3, -1), md, return_lse=True)
    assert out.shape == (3, H * D) and lse.shape == (3, H)
    assert torch.allclose(out, attn(q, keys[0][-3:].reshape(3, -1), values[0][-3:].reshape(3, -1), md), atol=1e-5)


def partial(backend, keys, values, queries, q_lens, dtype=torch.float64):
    """The backend's (out, lse) for these queries over exactly these keys (each query's keys all visible
    to it, or causal in the keys' own positions when q_lens > 1), computed in `dtype` on backend.device."""
    cache, md = paged(keys, values, q_lens, dtype)
    md = backend.build(on(md, backend.device), q_lens)
    cache = cache.to(backend.device)
    dev = backend.device
    k_new = torch.cat([k[-n:] for k, n in zip(keys, q_lens)]).to(dev, dtype)
    v_new = torch.cat([v[-n:] for v, n in zip(values, q_lens)]).to(dev, dtype)
    cache_before = cache.clone()
    out, lse = backend.forward(layer(cache), queries.to(dev, dtype), k_new, v_new, md, return_lse=True)
    assert torch.equal(cache, cache_before)  # the step's own keys were already in place
    return out.cpu(), lse.cpu()


def test_helix_decode_shards_merge_to_full_attention():
    """Decode rows whose context is split over two ranks by an arbitrary disjoint key partition
    (each rank's keys packed in its own cache): the LSE merge equals full attention in float64."""
    g = torch.Generator().manual_seed(5)
    backend = TorchAttentionBackend(AttentionShape(H, KVH, D), PAGE, "cpu")
    lens = [23, 8, 40]
    keys = [torch.randn(n, KVH, D, generator=g, dtype=torch.float64) for n in lens]
    values = [torch.randn(n, KVH, D, generator=g, dtype=torch.float64) for n in lens]
    q = torch.randn(len(lens), H, D, generator=g, dtype=torch.float64)
    on_a = [torch.rand(n, generator=g) < 0.5 for n in lens]
    for m in on_a:  # each rank holds at least one key of each sequence
        m[0], m[-1] = True, False
    parts = [partial(backend, [k[m] for k, m in zip(keys, on_a)], [v[m] for v, m in zip(values, on_a)], q, [1] * 3),
             partial(backend, [k[~m] for k, m in zip(keys, on_a)], [v[~m] for v, m in zip(values, on_a)], q, [1] * 3)]
    out, lse = merge_attention([p[0] for p in parts], [p[1] for p in parts])
    refs = [float64_attention(q[i:i + 1], k, v, [n - 1]) for i, (k, v, n) in enumerate(zip(keys, values, lens))]
    assert (out - torch.cat([r[0] for r in refs])).abs().max() < 1e-12
    assert (lse - torch.cat([r[1] for r in refs])).abs().max() < 1e-12


def test_ring_style_context_and_diagonal_parts_merge_to_full_attention():
    """Prompt chunks split into the context before them (every query sees all of it: one decode-like
    row per query) and the part from the first query's position on (causal in its own positions):
    the LSE merge equals full causal attention in float64."""
    g = torch.Generator().manual_seed(6)
    backend = TorchAttentionBackend(AttentionShape(H, KVH, D), PAGE, "cpu")
    lens, q_lens, cut = [30, 17], [6, 9], [19, 8]  # keys [0, cut) on one rank, [cut, len) on the other
    keys = [torch.randn(n, KVH, D, generator=g, dtype=torch.float64) for n in lens]
    values = [torch.randn(n, KVH, D, generator=g, dtype=torch.float64) for n in lens]
    q = torch.randn(sum(q_lens), H, D, generator=g, dtype=torch.float64)
    rows = [i for i, n in enumerate(q_lens) for _ in range(n)]  # the sequence of each query row
    context = partial(backend, [keys[i][:cut[i]] for i in rows], [values[i][:cut[i]] for i in rows], q, [1] * len(rows))
    diagonal = partial(backend, [k[c:] for k, c in zip(keys, cut)], [v[c:] for v, c in zip(values, cut)], q, q_lens)
    out, lse = merge_attention([context[0], diagonal[0]], [context[1], diagonal[1]])
    refs = [float64_attention(q[a:a + n], k, v, range(len(k) - n, len(k)))
            for a, n, k, v in zip([0, q_lens[0]], q_lens, keys, values)]
    assert (out - torch.cat([r[0] for r in refs])).abs().max() < 1e-12
    assert (lse - torch.cat([r[1] for r in refs])).abs().max() < 1e-12


def test_merge_ignores_partials_that_saw_no_key():
    g = torch.Generator().manual_seed(7)
    o1, o2 = torch.randn(3, H, D, generator=g), torch.randn(3, H, D, generator=g)
    l1, l2 = torch.randn(3, H, generator=g), torch.full((3, H), float("-inf"))
    out, lse = merge_attention([o1, o2], [l1, l2])
    assert torch.allclose(out, o1) and torch.equal(lse, l1)
    out, lse = merge_attention([o2, o2], [l2, l2])
    assert out.eq(0).all() and lse.eq(float("-inf")).all()


def test_backend_selection():
    shape = AttentionShape(H, KVH, D)
    assert select_attention_backend("auto", shape, PAGE, torch.device("cpu")).name == "torch"
    with pytest.raises(ValueError, match="attention_backend='flash' is not supported; accepted: auto, triton, torch"):
        select_attention_backend("flash", shape, PAGE, torch.device("cpu"))


# ---- the Triton backend: on a GPU, or on CPU under the interpreter (conftest sets TRITON_INTERPRET) ----

def triton_backend():
    pytest.importorskip("triton")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton backend needs a GPU or TRITON_INTERPRET=1")
    backend = select_attention_backend("triton", AttentionShape(H, KVH, D), PAGE, device)
    assert backend.name == "triton" and backend.supports_lse
    return backend


# (cached context lens, query lens, sliding window); the context of a sequence whose entry is None
# is cut to nothing after the batch is built (seq_len 0): its row sees no key
TRITON_LSE_CASES = {
    # prompt chunks over 150 cached tokens (two 128-key prefill tiles), a whole prompt, decode rows
    "mixed": ([150, 0, 14, 3], [6, 7, 1, 1], None),
    "mixed-window": ([150, 0, 14, 3], [6, 7, 1, 1], 5),
    # decode tiles (64 keys), with KV splits of 2 tiles: 3 splits merged, 2 merged, 1 alone, an empty row
    "decode-splits": ([300, 150, 40, None], [1, 1, 1, 1], None),
    "decode-splits-window": ([300, 150, 40, 7], [1, 1, 1, 1], 100),
}


@pytest.mark.parametrize("case", list(TRITON_LSE_CASES))
def test_triton_backend_returns_the_lse_of_the_reference(case):
    """fp32 on the Triton backend: out and lse against the torch reference run in float64 on the
    same cache (that reference equals the float64 computation above)."""
    backend = triton_backend()
    ctx, q_lens, window = TRITON_LSE_CASES[case]
    empty = [c is None for c in ctx]
    ctx = [0 if c is None else c for c in ctx]
    g = torch.Generator().manual_seed(8)
    seq_lens = [c + n for c, n in zip(ctx, q_lens)]
    keys = [torch.randn(n, KVH, D, generator=g) for n in seq_lens]
    values = [torch.randn(n, KVH, D, generator=g) for n in seq_lens]
    q = torch.randn(sum(q_lens), H, D, generator=g)
    cache, md = paged(keys, values, q_lens, torch.float32)
    md.seq_lens[torch.tensor(empty)] = 0
    ref_out, ref_lse = TorchAttentionBackend(backend.shape, PAGE, "cpu").forward(
        layer(cache.double(), window), q.double(), torch.cat([k[-n:] for k, n in zip(keys, q_lens)]).double(),
        torch.cat([v[-n:] for v, n in zip(values, q_lens)]).double(), md, return_lse=True)

    dev = backend.device
    tmd = backend.build(on(md, dev), q_lens)
    if case.startswith("decode"):
        assert tmd.block_q == 1 and tmd.num_splits > 1
    k_new = torch.cat([k[-n:] for k, n in zip(keys, q_lens)]).to(dev)
    v_new = torch.cat([v[-n:] for v, n in zip(values, q_lens)]).to(dev)
    out, lse = backend.forward(layer(cache.to(dev), window), q.to(dev), k_new, v_new, tmd, return_lse=True)
    out, lse = out.double().cpu(), lse.cpu()
    assert lse.shape == (sum(q_lens), H) and lse.dtype == torch.float32
    rows = torch.tensor([e for e, n in zip(empty, q_lens) for _ in range(n)])  # the rows that see no key
    assert lse[rows].eq(float("-inf")).all() and ref_lse[rows].eq(float("-inf")).all()
    assert out[rows].eq(0).all()
    assert lse[~rows].isfinite().all()
    assert (lse[~rows].double() - ref_lse[~rows]).abs().max() < 1e-5
    assert (out - ref_out).norm() / ref_out.norm() < 1e-5
    plain = backend.forward(layer(cache.to(dev), window), q.to(dev), k_new, v_new, tmd)  # the flag-off variant
    assert torch.equal(plain.double().cpu(), out)


def test_triton_partials_merge_to_full_attention():
    """The ring-style split of test_ring_style_context_and_diagonal_parts_merge_to_full_attention, each
    part on the Triton backend in fp32 (the context part's long rows in KV splits): the LSE merge
    equals full causal attention computed in float64."""
    backend = triton_backend()
    g = torch.Generator().manual_seed(9)
    lens, q_lens, cut = [150, 30], [6, 9], [140, 8]
    keys = [torch.randn(n, KVH, D, generator=g, dtype=torch.float64) for n in lens]
    values = [torch.randn(n, KVH, D, generator=g, dtype=torch.float64) for n in lens]
    q = torch.randn(sum(q_lens), H, D, generator=g, dtype=torch.float64)
    rows = [i for i, n in enumerate(q_lens) for _ in range(n)]
    context = partial(backend, [keys[i][:cut[i]] for i in rows], [values[i][:cut[i]] for i in rows], q,
                      [1] * len(rows), torch.float32)
    diagonal = partial(backend, [k[c:] for k, c in zip(keys, cut)], [v[c:] for v, c in zip(values, cut)], q, q_lens,
                       torch.float32)
    out, lse = merge_attention([context[0].double(), diagonal[0].double()], [context[1].double(), diagonal[1].double()])
    refs = [float64_attention(q[a:a + n], k, v, range(len(k) - n, len(k)))
            for a, n, k, v in zip([0, q_lens[0]], q_lens, keys, values)]
    ref_out = torch.cat([r[0] for r in refs])
    assert (out - ref_out).norm() / ref_out.norm() < 1e-5
    assert (lse - torch.cat([r[1] for r in refs])).abs().max() < 1e-5


def test_triton_cuda_graph_metadata_refuses_return_lse():
    backend = triton_backend()
    g = torch.Generator().manual_seed(10)
    _, md = paged([torch.randn(5, KVH, D, generator=g)], [torch.randn(5, KVH, D, generator=g)], [1])
    backend.reserve_graph_buffers(16, 4, decode=True)
    graph_md = backend.graph_metadata(on(md, backend.device), 1, 1, decode=True)
    with pytest.raises(NotImplementedError, match="return_lse=True in a CUDA graph"):
        backend.forward(layer(None), None, None, None, graph_md, return_lse=True)
