"""KV block manager: a fixed pool of blocks, reference counts, and prefix reuse by block hashes.

A block's hash covers its tokens and every token before it (the parent's hash), so equal hashes
mean equal prefixes. Freed blocks keep their hash and sit in an LRU queue: a later request with
the same prefix takes them back without recomputing, until the pool needs them for new data.
Block 0 is reserved as the null block (padding tokens write there). Pure Python, no torch.
"""
from __future__ import annotations

import hashlib
import sys
from array import array
from collections import OrderedDict
from typing import Optional

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


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 2:
            raise ValueError(f"num_blocks={num_blocks}: the KV pool needs at least 2 blocks (one is reserved)")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_cnt = [0] * num_blocks
        self.block_hash: list[Optional[bytes]] = [None] * num_blocks
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
    def usage(self) -> float:
        """Fraction of blocks held by live requests (cached-but-free blocks count as free)."""
        return 1.0 - self.num_free_blocks / self.num_usable_blocks

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

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
            hashes.append(hash_block(hashes[-1] if hashes else None, tokens[k:k + bs]))
        return hashes[:num_full_blocks]

    def get_computed_blocks(self, req: Request) -> tuple[list[int], int]:
        """Longest cached prefix of the request, in whole blocks, leaving at least one token to compute."""
        if not self.enable_prefix_caching or req.params.prompt_logprobs is not None:
            return [], 0
        max_blocks = (req.num_tokens - 1) // self.block_size
        blocks: list[int] = []
        for h in self._block_hashes(req, max_blocks):
            b = self.hash_to_block.get(h)
            if b is None:
                break
            blocks.append(b)
        if req.num_preemptions == 0:
            self.prefix_queries += req.num_prompt_tokens
            self.prefix_hits += len(blocks) * self.block_size
        return blocks, len(blocks) * self.block_size

    def can_allocate(self, req: Request, num_new_tokens: int, computed: list[int] = ()) -> bool:
        return self._num_needed(req, num_new_tokens, computed) <= self.num_free_blocks - sum(
            1 for b in computed if self.ref_cnt[b] == 0)

    def _num_needed(self, req: Request, num_new_tokens: int, computed) -> int:
        total = req.num_computed_tokens + len(computed) * self.block_size + num_new_tokens
        return -(-total // self.block_size) - len(req.block_ids) - len(computed)

    def allocate_slots(self, req: Request, num_new_tokens: int, computed: list[int] = ()) -> bool:
        """Give `req` room for `num_new_tokens` more tokens (after taking the cached `computed`
        blocks). Returns False, changing nothing, when the pool is too small."""
        if not self.can_allocate(req, num_new_tokens, computed):
            return False
        needed = self._num_needed(req, num_new_tokens, computed)
        for b in computed:
            if self.ref_cnt[b] == 0:
                del self.free_queue[b]
            self.ref_cnt[b] += 1
        req.block_ids.extend(computed)
        if computed:
            self.num_registered[req.request_id] = len(req.block_ids)
        for _ in range(max(0, needed)):
            b, _ = self.free_queue.popitem(last=False)
            h = self.block_hash[b]
            if h is not None:
                if self.hash_to_block.get(h) == b:
                    del self.hash_to_block[h]
                self.block_hash[b] = None
            self.ref_cnt[b] = 1
            req.block_ids.append(b)
        return True

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
        for i in range(start, full):
            b = req.block_ids[i]
            if hashes[i] not in self.hash_to_block and self.block_hash[b] is None:
                self.hash_to_block[hashes[i]] = b
                self.block_hash[b] = hashes[i]
        self.num_registered[req.request_id] = full

    def free(self, req: Request) -> None:
        # Tail blocks first into the LRU queue, so they are evicted before the shared prefix.
        for b in reversed(req.block_ids):
            self.ref_cnt[b] -= 1
            if self.ref_cnt[b] == 0:
                self.free_queue[b] = None
        req.block_ids = []
        self.num_registered.pop(req.request_id, None)

    def reset_prefix_cache(self) -> None:
        for b in self.free_queue:
            self.block_hash[b] = None
        self.hash_to_block = {h: b for h, b in self.hash_to_block.items() if self.ref_cnt[b] > 0}
