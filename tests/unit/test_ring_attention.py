"""Context parallelism RING in one process: cp ranks' KV shards (layers/context_parallel.py
ring_metadata) over three steps of two requests (prompt chunks, a chunk beside a decode row, decode
rows), each rank's partial attention by a real backend and the log-sum-exp merge, against full
causal attention written out in float64; each rank's cache holds exactly the positions it owns."""
import os

import pytest
import torch

from meshserve.layers.attention import AttentionShape, TorchAttentionBackend, merge_attention, select_attention_backend
from meshserve.layers.context_parallel import ring_metadata
from test_attention_backend import D, H, KVH, float64_attention, layer

TABLES = [[3, 1, 6, 8, 12, 10], [2, 7, 4, 5, 9, 11]]  # the scheduler's block ids of the two requests, out of order
STEPS = [  # (request, first position, new tokens) of each step
    [(0, 0, 11), (1, 0, 5)],
    [(0, 11, 9), (1, 5, 1)],
    [(0, 20, 1), (1, 6, 1)],
]


class PerQueryTorch(TorchAttentionBackend):
    """The torch backend without query_positions: ring_metadata's one-row sequences (as for MLA)."""
    name = "torch-per-query"
    supports_query_positions = False


def backends(sub: int, dtype):
    yield TorchAttentionBackend(AttentionShape(H, KVH, D), sub, "cpu")
    yield PerQueryTorch(AttentionShape(H, KVH, D), sub, "cpu")
    if dtype == torch.float32 and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.importorskip("triton")
        yield select_attention_backend("triton", AttentionShape(H, KVH, D), sub, torch.device("cpu"))


@pytest.mark.parametrize("cp,block", [(2, 8), (4, 16), (3, 6), (2, 4)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ring_shards_merge_to_full_causal_attention(cp, block, dtype):
    sub = block // cp
    g = torch.Generator().manual_seed(cp * 100 + block)
    final = [21, 7]
    keys = [torch.randn(n, KVH, D, generator=g, dtype=torch.float64) for n in final]
    values = [torch.randn(n, KVH, D, generator=g, dtype=torch.float64) for n in final]
    for backend in backends(sub, dtype):
        caches = [torch.zeros(2, 13, sub, KVH, D, dtype=dtype) for _ in range(cp)]
        for step in STEPS:
            pos = torch.cat([torch.arange(a, a + n) for _, a, n in step])
            rows = torch.cat([torch.full((n,), r) for r, _, n in step])
            k_new = torch.cat([keys[r][a:a + n] for r, a, n in step]).to(dtype)
            v_new = torch.cat([values[r][a:a + n] for r, a, n in step]).to(dtype)
            q = torch.randn(len(pos), H, D, generator=g, dtype=torch.float64)
            outs, lses = [], []
            for rank in range(cp):
                md, empty = ring_metadata(pos.numpy(), rows.numpy(), TABLES, block, rank, cp, backend, "cpu")
                o, lse = backend.forward(layer(caches[rank]), q.to(dtype), k_new, v_new, md, return_lse=True)
                outs.append(o.double().masked_fill(empty[:, None, None], 0))
                lses.append(lse.double().masked_fill(empty[:, None], float("-inf")))
            out, lse = merge_attention(outs, lses)
            refs = [float64_attention(q[i:i + 1], keys[r][:p + 1], values[r][:p + 1], [p])
                    for i, (r, p) in enumerate(zip(rows.tolist(), pos.tolist()))]
            ref_out, ref_lse = torch.cat([x[0] for x in refs]), torch.cat([x[1] for x in refs])
            tol = 1e-12 if dtype == torch.float64 else 1e-5
            assert (out - ref_out).abs().max() < tol * 10, backend.name
            assert (lse - ref_lse).abs().max() < tol * 10, backend.name
        for rank, cache in enumerate(caches):  # position p of request r lives on rank p % block // sub
            held = torch.zeros(2, 13, sub, KVH, D, dtype=dtype)
            for r, (k, v) in enumerate(zip(keys, values)):
                for p in range(len(k)):
                    if p % block // sub == rank:
                        held[0, TABLES[r][p // block], p % sub] = k[p].to(dtype)
                        held[1, TABLES[r][p // block], p % sub] = v[p].to(dtype)
            assert torch.equal(cache[:, 1:], held[:, 1:]), (backend.name, rank)  # block 0: the null block


def test_queries_before_a_ranks_first_key_see_nothing_there():
    """Rank 1 of cp 2 holds positions 4-7 of each 8-token block: positions 0-3 see none of its keys."""
    shape = AttentionShape(H, KVH, D)
    md, empty = ring_metadata([0, 3, 4, 9, 13], [0] * 5, [[1, 2]], 8, 1, 2, PerQueryTorch(shape, 4, "cpu"), "cpu")
    assert empty.tolist() == [True, True, False, False, False]
    assert md.seq_lens.tolist() == [1, 1, 1, 4, 6]  # p=9: block 0's four; p=13: four + 13 % 4 + 1
    assert md.slot_mapping.tolist() == [0, 0, 4, 0, 9]  # owned: table[p // 8] * 4 + p % 4; others: null
    md, _ = ring_metadata([0, 3, 4, 9, 13], [0] * 5, [[1, 2]], 8, 1, 2, TorchAttentionBackend(shape, 4, "cpu"), "cpu")
    assert md.query_start_loc.tolist() == [0, 5] and md.seq_lens.tolist() == [6]  # one sequence
    assert md.query_positions.tolist() == [-1, -1, 0, 3, 5]  # the last key each row sees
