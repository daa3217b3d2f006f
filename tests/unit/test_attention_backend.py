"""The attention backend interface (layers/attention): the torch reference returns each query row's
log-sum-exp next to the output, both equal to a float64 computation written here; partial
attentions over disjoint key sets (Helix-style decode shards, ring-style context/diagonal parts)
merged by their LSEs equal full attention; the Triton backend refuses return_lse by name."""
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


def partial(backend, keys, values, queries, q_lens):
    """The reference's (out, lse) for these queries over exactly these keys (each query's keys all visible
    to it, or causal in the keys' own positions when q_lens > 1), in float64."""
    cache, md = paged(keys, values, q_lens)
    md = backend.build(md, q_lens)
    k_new = torch.cat([k[-n:] for k, n in zip(keys, q_lens)])
    v_new = torch.cat([v[-n:] for v, n in zip(values, q_lens)])
    cache_before = cache.clone()
    out, lse = backend.forward(layer(cache), queries, k_new, v_new, md, return_lse=True)
    assert torch.equal(cache, cache_before)  # the step's own keys were already in place
    return out, lse


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


def test_backend_selection_and_the_triton_refusal_of_return_lse():
    shape = AttentionShape(H, KVH, D)
    assert select_attention_backend("auto", shape, PAGE, torch.device("cpu")).name == "torch"
    with pytest.raises(ValueError, match="attention_backend='flash' is not supported; accepted: auto, triton, torch"):
        select_attention_backend("flash", shape, PAGE, torch.device("cpu"))
    pytest.importorskip("triton")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":  # conftest sets it on CPU
        backend = select_attention_backend("triton", shape, PAGE, device)
        assert backend.name == "triton" and not backend.supports_lse
        with pytest.raises(NotImplementedError, match="return_lse=True: the Triton attention backend"):
            backend.forward(layer(None), None, None, None, None, return_lse=True)
