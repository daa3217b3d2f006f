"""KV block manager: allocation, reference counts, prefix hashes, LRU eviction, and KV groups with
sliding windows, against hand-computed tables (pure Python)."""
import pytest

from meshserve.engine.kv_cache import KVCacheManager
from meshserve.engine.kv_spec import (FullAttentionSpec, KVCacheGroup, MLAAttentionSpec, SlidingWindowSpec,
                                      kv_cache_groups, layer_kv_specs)
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
    assert blocks == [a.block_ids[:2]] and n == 8  # one list per KV group
    c = req("c", list(range(9)) + [99, 98, 97, 96])
    blocks, n = kv.get_computed_blocks(c)
    assert blocks == [a.block_ids[:2]] and n == 8
    assert kv.allocate_slots(c, 13 - 8, blocks)
    assert kv.ref_cnt[a.block_ids[0]] == 2


def test_a_cache_salt_shares_prefixes_only_within_the_salt():
    """vLLM's cache_salt: the same prompt hits the cache only for a request of the same salt (an
    unsalted one only for unsalted ones), so one tenant cannot probe another's prompts by timing."""
    kv = KVCacheManager(num_blocks=40, block_size=4)

    def cached(rid, salt):
        r = Request(rid, list(range(12)), SamplingParams(max_tokens=4), [2], 1000, cache_salt=salt)
        return kv.get_computed_blocks(r)[1], r

    for rid, salt in (("a", "tenant-a"), ("plain", None)):
        n, r = cached(rid, salt)
        assert n == 0
        kv.allocate_slots(r, 12)
        r.num_computed_tokens = 12
        kv.cache_full_blocks(r)
    assert cached("a2", "tenant-a")[0] == 8  # the same salt: the first two blocks (one token is computed)
    assert cached("b", "tenant-b")[0] == 0  # another salt: nothing
    assert cached("plain2", None)[0] == 8  # unsalted: the unsalted request's blocks
    ra, rp = cached("a3", "tenant-a")[1], cached("p3", None)[1]
    assert all(x != y for x, y in zip(ra.block_hashes, rp.block_hashes))  # the salt runs through every block


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


# ---- KV cache groups ------------------------------------------------------------------------------
F, S = FullAttentionSpec(2, 8), SlidingWindowSpec(2, 8, sliding_window=8)


def test_layers_group_by_spec_in_equal_sizes():
    assert kv_cache_groups([F] * 3) == [KVCacheGroup(F, (0, 1, 2))]
    # 2 full, 4 sliding: size 2
    assert kv_cache_groups([F, F, S, S, S, S]) == [KVCacheGroup(F, (0, 1)), KVCacheGroup(S, (2, 3)),
                                                   KVCacheGroup(S, (4, 5))]
    # 4 and 3: 4 is not within 1.25 x 3, so size 3 and a short group
    assert kv_cache_groups([F] * 4 + [S] * 3) == [KVCacheGroup(F, (0, 1, 2)), KVCacheGroup(F, (3,)),
                                                  KVCacheGroup(S, (4, 5, 6))]
    # 6 and 5: 6 is within 1.25 x 5, so size 6, fewer groups
    assert kv_cache_groups([S] * 6 + [F] * 5) == [KVCacheGroup(S, tuple(range(6))),
                                                  KVCacheGroup(F, tuple(range(6, 11)))]
    with pytest.raises(ValueError, match="lay out a block differently"):
        kv_cache_groups([F, MLAAttentionSpec(512, 64)])


def test_specs_from_windows_and_their_bytes():
    # a window as long as max_seq_len drops nothing: full attention
    assert layer_kv_specs([None, 8, 4096], 2, 8, max_seq_len=4096) == [F, S, F]
    assert F.bytes_per_token(2) == 2 * 2 * 8 * 2 and F.cache_shape(10, 4) == (2, 10, 4, 2, 8)
    mla = layer_kv_specs([None], 2, 8, 4096, kv_lora_rank=512, qk_rope_head_dim=64)[0]
    assert mla == MLAAttentionSpec(512, 64)  # one latent vector per token, whatever the heads
    assert mla.bytes_per_token(2) == (512 + 64) * 2 and mla.cache_shape(10, 4) == (10, 4, 576)
    assert [S.num_skipped_blocks(p, 4) for p in (0, 7, 10, 11, 14, 15, 19)] == [0, 0, 0, 1, 1, 2, 3]


def decode(kv, r, position):
    """Allocate for the token at `position` (the request has computed everything before it)."""
    r.num_computed_tokens = position
    assert kv.allocate_slots(r, 1)


def test_sliding_window_frees_blocks_behind_the_window():
    kv = KVCacheManager(20, 4, groups=[KVCacheGroup(S, (0,))])
    r = req("a", list(range(10)))
    assert kv.allocate_slots(r, 10) and r.block_ids == [1, 2, 3]
    decode(kv, r, 10)
    assert r.block_ids == [1, 2, 3]  # position 10 reads 3 .. 10: block 0 still
    decode(kv, r, 11)
    assert r.block_ids == [0, 2, 3] and kv.num_free_blocks == 19 - 2  # reads 4 ..: block 0 freed
    decode(kv, r, 12)
    assert r.block_ids == [0, 2, 3, 4]  # 4 was the head of the free queue (1 went to its tail)
    decode(kv, r, 15)
    assert r.block_ids == [0, 0, 3, 4]
    decode(kv, r, 16)
    assert r.block_ids == [0, 0, 3, 4, 5]
    for p in range(17, 60):
        decode(kv, r, p)
        live = [b for b in r.block_ids if b]
        assert len(r.block_ids) == p // 4 + 1 and len(live) <= 3  # ceil((8 - 1) / 4) + 1
        assert kv.num_free_blocks == 19 - len(live)
    kv.free(r)  # preemption or the end: every block back, null entries skipped
    assert kv.num_free_blocks == 19 and r.block_ids == [] and kv.ref_cnt[0] == 0


def test_two_groups_keep_two_tables_of_one_length():
    groups = kv_cache_groups([F, F, S, S])
    assert groups == [KVCacheGroup(F, (0, 1)), KVCacheGroup(S, (2, 3))]
    kv = KVCacheManager(20, 4, groups=groups)
    assert kv.capacity_tokens == 19 // 2 * 4
    r = req("a", list(range(10)))
    assert kv.allocate_slots(r, 10)
    assert r.block_ids == [1, 2, 3] and r.group_block_ids == [[4, 5, 6]]
    decode(kv, r, 11)
    assert r.block_ids == [1, 2, 3] and r.group_block_ids == [[0, 5, 6]] and kv.num_free_blocks == 14
    decode(kv, r, 12)  # a block per group; the free queue is 7 .. 19, then 4
    assert r.block_ids == [1, 2, 3, 7] and r.group_block_ids == [[0, 5, 6, 8]] and kv.num_free_blocks == 12
    kv.free(r)
    assert kv.num_free_blocks == 19 and r.group_block_ids == []


def test_two_groups_need_room_in_both():
    kv = KVCacheManager(6, 4, groups=kv_cache_groups([F, S]))  # 5 usable blocks
    r = req("a", list(range(10)))
    assert not kv.allocate_slots(r, 10)  # 3 + 3 blocks
    assert r.block_ids == [] and not any(r.group_block_ids) and kv.num_free_blocks == 5
    assert kv.allocate_slots(r, 8)  # 2 + 2


def window_request(kv, tokens):
    """A request that prefilled `tokens` (registering its blocks) and then decoded one token."""
    r = req("a", tokens)
    assert kv.allocate_slots(r, len(tokens))
    r.num_computed_tokens = len(tokens)
    kv.cache_full_blocks(r)
    r.append_output(99)
    decode(kv, r, len(tokens))
    return r


W6 = SlidingWindowSpec(2, 8, sliding_window=6)  # position p reads p - 5 .. p


def test_sliding_window_prefix_hit_needs_only_the_window():
    kv = KVCacheManager(20, 4, groups=[KVCacheGroup(W6, (0,))])
    a = window_request(kv, list(range(20)))
    # position 20 reads 15 ..: blocks 0-2 freed oldest first, to the queue's tail, hashes kept
    assert a.block_ids == [0, 0, 0, 4, 5, 6] and list(kv.free_queue)[-3:] == [1, 2, 3]
    # the same 20 tokens: its first query (position 20) reads blocks 3 and 4, both cached
    computed, n = kv.get_computed_blocks(req("b", list(range(20)) + [7]))
    assert (computed, n) == ([[0, 0, 0, 4, 5]], 20)
    # block 4 differs: 16 tokens, whose first query reads blocks 2-3; block 2 (id 3) is free but cached
    c = req("c", list(range(16)) + [50, 51, 52, 53, 60])
    computed, n = kv.get_computed_blocks(c)
    assert (computed, n) == ([[0, 0, 3, 4]], 16)
    free = kv.num_free_blocks
    assert kv.allocate_slots(c, 5, computed)  # takes id 3 back from the free queue, and 2 new blocks
    assert c.block_ids[:4] == [0, 0, 3, 4] and kv.ref_cnt[3] == 1 and kv.ref_cnt[4] == 2
    assert kv.num_free_blocks == free - 3


def test_sliding_window_prefix_hit_survives_losing_blocks_it_does_not_read():
    kv = KVCacheManager(20, 4, groups=[KVCacheGroup(W6, (0,))])
    window_request(kv, list(range(20)))
    kv.reset_prefix_cache()  # drops the hashes of the free blocks: ids 1-3, blocks 0-2
    assert kv.get_computed_blocks(req("b", list(range(20)) + [7])) == ([[0, 0, 0, 4, 5]], 20)
    assert kv.get_computed_blocks(req("c", list(range(16)) + [50, 51, 52, 53, 60])) == ([], 0)


def test_mixed_groups_prefix_hit_is_the_prefix_every_group_can_take():
    kv = KVCacheManager(30, 4, groups=kv_cache_groups([F, W6]))
    a = window_request(kv, list(range(20)))
    assert a.block_ids == [1, 2, 3, 4, 5, 11] and a.group_block_ids == [[0, 0, 0, 9, 10, 12]]
    b = req("b", list(range(20)) + [7])
    assert kv.get_computed_blocks(b) == ([[1, 2, 3, 4, 5], [0, 0, 0, 9, 10]], 20)  # keys differ per group
    c = req("c", list(range(16)) + [50, 51, 52, 53, 60])
    assert kv.get_computed_blocks(c) == ([[1, 2, 3, 4], [0, 0, 8, 9]], 16)
    kv.reset_prefix_cache()  # the windowed group loses ids 6-8: c's window (blocks 2-3) is gone
    assert kv.get_computed_blocks(c) == ([], 0)  # though the full-attention group has 4 blocks
    assert kv.get_computed_blocks(b) == ([[1, 2, 3, 4, 5], [0, 0, 0, 9, 10]], 20)
    assert kv.allocate_slots(b, 1, kv.get_computed_blocks(b)[0])
    assert b.block_ids[:5] == [1, 2, 3, 4, 5] and b.group_block_ids[0][:5] == [0, 0, 0, 9, 10]
    assert kv.ref_cnt[1] == 2 and kv.ref_cnt[9] == 2 and kv.ref_cnt[0] == 0
