"""KV block manager: allocation, reference counts, prefix hashes, LRU eviction (pure Python)."""

from meshserve.engine.kv_cache import KVCacheManager
from meshserve.engine.request import Request
from meshserve.sampling_params import SamplingParams


def req(rid, tokens, **kw):
    return Request(rid, tokens, SamplingParams(max_tokens=4, **kw), [2], 1000)


def test_allocate_and_free_counts_blocks():
    kv = KVCacheManager(num_blocks=11, block_size=4)
    r = req("a", list(range(10)))
    assert kv.allocate_slots(r, 10)
    assert len(r.block_ids) == 3 and 0 not in r.block_ids  # block 0 is the reserved null block
    assert kv.num_free_blocks == 10 - 3
    kv.free(r)
    assert kv.num_free_blocks == 10 and r.block_ids == []


def test_allocation_fails_without_side_effects():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    r = req("a", list(range(20)))
    assert not kv.allocate_slots(r, 20)
    assert r.block_ids == [] and kv.num_free_blocks == 3


def test_prefix_hit_shares_blocks_and_leaves_one_token():
    kv = KVCacheManager(num_blocks=20, block_size=4)
    a = req("a", list(range(12)))
    kv.allocate_slots(a, 12)
    a.num_computed_tokens = 12
    kv.cache_full_blocks(a)
    b = req("b", list(range(12)))  # identical: all 3 blocks cached, but one token must be computed
    blocks, n = kv.get_computed_blocks(b)
    assert blocks == a.block_ids[:2] and n == 8
    c = req("c", list(range(9)) + [99, 98, 97, 96])
    blocks, n = kv.get_computed_blocks(c)
    assert blocks == a.block_ids[:2] and n == 8
    assert kv.allocate_slots(c, 13 - 8, blocks)
    assert kv.ref_cnt[a.block_ids[0]] == 2


def test_hash_depends_on_the_whole_prefix():
    kv = KVCacheManager(num_blocks=20, block_size=4)
    a = req("a", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    kv.allocate_slots(a, 9)
    a.num_computed_tokens = 9
    kv.cache_full_blocks(a)
    b = req("b", [0, 2, 3, 4, 5, 6, 7, 8, 9])  # same second block, different first
    assert kv.get_computed_blocks(b) == ([], 0)


def test_freed_blocks_stay_reusable_until_evicted():
    kv = KVCacheManager(num_blocks=4, block_size=2)  # 3 usable
    a = req("a", [1, 2, 3, 4, 5])
    kv.allocate_slots(a, 5)
    a.num_computed_tokens = 4
    kv.cache_full_blocks(a)
    kv.free(a)
    b = req("b", [1, 2, 3, 4, 7])
    blocks, n = kv.get_computed_blocks(b)
    assert n == 4
    # a request needing all 3 blocks evicts the cached ones
    c = req("c", [9, 9, 9, 9, 9, 9])
    assert kv.allocate_slots(c, 6)
    assert kv.get_computed_blocks(req("d", [1, 2, 3, 4, 7])) == ([], 0)


def test_prompt_logprobs_requests_skip_the_cache():
    kv = KVCacheManager(num_blocks=10, block_size=2)
    a = req("a", [1, 2, 3, 4, 5])
    kv.allocate_slots(a, 5)
    a.num_computed_tokens = 5
    kv.cache_full_blocks(a)
    assert kv.get_computed_blocks(req("b", [1, 2, 3, 4, 5], prompt_logprobs=1)) == ([], 0)


def test_disabled_reuse_never_hits():
    kv = KVCacheManager(num_blocks=10, block_size=2, enable_prefix_caching=False)
    a = req("a", [1, 2, 3, 4, 5])
    kv.allocate_slots(a, 5)
    a.num_computed_tokens = 5
    kv.cache_full_blocks(a)
    assert kv.get_computed_blocks(req("b", [1, 2, 3, 4, 5])) == ([], 0)


def test_block_hashes_cover_prompt_and_output_tokens_in_order():
    """Hashes of blocks that span the prompt / output boundary, computed incrementally, equal a
    from-scratch chain over the token list (blake2b of parent + 4-byte little-endian ids)."""
    import hashlib
    import struct

    def reference(tokens, bs):
        out, parent = [], b""
        for i in range(len(tokens) // bs):
            h = hashlib.blake2b(parent + struct.pack(f"<{bs}I", *tokens[i * bs:(i + 1) * bs]), digest_size=16)
            parent = h.digest()
            out.append(parent)
        return out

    kv = KVCacheManager(num_blocks=50, block_size=4)
    prompt = [7, 70000, 3, 123456, 5, 6, 2**31 + 5, 8, 9, 10]
    r = req("a", prompt)
    assert kv._block_hashes(r, 2) == reference(prompt, 4)
    for t in [11, 12, 13, 14, 15, 16, 17]:
        r.append_output(t)
    tokens = prompt + [11, 12, 13, 14, 15, 16, 17]
    assert kv._block_hashes(r, 4) == reference(tokens, 4)  # blocks 2-3 straddle and follow the prompt
    fresh = req("b", tokens)
    assert kv._block_hashes(fresh, 4) == reference(tokens, 4)
