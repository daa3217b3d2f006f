"""KV block manager: a fixed pool of blocks, reference counts, prefix reuse by block hashes, and one
block table per KV cache group (engine/kv_spec.py).

A block's hash covers its tokens and every token before it (the parent's hash), so equal hashes
mean equal prefixes. Freed blocks keep their hash and sit in an LRU queue: a later request with
the same prefix takes them back without recomputing, until the pool needs them for new data.
Block 0 is reserved as the null block (padding tokens write there).

Groups share the pool; a request has one table per group, all of one length (a block per
`block_size` tokens): `req.block_ids` for group 0 and `req.group_block_ids` for the others (empty
for a one-group model, today's single table). A sliding-window group replaces the blocks that fall
wholly out of the window with the null block as the request advances, so it holds O(window)
blocks. Prefix reuse covers every group: a full-attention group needs its whole cached prefix, a
sliding-window group only the blocks the window still reads, and the hit is the longest prefix
every group agrees on (hash keys carry the group). Pure Python, no torch.
"""
from __future__ import annotations

import hashlib
import sys
from array import array
from collections import OrderedDict
from typing import Optional, Sequence

from meshserve.engine.kv_spec import FullAttentionSpec, KVCacheGroup
from meshserve.engine.request import Request

NULL_BLOCK = 0

_U32 = next(c for c in "IL" if array(c).itemsize == 4)


def token_bytes(tokens: list[int]) -> bytes:
    """Token ids as 4-byte little-endian unsigned integers, packed in C (no per-token Python)."""
    arr = array(_U32, tokens)
    if sys.byteorder != "little":
        arr.byteswap()
    return arr.tobytes()


def hash_block(parent: Optional[bytes], tokens: list[int]) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    if parent is not None:
        h.update(parent)
    h.update(token_bytes(tokens))
    return h.digest()


def salt_root(cache_salt: Optional[str]) -> Optional[bytes]:
    """The parent hash of a salted request's first block (vLLM's cache_salt): requests share cached
    prefixes only with requests of the same salt, and unsalted ones only with each other."""
    if cache_salt is None:
        return None
    return hashlib.blake2b(b"meshserve cache_salt\0" + cache_salt.encode(), digest_size=16).digest()


def _key(group: int, block_hash: bytes) -> bytes:
    """The prefix-cache key of a block of `group`: group 0's is the block hash itself."""
    return block_hash + group.to_bytes(2, "little") if group else block_hash


# get_computed_blocks' result: per group, the cached blocks of the prefix (null where a
# sliding window no longer reads), or () when nothing is cached
ComputedBlocks = Sequence[list[int]]


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 groups: Optional[Sequence[KVCacheGroup]] = None):
        if num_blocks < 2:
            raise ValueError(f"num_blocks={num_blocks}: the KV pool needs at least 2 blocks (one is reserved)")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.groups = list(groups) if groups else [KVCacheGroup(FullAttentionSpec(1, 1), ())]
        self.num_groups = len(self.groups)
        self.specs = [g.spec for g in self.groups]
        # groups that drop blocks as requests advance (sliding windows), by index
        self.windowed = [g for g, group in enumerate(self.groups) if group.sliding_window is not None]
        self.ref_cnt = [0] * num_blocks
        self.block_hash: list[Optional[bytes]] = [None] * num_blocks  # its prefix-cache key
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(1, num_blocks))
        self.hash_to_block: dict[bytes, int] = {}
        self.num_registered: dict[str, int] = {}  # request id -> full blocks already hashed
        self.prefix_queries = 0  # prompt tokens looked up
        self.prefix_hits = 0  # of those, found in the cache

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def capacity_tokens(self) -> int:
        """Tokens one request can surely hold: every group may need a block per block_size tokens."""
        return (self.num_blocks - 1) // self.num_groups * self.block_size

    @property
    def usage(self) -> float:
        """Fraction of blocks held by live requests (cached-but-free blocks count as free)."""
        return 1.0 - self.num_free_blocks / self.num_usable_blocks

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    def tables(self, req: Request) -> list[list[int]]:
        """The request's block table of each group."""
        if self.num_groups == 1:
            return [req.block_ids]
        if not req.group_block_ids:
            req.group_block_ids = [[] for _ in range(self.num_groups - 1)]
        return [req.block_ids, *req.group_block_ids]

    def _block_hashes(self, req: Request, num_full_blocks: int) -> list[bytes]:
        hashes = req.block_hashes
        bs = self.block_size
        if len(hashes) >= num_full_blocks:
            return hashes[:num_full_blocks]
        # The tokens of the blocks still to hash, sliced (not indexed token by token).
        lo, hi = len(hashes) * bs, num_full_blocks * bs
        p = len(req.prompt_token_ids)
        tokens = req.prompt_token_ids[lo:min(hi, p)]
        if hi > p:
            tokens = tokens + req.output_token_ids[max(lo - p, 0):hi - p]
        for k in range(0, hi - lo, bs):
            hashes.append(hash_block(hashes[-1] if hashes else salt_root(req.cache_salt), tokens[k:k + bs]))
        return hashes[:num_full_blocks]

    # ---- prefix reuse ---------------------------------------------------------------------------
    def get_computed_blocks(self, req: Request) -> tuple[ComputedBlocks, int]:
        """Longest cached prefix of the request, in whole blocks, leaving at least one token to
        compute: (per group, its blocks of that prefix; the prefix's length in tokens)."""
        if not self.enable_prefix_caching or req.params.prompt_logprobs is not None:
            return [], 0
        hashes = self._block_hashes(req, (req.num_tokens - 1) // self.block_size)
        n = self._hit_length(hashes)
        if req.num_preemptions == 0:
            self.prefix_queries += req.num_tokens  # the prompt (and a resumed request's given outputs)
            self.prefix_hits += n * self.block_size
        if n == 0:
            return [], 0
        computed = []
        for g, spec in enumerate(self.specs):
            skip = spec.num_skipped_blocks(n * self.block_size, self.block_size)
            computed.append([NULL_BLOCK] * skip + [self.hash_to_block[_key(g, h)] for h in hashes[skip:n]])
        return computed, n * self.block_size

    def _hit_length(self, hashes: list[bytes]) -> int:
        """The most leading blocks that every group can take from the cache."""
        n = len(hashes)
        if not self.windowed:  # full attention: the cached prefix of each group
            for g in range(self.num_groups):
                for i in range(n):
                    if _key(g, hashes[i]) not in self.hash_to_block:
                        n = i
                        break
            return n
        while True:  # each group lowers n to its own longest hit within it, until all agree
            lowest = n
            for g in range(self.num_groups):
                lowest = self._group_hit(g, hashes, lowest)
            if lowest == n:
                return n
            n = lowest

    def _group_hit(self, g: int, hashes: list[bytes], n: int) -> int:
        """The longest prefix of at most n blocks whose blocks group g still reads are cached."""
        bs, spec = self.block_size, self.specs[g]
        if spec.num_skipped_blocks(n * bs, bs) >= n:  # a window of one token reads no earlier block
            return n
        run = 0  # cached blocks in a row, scanning down from block n - 1
        for i in range(n - 1, -1, -1):
            if _key(g, hashes[i]) not in self.hash_to_block:
                run = 0
                continue
            run += 1
            end = i + run  # blocks [i, end) are cached; a prefix of `end` blocks reads from block `skip` on
            if spec.num_skipped_blocks(end * bs, bs) >= i:
                return end
        return 0

    # ---- allocation -----------------------------------------------------------------------------
    def can_allocate(self, req: Request, num_new_tokens: int, computed: ComputedBlocks = ()) -> bool:
        return self._fits(self._num_needed(req, num_new_tokens, computed), computed)

    def _fits(self, needed: int, computed: ComputedBlocks) -> bool:
        """Whether `needed` new blocks per group fit, after taking back the cached blocks of
        `computed` that sit in the free queue (they use free blocks too)."""
        revived = sum(1 for blocks in computed for b in blocks if b != NULL_BLOCK and self.ref_cnt[b] == 0) \
            if computed else 0
        return needed * self.num_groups <= len(self.free_queue) - revived

    def _num_needed(self, req: Request, num_new_tokens: int, computed: ComputedBlocks) -> int:
        """New blocks each group needs (every table has one length)."""
        num_cached = len(computed[0]) if computed else 0
        total = req.num_computed_tokens + num_cached * self.block_size + num_new_tokens
        return max(0, -(-total // self.block_size) - len(req.block_ids) - num_cached)

    def allocate_slots(self, req: Request, num_new_tokens: int, computed: ComputedBlocks = ()) -> bool:
        """Give `req` room for `num_new_tokens` more tokens (after taking the cached `computed`
        blocks). Returns False, changing nothing but freeing blocks a sliding window has passed,
        when the pool is too small."""
        if self.windowed and req.num_computed_tokens:
            self._free_skipped(req)
        needed = self._num_needed(req, num_new_tokens, computed)
        if not needed and not computed:  # the usual decode step: room left in the last block
            return True
        if not self._fits(needed, computed):
            return False
        tables = self.tables(req)
        for blocks, table in zip(computed, tables):
            for b in blocks:
                if b != NULL_BLOCK:
                    if self.ref_cnt[b] == 0:
                        del self.free_queue[b]
                    self.ref_cnt[b] += 1
            table.extend(blocks)
        if computed:
            self.num_registered[req.request_id] = len(req.block_ids)
        for table in tables:
            for _ in range(needed):
                b, _ = self.free_queue.popitem(last=False)
                h = self.block_hash[b]
                if h is not None:
                    if self.hash_to_block.get(h) == b:
                        del self.hash_to_block[h]
                    self.block_hash[b] = None
                self.ref_cnt[b] = 1
                table.append(b)
        return True

    def _free_skipped(self, req: Request) -> None:
        """Null the blocks each sliding-window group no longer reads. Null entries are a prefix of
        the table, so only the entries since the last call are visited; they join the free queue
        oldest first (a later prefix hit needs the newest ones, so those are evicted last)."""
        bs = self.block_size
        tables = self.tables(req)
        for g in self.windowed:
            table = tables[g]
            end = min(self.specs[g].num_skipped_blocks(req.num_computed_tokens, bs), len(table))
            start = end
            while start > 0 and table[start - 1] != NULL_BLOCK:
                start -= 1
            for i in range(start, end):
                b = table[i]
                table[i] = NULL_BLOCK
                self.ref_cnt[b] -= 1
                if self.ref_cnt[b] == 0:
                    self.free_queue[b] = None

    def cache_full_blocks(self, req: Request) -> None:
        """Register the hashes of blocks whose KV is now fully written."""
        if not self.enable_prefix_caching:
            return
        # computed may run ahead of known tokens (overlap placeholders): hash only known ones
        full = min(min(req.num_computed_tokens, req.num_tokens) // self.block_size, len(req.block_ids))
        start = self.num_registered.get(req.request_id, 0)
        if full <= start:
            return
        hashes = self._block_hashes(req, full)
        for g, table in enumerate(self.tables(req)):
            for i in range(start, full):
                b = table[i]
                key = _key(g, hashes[i])
                # a null entry: a sliding window passed the block before its step came back (overlap)
                if b != NULL_BLOCK and key not in self.hash_to_block and self.block_hash[b] is None:
                    self.hash_to_block[key] = b
                    self.block_hash[b] = key
        self.num_registered[req.request_id] = full

    def free(self, req: Request) -> None:
        # Tail blocks first into the LRU queue, so they are evicted before the shared prefix.
        for table in self.tables(req):
            for b in reversed(table):
                if b != NULL_BLOCK:
                    self.ref_cnt[b] -= 1
                    if self.ref_cnt[b] == 0:
                        self.free_queue[b] = None
        req.block_ids = []
        req.group_block_ids = []
        self.num_registered.pop(req.request_id, None)

    def reset_prefix_cache(self) -> None:
        for b in self.free_queue:
            self.block_hash[b] = None
        self.hash_to_block = {h: b for h, b in self.hash_to_block.items() if self.ref_cnt[b] > 0}
